"""The code benchmarks as edit-job runs: `lightning run edit config=code/kecode_tcpe.yaml` (KECode) and
`lightning run edit config=code/ment.yaml` (MENT), selected by the job config's `code.benchmark`.

Both build the editor exactly as a fact stream does (`jobs.edit_run.new_editor`, `editor.prepare`
on the world corpus) and hand it ordinary `EditRecord`s:

- **kecode** (`run_kecode`): the unedited LM translates every KECode sample; `ldc2` compiles and tests
  the translations (sandboxed, `compiler.py`); the errors are clustered. For each target cluster
  (`code.scenario=per_cluster`, a fresh model each) or for all at once (`multi`), the cluster's
  correction knowledge becomes an edit file and runs through the real edit stream (`EditStream`,
  `EditModule`, a Lightning `Trainer`, final-state Rel/Loc on the edit records); then the edited model
  translates every sample again, and `metrics.kecode_scores` gives Generalization, Cluster Drift,
  Specificity, Reliability and the passing programs the edit broke.
- **ment** (`run_ment`): MENT's patch sets (size 1, the LM's next-token errors on reference-prefixed
  lines), each applied to the unedited model and rolled back: EM / BM / LM / BLEU / ROUGE of the
  line generated before and after, NeuronCost, patched neurons, skip rate and time (RQ1, RQ2); then
  the probe benchmark: each sample patched alone, MAE of rank and probability over its G and S probe
  sets (RQ3).

Results: `results.md` (printed), `results.json`, `results.csv`, a per-cluster (per-subtype) plot
`results.png`, the per-sample outcomes, and the run's CSV / W&B logs (`logger=`).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

BENCHMARKS = ("kecode", "ment")
SCENARIOS = ("per_cluster", "multi")


@dataclass
class CodeBenchConfig:
    """`code:` section of the edit job: run a code benchmark instead of a fact stream."""

    benchmark: str | None = None
    """`kecode` or `ment`; None = an ordinary fact stream (the rest of this section is ignored)."""
    clusters: list[str] | None = None
    """KECode: cluster ids to edit (`c0`, `c1`, ... by size, see the world's data/clusters.json); None =
    every cluster with at least `min_cluster_size` samples (`other` never)."""
    min_cluster_size: int = 20
    """KECode: the smallest cluster edited when `clusters` is None."""
    scenario: str = "per_cluster"
    """KECode: `per_cluster` (each cluster edited alone, on a fresh model) or `multi` (every target
    cluster's edits in one stream, TCPE's multi-error scenario)."""
    edits_per_cluster: int = 10
    """KECode: samples of a cluster whose correction knowledge is edited in (never more than half the
    cluster; the rest is scored)."""
    samples: int | None = None
    """KECode: use the file's first N samples; None = all."""
    max_target_tokens: int = 6
    """KECode: longest correction (reference tokens) an edit record asks for."""
    locality_per_edit: int = 5
    """Locality pairs per edit record, drawn from the LM's training programs (never the scored ones)."""
    patch_sets: int | None = None
    """MENT: use the first N data pairs of the patch file; None = all."""
    probe_path: str | None = None
    """MENT: probe benchmark file; None = the world's data/ment_probe.json."""
    probes: bool = True
    """MENT: run the probe benchmark (RQ3) after the patch sets."""
    probe_limit: int | None = None
    """MENT: use the first N probe samples; None = all."""
    parallel: int = 10
    """Parallel data per edit record (`training_paraphrases`, also scored as `rephrase_prompts`): training-corpus prompts whose next token is
    the same target, most similar first (KN needs them; MENT's paper sets 10)."""
    compiler: str | None = None
    """ldc2 executable; None = $LDC2, else ldc2 on PATH."""
    sandbox: str = "auto"
    """Write confinement: `auto` (Landlock when the kernel has it), `landlock` (required), `none`."""
    compile_batch: int = 64
    """Programs per compiler call."""
    generate_batch: int = 64
    """Programs translated together."""


def check(cfg: DictConfig) -> str | None:
    """A config problem as one line, or None."""
    code = cfg.code
    if code.benchmark not in BENCHMARKS:
        return f"code.benchmark is {code.benchmark!r}; expected one of {', '.join(BENCHMARKS)} (or null for a fact stream)"
    if code.scenario not in SCENARIOS:
        return f"code.scenario is {code.scenario!r}; expected one of {', '.join(SCENARIOS)}"
    if code.edits_per_cluster < 1:
        return f"code.edits_per_cluster is {code.edits_per_cluster} (expected >= 1)"
    if cfg.data.batch_size != 1:
        return f"data.batch_size is {cfg.data.batch_size}; the code benchmarks edit one record at a time"
    return None


def run(cfg: DictConfig, output_dir: Path) -> int:
    """Run `cfg.code.benchmark`; a user's mistake (no compiler, not a code world, a bad file or key)
    is one line on stderr and exit code 2, with nothing written."""
    from .compiler import CompilerMissing
    from .kecode import KECodeDataError
    from .sandbox import SandboxError

    problem = check(cfg)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        world = code_world(cfg.model.name)
        if cfg.code.benchmark == "kecode":
            return run_kecode(cfg, output_dir, world)
        return run_ment(cfg, output_dir, world)
    except (CompilerMissing, KECodeDataError, SandboxError, CodeWorldRequired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


class CodeWorldRequired(ValueError):
    """The code benchmarks translate in the code world's format: they need its LM."""


def code_world(model_name: str):
    """The code world `model_name` names (built on first use), or is the model folder of."""
    from lightning_edit.world import CODE_WORLDS, WORLD_NAMES, world_for

    from .world import CodeWorld

    fact_world = model_name in WORLD_NAMES and model_name not in CODE_WORLDS  # refused without building it
    world = None if fact_world else world_for(model_name)
    if isinstance(world, CodeWorld):
        return world
    raise CodeWorldRequired(f"model.name={model_name!r} is not a code world: the code benchmarks need a code-world LM "
                            f"(model.name=codeworld, codeworld-small, or a built code world's model/ folder)")


# --- shared plumbing ----------------------------------------------------------------------------------------


def _runner(cfg: DictConfig):
    from .compiler import DRunner
    from .sandbox import Sandbox
    from .world import exec_cache_dir

    return DRunner(cfg.code.compiler, Sandbox(cfg.code.sandbox), cache_dir=exec_cache_dir(),
                   batch_size=cfg.code.compile_batch)


def _load(cfg: DictConfig):
    from lightning_edit.jobs.edit_run import resolve_device
    from lightning_edit.models import ModelAdapter, load_model

    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype, resolve_device(cfg.model.device))
    return model, tokenizer, ModelAdapter(model)


def _editor(cfg: DictConfig, corpus: list[str], world):
    """A fresh model and the configured editor over it (`jobs.edit_run.new_editor`: its component
    resolved, or the world's default trained, first), prepared (statistics are cached on disk)."""
    from lightning_edit.jobs.edit_run import new_editor

    model, tokenizer, adapter = _load(cfg)
    editor = new_editor(cfg.editor.method, OmegaConf.to_container(cfg.editor, resolve=True), model, tokenizer,
                        adapter, OmegaConf.to_container(cfg.component, resolve=True), cfg.model.name, world=world)
    editor.prepare(corpus)
    return editor


def _log(loggers: list, metrics: dict[str, float], step: int) -> None:
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isnan(float(v))}
    for logger in loggers:
        logger.log_metrics(clean, step=step)


