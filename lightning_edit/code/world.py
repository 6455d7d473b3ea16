"""The embedded code world: template programs, a tiny code LM that translates Java to D with
controlled systematic mistakes, and the KECode and MENT exports, built on first use and cached.

`model.name=codeworld` (or `codeworld-small`, for tests) resolves here through `lightning_edit.world`,
so the edit job, the sparse-coder jobs and every editor load the code LM like any HF model. A build
(`build_code_world`, under the world cache's lock and atomic rename, `world.build.build_cached`):

1. draws disjoint sets of programs (`programs.py`): training, validation, KECode samples, MENT data
   pairs and probe prompts (no Java text in two sets);
2. makes a whitespace-split word-level tokenizer over every code token;
3. trains the LM on the training programs in the interleaved format (`format.py`, `train.py`) with the
   training D, whose systematic mistakes it learns;
4. compiles and tests every exported D reference with `ldc2` (`compiler.py`; the probe programs once
   the probe prompts are chosen): the build fails if one does not pass its tests;
5. translates the KECode samples with the LM, compiles and tests the translations, clusters the
   compiler errors (`clusters.py`) and writes the samples with their clusters;
6. builds MENT's patch sets (the LM's next-token errors on reference-prefixed lines) and its probe
   benchmark (operator positions by subtype, each with three target tokens).

A built world folder holds:

| path | what |
| --- | --- |
| `model/` | HF model folder (config, safetensors, tokenizer) |
| `codeworld.json` | spec, sizes, build times, the LM's accuracy, translation compile / test-pass rates (written last) |
| `data/kecode.json` | KECode samples: `java`, `d_reference`, `tests`, `cluster`, the LM's translation (`d_generated`, and `d_lines` line by line), ... |
| `data/clusters.json` | the error clusters: id, normalised signature, size, an example |
| `data/ment_patch.json`, `data/ment_probe.json` | MENT's patch sets and probe benchmark |
| `data/corpus.txt` | the training programs in the LM's format, one per line (statistics, sparse coders) |
| `data/train_programs.json` | the training programs (Java, D, training D) |
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

from lightning_edit.world.build import WorldBuildError, WorldFolder, build_cached, cache_root
from lightning_edit.world.spec import ModelShape

from .format import SPECIAL_TOKENS, d_source, prompt, sequence, statement_pairs
from .lexer import canonical, lines, pretty
from .programs import MISTAKES, TEMPLATES, Program, d_unittest, generate_programs
from .train import CodeTrainRecipe

CODE_FORMAT_VERSION = 1
"""Bumped when a built code world's layout or contents change; part of its cache folder name."""

SUBTYPES: dict[str, tuple[str, tuple[str, str, str]]] = {
    "assign": ("=", ("+=", "*=", "~=")),
    "assign_multiply": ("*=", ("+=", "~=", "==")),
    "arithmetic_mod": ("%", ("+", "*", "/")),
    "bit_logical_and": ("&", ("<<", "^", "&&")),
    "comparison_ge": (">=", ("<=", "==", "!=")),
}
"""MENT's Expression subtypes (seeds/001, Table II): the argmax token and three target tokens, as
D tokens this world's LM knows (the paper's `~` and `%` targets for `=` are `~=` / `*=` here; `/=`,
`|` and `!=` after `*=` never occur in D translations of these programs)."""


@dataclass(frozen=True)
class CodeWorldShape:
    n_train: int
    n_kecode: int
    n_ment: int
    """Programs whose lines are MENT's data pairs."""
    n_valid: int = 100
    probe_prompts: int = 10
    """Prompts per MENT subtype (each with 3 targets: 30 probe samples per subtype, as the paper)."""
    pool: int | None = 3
    """Names per slot pool (programs.py); fewer names are learnt faster by a tiny LM."""
    mistake_rate: float = 0.8
    """Share of training programs with an idiom whose training D makes its systematic mistake."""
    cluster_min_size: int = 3
    """Error signatures with fewer KECode samples share the cluster `other`."""


@dataclass(frozen=True)
class CodeWorldSpec:
    world: CodeWorldShape
    model: ModelShape
    train: CodeTrainRecipe = field(default_factory=CodeTrainRecipe)


CODE_SPECS: dict[str, CodeWorldSpec] = {
    "codeworld": CodeWorldSpec(
        world=CodeWorldShape(n_train=1600, n_kecode=600, n_ment=60),
        model=ModelShape(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                         max_position_embeddings=512),
        train=CodeTrainRecipe(epochs=12),
    ),
    "codeworld-small": CodeWorldSpec(
        world=CodeWorldShape(n_train=1000, n_kecode=80, n_ment=12, n_valid=40, probe_prompts=4),
        model=ModelShape(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384,
                         max_position_embeddings=512),
        train=CodeTrainRecipe(epochs=14, required_accuracy=0.85),
    ),
}


def _spec(name: str) -> CodeWorldSpec:
    if name not in CODE_SPECS:
        raise ValueError(f"unknown code world '{name}'; choices: {', '.join(CODE_SPECS)}")
    return CODE_SPECS[name]


def code_world_dir(name: str, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    _spec(name)
    return cache_root(cache_dir) / "worlds" / f"{name}-seed{seed}-v{CODE_FORMAT_VERSION}"


def exec_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where compile-and-test results are cached (by compiler version, source and tests)."""
    return cache_root(cache_dir) / "code_exec"


def _is_built(root: Path) -> bool:
    return (root / "codeworld.json").is_file()


def program_from_sample(sample: dict) -> Program:
    """A KECode / MENT sample's program (the harness needs Java, the D reference and the tests)."""
    java, d = canonical(sample["java"]), canonical(sample["d_reference"])
    return Program(template=sample.get("template", "?"), category=sample.get("category", "?"), fn=sample.get("fn", ""),
                   java=java, d=d, dtrain=d, tests=[], mistakes=list(sample.get("mistakes", [])),
                   returns=sample.get("returns", "?"))


@dataclass
class CodeWorld(WorldFolder):
    """A built code world on disk (`model/`, `data/`, `codeworld.json`)."""

    record: dict

    @classmethod
    def open(cls, root: str | Path) -> "CodeWorld":
        root = Path(root)
        if not _is_built(root):
            raise FileNotFoundError(f"{root} is not a built code world (no codeworld.json)")
        return cls(root=root, record=json.loads((root / "codeworld.json").read_text()))

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def summary(self) -> str:
        t = self.record["translation"]
        return (f"held-out D-token accuracy {self.record['d_token_accuracy']:.4f}; translations compile "
                f"{t['compile_rate']:.1%}, pass {t['pass_rate']:.1%}; {len(self.record['clusters'])} error clusters")

    @property
    def kecode_path(self) -> Path:
        return self.data_dir / "kecode.json"

    @property
    def clusters_path(self) -> Path:
        return self.data_dir / "clusters.json"

    @property
    def ment_patch_path(self) -> Path:
        return self.data_dir / "ment_patch.json"

    @property
    def ment_probe_path(self) -> Path:
        return self.data_dir / "ment_probe.json"

    sparse_overrides = ("data.context_length=256", "data.batch_size=32", "trainer.max_steps=200")
    """Sparse-coder job overrides for the default SAE / transcoder trained on this world (editors read
    them): a program is ~100-200 tokens, longer than the jobs' default context of 64; 200 steps of 32
    programs see the 1,600-program corpus four times (on `codeworld`, layer 1's transcoder after 200
    steps of 64: FVU 0.21, and splicing it in changed the cluster of 3 of 600 translations)."""

    @property
    def kb(self):
        """No knowledge base: editors that fill prompts from relation templates (PNKE) find none."""
        return SimpleNamespace(relations=())


def _say(message: str) -> None:
    print(f"[lightning-edit codeworld] {message}", file=sys.stderr, flush=True)


# --- tokenizer ------------------------------------------------------------------------------------------


def make_tokenizer(texts: list[str], extra: list[str], model_max_length: int):
    """Word-level tokenizer over whitespace-split code tokens (every token of `texts` and `extra`, most
    frequent first), <bos> prepended like Llama's."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    counts = Counter(tok for text in texts for tok in text.split())
    for tok in extra:
        counts.setdefault(tok, 0)
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in SPECIAL_TOKENS]
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=model_max_length, padding_side="right")


# --- building ---------------------------------------------------------------------------------------------


def _programs(spec: CodeWorldSpec, seed: int) -> dict[str, list[Program]]:
    w = spec.world
    out: dict[str, list[Program]] = {}
    seen: set[str] = set()
    for split, n in (("train", w.n_train), ("valid", w.n_valid), ("kecode", w.n_kecode), ("ment", w.n_ment),
                     ("probe", 6 * w.probe_prompts * len(SUBTYPES))):
        out[split] = generate_programs(n, seed, split, exclude=seen, pool=w.pool, mistake_rate=w.mistake_rate)
        seen |= {p.java for p in out[split]}
    return out


def _sample_json(i: int, p: Program) -> dict:
    tests = [t.to_json(p.fn) for t in p.tests]
    return {"id": i, "template": p.template, "category": p.category, "fn": p.fn, "returns": p.returns,
            "java": pretty(p.java), "d_reference": pretty(_imports_first(p.d)), "tests": tests,
            "unittest": d_unittest(tests), "training_mistakes": p.mistakes}


def _imports_first(code: str) -> str:
    return " ".join(" ".join(line) for line in sorted(lines(code), key=lambda line: line[0] != "import"))


def _build_into(out: Path, name: str, seed: int, progress: bool, cache_dir: str | Path | None) -> dict:
    import torch

    from lightning_edit.world.tokenizer import save_tokenizer

    from .clusters import ErrorClusters, declared_names, signature
    from .compiler import DRunner, Unit
    from .train import d_token_accuracy, train_code_model
    from .translate import model_generate, translate

    spec = _spec(name)
    start = time.perf_counter()
    runner = DRunner(cache_dir=exec_cache_dir(cache_dir))
    programs = _programs(spec, seed)
    texts = [sequence(statement_pairs(p, "dtrain")) for p in programs["train"]]
    every = [p for split in programs.values() for p in split]
    extra = [tok for p in every for text in (p.java, p.d) for tok in text.split()]
    extra += [t for _, (a, targets) in SUBTYPES.items() for t in (a, *targets)]
    tokenizer = make_tokenizer(texts, extra, spec.model.max_position_embeddings)
    data = out / "data"
    data.mkdir(parents=True)
    (data / "corpus.txt").write_text("\n".join(texts) + "\n")
    (data / "train_programs.json").write_text(json.dumps(
        [{"template": p.template, "java": p.java, "d": p.d, "dtrain": p.dtrain, "mistakes": p.mistakes}
         for p in programs["train"]], indent=0) + "\n")

    # 4 first: a broken reference should fail the build before minutes of training
    exported = programs["kecode"] + programs["ment"]
    _say(f"compiling and testing {len(exported)} D references with {runner.version} ...")
    _check_references(name, runner, exported, progress)

    _say(f"training the {name} code LM on {len(texts)} programs ({len(TEMPLATES)} templates) ...")
    result = train_code_model(texts, tokenizer, spec.model, spec.train, seed, log_dir=out / "logs", progress=progress)
    model = result.model
    valid_texts = [sequence(statement_pairs(p, "dtrain")) for p in programs["valid"]]
    with torch.no_grad():
        accuracy = d_token_accuracy(model, tokenizer, valid_texts)
    if accuracy < spec.train.required_accuracy:
        raise WorldBuildError(f"code world '{name}' (seed {seed}): the LM predicts {accuracy:.1%} of held-out D tokens "
                              f"after {spec.train.epochs} epochs; required {spec.train.required_accuracy:.0%}")
    model.save_pretrained(out / "model")
    save_tokenizer(tokenizer, out / "model")
    for path in (out / "model").iterdir():
        path.chmod(0o644)

    # 5: KECode samples, translated by the LM, compiled, tested and clustered
    generate = model_generate(model, tokenizer)
    kecode = programs["kecode"]
    _say(f"translating {len(kecode)} KECode samples and compiling the translations ...")
    d_lines = translate(generate, kecode, progress=progress)
    units = [Unit(f"k{i}", d_source(ls), [t.to_json(p.fn) for t in p.tests]) for i, (p, ls) in enumerate(zip(kecode, d_lines))]
    results = runner.evaluate(units, progress=progress)
    sigs = [signature(r.errors, declared_names(u.source, p.d)) for u, r, p in zip(units, results, kecode)]
    clusters = ErrorClusters(min_size=spec.world.cluster_min_size).fit(sigs)
    samples = []
    for i, (p, u, r, sig) in enumerate(zip(kecode, units, results, sigs)):
        s = _sample_json(i, p)
        s.update({"d_generated": pretty(u.source), "compiled": r.compiled, "tests_passed": sum(r.tests),
                  "errors": r.errors[:3], "error_signature": sig, "cluster": clusters.assign(sig),
                  "d_lines": d_lines[i]})
        samples.append(s)
    (data / "kecode.json").write_text(json.dumps(samples, indent=1) + "\n")
    cluster_json = clusters.to_json()
    for c in cluster_json["clusters"]:
        example = next(s for s in samples if s["cluster"] == c["id"])
        c["example"] = {"id": example["id"], "error": example["errors"][0], "d_generated": example["d_generated"]}
    (data / "clusters.json").write_text(json.dumps(cluster_json, indent=1) + "\n")

    # 6: MENT's patch sets and probes
    from .ment_sets import build_patch_sets, build_probe_set

    patch = build_patch_sets(generate, programs["ment"], tokenizer)
    (data / "ment_patch.json").write_text(json.dumps(patch, indent=1) + "\n")
    probe = build_probe_set(model, tokenizer, programs["probe"], SUBTYPES, spec.world.probe_prompts, seed)
    _check_references(name, runner, [programs["probe"][i] for i in sorted({p["program"] for p in probe})], progress)
    (data / "ment_probe.json").write_text(json.dumps(probe, indent=1) + "\n")

    n = len(results)
    record = {
        "name": name, "seed": seed, "format_version": CODE_FORMAT_VERSION,
        "build_seconds": round(time.perf_counter() - start, 2), "train_seconds": round(result.seconds, 2),
        "steps": result.steps, "threads": result.threads, "compiler": runner.version,
        "sandbox_confines_writes": runner.sandbox.confines_writes,
        "d_token_accuracy": round(accuracy, 4),
        "translation": {"compile_rate": sum(r.compiled for r in results) / n,
                        "pass_rate": sum(r.passed for r in results) / n,
                        "test_pass_rate": sum(r.pass_rate for r in results) / n},
        "clusters": {c["id"]: {"size": c["size"], "signature": c["signature"]} for c in cluster_json["clusters"]},
        "other": cluster_json["other"],
        "ment": {"data_pairs": len(patch), "errors": sum(p["error"] is not None for p in patch),
                 "probe_samples": len(probe)},
        "sizes": {split: len(ps) for split, ps in programs.items()} | {
            "vocab_size": len(tokenizer), "n_params": sum(p.numel() for p in model.parameters()),
            "templates": len(TEMPLATES), "mistakes": list(MISTAKES)},
        "model": asdict(spec.model), "train": asdict(spec.train), "world": asdict(spec.world),
    }
    (out / "codeworld.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _check_references(name: str, runner, programs: list[Program], progress: bool) -> None:
    """Every program's D reference compiles and passes its tests, or WorldBuildError."""
    from .compiler import Unit

    units = [Unit(f"ref{i}", d_source([d for _, d in statement_pairs(p, "d")]), [t.to_json(p.fn) for t in p.tests])
             for i, p in enumerate(programs)]
    failed = [(p, r) for p, r in zip(programs, runner.evaluate(units, progress=progress)) if not r.passed]
    if failed:
        p, r = failed[0]
        raise WorldBuildError(f"code world '{name}': {len(failed)} D references fail their tests, e.g. template "
                              f"{p.template}: {r.status} {r.errors[:1]} tests {r.tests}")


def build_code_world(name: str = "codeworld", seed: int = 0, cache_dir: str | Path | None = None,
                     force: bool = False, progress: bool = True) -> CodeWorld:
    """Build code world `name` from `seed` into the cache (or reuse it), and open it."""
    from .compiler import find_ldc2

    find_ldc2()  # before taking the lock: no compiler, no world (CompilerMissing says how to install it)
    root = code_world_dir(name, seed, cache_dir)
    record = build_cached(root, lambda tmp: _build_into(tmp, name, seed, progress, cache_dir), _is_built,
                          f"code world '{name}' (seed {seed})", force=force)
    if record is not None:
        t = record["translation"]
        _say(f"code world '{name}' built in {record['build_seconds']:.0f} s (LM {record['train_seconds']:.0f} s, "
             f"{record['d_token_accuracy']:.1%} of held-out D tokens); its translations compile "
             f"{t['compile_rate']:.1%}, pass all tests {t['pass_rate']:.1%}; "
             f"{len(record['clusters'])} error clusters")
    return CodeWorld.open(root)


def load_code_world(name: str = "codeworld", seed: int = 0, cache_dir: str | Path | None = None) -> CodeWorld:
    """Open code world `name`, building it on first use."""
    root = code_world_dir(name, seed, cache_dir)
    if _is_built(root):
        return CodeWorld.open(root)
    _say(f"'{name}' is an embedded code world; building it on first use (cached in {root})")
    return build_code_world(name, seed, cache_dir)