def _finish_loggers(loggers: list, image: Path | None) -> None:
    for logger in loggers:
        if image is not None and hasattr(logger, "log_image"):
            try:
                logger.log_image(key="code/results", images=[str(image)])
            except Exception as exc:  # an image is a nicety; never fail a finished run for it
                warnings.warn(f"could not log {image} to {type(logger).__name__}: {exc}")
        logger.finalize("success")


# --- KECode -----------------------------------------------------------------------------------------------


def _stream(cfg: DictConfig, editor, records_path: Path, n: int):
    """The records of `records_path` through the real edit stream; returns the EditModule's rows."""
    from lightning import Trainer

    from datamodules.edits import EditStream
    from lightning_edit.metrics import EditScorer
    from modules.edit_module import EditModule

    stream = EditStream(records_path, "easyedit", cfg.data.order_seed, 1, None)
    stream.setup("fit")
    module = EditModule(editor, EditScorer(editor.tokenizer, batch_size=cfg.eval.batch_size),
                        checkpoints=[t for t in cfg.eval.checkpoints if t <= n] + [n], immediate=cfg.eval.immediate)
    kwargs: dict[str, Any] = {"max_epochs": 1, "enable_model_summary": False, "log_every_n_steps": 1}
    kwargs.update(OmegaConf.to_container(cfg.trainer, resolve=True))
    kwargs.update({"logger": False, "enable_checkpointing": False, "callbacks": []})
    trainer = Trainer(**kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=stream)
    return module.rows


def run_kecode(cfg: DictConfig, output_dir: Path, world) -> int:
    from lightning_edit.config import save_config
    from lightning_edit.data.readers import write_edits
    from lightning_edit.jobs.edit_run import read_corpus
    from lightning_edit.loggers import build_loggers

    from .clusters import OTHER, ErrorClusters
    from .kecode import KECodeHarness, edit_split, load_samples, locality_pairs, training_programs
    from .metrics import kecode_scores, overall_rates
    from .parallel import ParallelIndex
    from .report import kecode_report
    from .translate import editor_check, editor_generate, greedy_check, model_generate

    code = cfg.code
    runner = _runner(cfg)  # no compiler: one line, exit 2, before anything is written
    samples = load_samples(cfg.data.path or world.kecode_path, code.samples)
    save_config(cfg, output_dir)
    started = time.perf_counter()
    corpus = read_corpus(cfg.data.corpus, world)
    harness = KECodeHarness(samples, runner, batch_size=code.generate_batch)

    model, tokenizer, _ = _load(cfg)
    _say(f"translating {len(samples)} KECode samples with the unedited model ...")
    before = harness.run(model_generate(model, tokenizer), [s.generated_lines for s in samples],
                         greedy_check(lambda: contextlib.nullcontext(model), tokenizer))
    if harness.reused[-1]:
        _say(f"{harness.reused[-1]} of {len(samples)} samples: the model writes the file's d_lines again (kept)")
    del model
    min_size = world.record.get("world", {}).get("cluster_min_size", 3)
    clusters = ErrorClusters(min_size=min_size).fit([t.signature for t in before])
    outcomes_before = harness.outcomes(before, clusters)
    targets = list(code.clusters) if code.clusters else [c for c in clusters.ids.values()
                                                          if clusters.sizes[c] >= code.min_cluster_size]
    unknown = [c for c in targets if c not in clusters.sizes or c == OTHER]
    if unknown:
        print(f"error: code.clusters names {unknown}; this model's clusters: "
              f"{', '.join(f'{c} ({s})' for s, c in clusters.ids.items())}", file=sys.stderr)
        return 2
    _say(f"{len(clusters.ids)} error clusters; editing {', '.join(targets)} ({code.scenario})")

    train_programs = training_programs(world)
    parallel = ParallelIndex(train_programs)
    splits, records_by_cluster = {}, {}
    for target in targets:
        ids = [i for i, o in outcomes_before.items() if o.cluster == target]
        edited, _ = edit_split(ids, code.edits_per_cluster, cfg.seed, target)
        records = []
        for i in edited:
            record = harness.correction(i, before[i], code.max_target_tokens)
            if record is None:
                continue
            record.locality = locality_pairs(train_programs, code.locality_per_edit, cfg.seed, f"{target}/{i}")
            # Training-corpus parallel data: the editor may train on it (KN), so it is a training paraphrase.
            record.training_paraphrases = parallel.similar(record.prompt, record.target_new, code.parallel)
            record.rephrase_prompts = list(record.training_paraphrases)
            record.extra["cluster"] = target
            records.append(record)
        splits[target], records_by_cluster[target] = edited, records

    loggers = build_loggers(cfg, output_dir, "edit")
    rows, after_by_target, step, zero = [], {}, 0, None
    groups = [[t] for t in targets] if code.scenario == "per_cluster" else [targets]
    for group in groups:
        records = [r for t in group for r in records_by_cluster[t]]
        if not records:
            _say(f"no correction knowledge for {', '.join(group)}: skipped")
            continue
        name = group[0] if len(group) == 1 else "multi"
        path = write_edits(records, output_dir / "edits" / f"{name}.json")
        _say(f"{name}: {len(records)} edits ({cfg.editor.method}) ...")
        editor = _editor(cfg, corpus, world)
        if zero is None:
            zero = _zero_edit(editor, harness, samples, clusters, before, outcomes_before)
        t0 = time.perf_counter()
        stream_rows = _stream(cfg, editor, path, len(records))
        edit_seconds = time.perf_counter() - t0
        after = harness.run(editor_generate(editor), [t.lines for t in before], editor_check(editor))
        outcomes_after = harness.outcomes(after, clusters)
        edited_ids = {i for t in group for i in splits[t]}
        heldout = [i for i in range(len(samples)) if i not in edited_ids]
        step += len(records)
        for target in group:
            scores = kecode_scores(target, outcomes_before, outcomes_after, heldout)
            if code.scenario == "multi":  # every cluster was edited: nothing is "another cluster"
                scores["specificity"] = math.nan
            edited_fixed = [outcomes_after[i].cluster != target for i in splits[target]]
            final = stream_rows[-1]["final-state"] if stream_rows else {}
            row = {"cluster": target, "signature": clusters.signatures[target], "edits": len(records_by_cluster[target]),
                   **scores, "edited_fixed": sum(edited_fixed) / len(edited_fixed) if edited_fixed else math.nan,
                   "rel": final.get("rel", math.nan), "loc": final.get("loc", math.nan),
                   "after": overall_rates(outcomes_after, heldout), "before": overall_rates(outcomes_before, heldout),
                   "edit_seconds": edit_seconds, "stream": stream_rows}
            rows.append(row)
            _log(loggers, {f"kecode/{target}/{k}": v for k, v in row.items() if isinstance(v, (int, float))}, step)
            _say(f"{target}: generalization {row['generalization']:.2f}, drift {row['drift']:.2f}, specificity "
                 f"{row['specificity']:.2f}, reliability {row['reliability']:.2f}, broken {int(row['broken'])}")
        after_by_target[name] = after
        del editor

    meta = {"benchmark": "kecode", "method": cfg.editor.method, "model": cfg.model.name, "scenario": code.scenario,
            "samples": len(samples), "data": str(cfg.data.path or world.kecode_path), "compiler": runner.version,
            "sandbox_confines_writes": runner.sandbox.confines_writes, "seconds": time.perf_counter() - started,
            "edits_per_cluster": code.edits_per_cluster, "seed": cfg.seed,
            "reused_translations": harness.reused,
            "seconds_by_phase": {**{k: round(v, 1) for k, v in harness.seconds.items()},
                                 "edit_streams": round(sum(r["edit_seconds"] for r in rows), 1)}}
    before_summary = {"clusters": clusters.to_json(), **overall_rates(outcomes_before, range(len(samples))),
                      "zero_edit": zero}
    paths = kecode_report(rows, before_summary, meta, output_dir, samples, before, after_by_target, clusters)
    _log(loggers, {f"kecode/mean/{k}": v for k, v in _means(rows).items()}, step + 1)
    _finish_loggers(loggers, paths.get("png"))
    print(paths["md"].read_text())
    print(f"results, plot and per-sample outcomes in {output_dir}")
    return 0


def _zero_edit(editor, harness, samples, clusters, before, outcomes_before) -> dict:
    """The editor's model before any edit, where it differs from the base LM (a spliced transcoder or
    SAE, a gate): its translations' compile / pass rates and the passing programs it breaks alone, so
    that what an edit breaks is not confused with what the component costs."""
    from .metrics import overall_rates
    from .ment_sets import next_token_logprobs
    from .format import java_lines, prompt, statement_pairs
    from .translate import editor_check, editor_generate

    probes = [s.program for s in samples[:8]]
    texts = [prompt(java_lines(p), [d for _, d in statement_pairs(p, "d")], k) for p in probes for k in (0, 1)]
    base = next_token_logprobs(editor.model, editor.tokenizer, texts)
    with editor.edited() as model:
        now = next_token_logprobs(model, editor.tokenizer, texts)
    if bool((base == now).all()):
        return {"differs_from_base": False}
    _say("the editor's model differs from the base LM before any edit (a spliced component): measuring it ...")
    outcomes = harness.outcomes(harness.run(editor_generate(editor), [t.lines for t in before], editor_check(editor)),
                                clusters)
    ids = range(len(samples))
    return {"differs_from_base": True, **overall_rates(outcomes, ids),
            "broken": float(sum(outcomes_before[i].passed and not outcomes[i].passed for i in ids)),
            "changed_cluster": float(sum(outcomes_before[i].cluster != outcomes[i].cluster for i in ids))}


def _means(rows: list[dict]) -> dict[str, float]:
    keys = ("generalization", "drift", "specificity", "reliability", "compile_rate", "fixed", "broken", "rel", "loc")
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float)) and not math.isnan(r[k])]
        out[k] = sum(vals) / len(vals) if vals else math.nan
    return out


# --- MENT -------------------------------------------------------------------------------------------------


def run_ment(cfg: DictConfig, output_dir: Path, world) -> int:
    from lightning_edit.config import save_config
    from lightning_edit.jobs.edit_run import read_corpus
    from lightning_edit.loggers import build_loggers

    from .kecode import training_programs
    from .ment_bench import MentBench
    from .parallel import ParallelIndex
    from .report import ment_report

    code = cfg.code
    params = OmegaConf.to_container(cfg.editor, resolve=True)
    patch_path = Path(cfg.data.path or world.ment_patch_path)
    probe_path = Path(code.probe_path or world.ment_probe_path)
    for path in (patch_path, probe_path) if code.probes else (patch_path,):
        if not path.is_file():
            print(f"error: no MENT file at {path}", file=sys.stderr)
            return 2
    pairs = json.loads(patch_path.read_text())[: code.patch_sets]
    probes = json.loads(probe_path.read_text())[: code.probe_limit] if code.probes else []
    save_config(cfg, output_dir)
    started = time.perf_counter()
    corpus = read_corpus(cfg.data.corpus, world)
    bench = MentBench(lambda: _editor(cfg, corpus, world), ParallelIndex(training_programs(world)), parallel_n=code.parallel,
                      batch_size=code.generate_batch)
    loggers = build_loggers(cfg, output_dir, "edit")
    patch = bench.patch(pairs, log=lambda m, s: _log(loggers, m, s))
    probe = bench.probe(probes, log=lambda m, s: _log(loggers, m, s + len(pairs))) if probes else None
    meta = {"benchmark": "ment", "method": cfg.editor.method, "model": cfg.model.name, "patch_file": str(patch_path),
            "probe_file": str(probe_path) if probes else None, "seconds": time.perf_counter() - started,
            "editor": params}
    paths = ment_report(patch, probe, meta, output_dir)
    _log(loggers, {f"ment/{k}": v for k, v in patch["summary"].items()}, len(pairs) + len(probes) + 1)
    if probe:
        _log(loggers, {f"ment/probe/{k}": v for k, v in probe["summary"].items()}, len(pairs) + len(probes) + 1)
    _finish_loggers(loggers, paths.get("png"))
    print(paths["md"].read_text())
    print(f"results, plot and per-pair outcomes in {output_dir}")
    return 0


def _say(message: str) -> None:
    print(f"[lightning-edit code] {message}", file=sys.stderr, flush=True)
