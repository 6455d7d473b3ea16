"""A corpus of bad inputs, the way a new user makes them, through the real CLI: the error contract's tally.

    python bench/bad_inputs.py                 # every case, in this process (cli.main), ~2-4 min
    python bench/bad_inputs.py --subprocess    # each case as `python -m lightning_edit ...` (slow)
    python bench/bad_inputs.py --only data     # one area (data, config, model, component, state, output, resume)

Each case writes its own files under a temporary folder and runs `lightning-edit run <job> ...`
(`run edit` with FT-M or MicroEdit on `toyworld-small`, `run generate` for state folders). Its outcome
is one of issue 13's four categories:

- `one-line exit 2`: exit code 2, one `error:` line on stderr naming what the case expects
  (a file, record, field or key), no traceback;
- `traceback, clear`: a traceback whose last line names that thing;
- `traceback, unclear`: any other traceback;
- `exit 0`: the run went through.

and, separately, whether the run wrote anything (its output folder must not exist afterwards).
The table goes to stdout (and `--out FILE`). `cases()` is also the table of
`tests/jobs/test_errors.py`, which asserts the contract on every case cheap enough for the suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

WORLD = "toyworld-small"
BASE = [f"model.name={WORLD}", "logger=none", "threads=1", "trainer.enable_progress_bar=false",
        "callbacks.locality.enabled=false", "callbacks.examples.enabled=false", "callbacks.plots.enabled=false",
        "data.limit=3", "model.device=cpu"]
FT = ["config=baselines/ft.yaml"]
MICRO = ["config=microedit.yaml", "component.hookpoint=layers.0"]

ODD_YAML = "dataa:\n  limit: 3\n"
OUTCOMES = ("one-line exit 2", "traceback, clear", "traceback, unclear", "exit 0")


@dataclass
class Case:
    """One bad input: `build(tmp)` writes what it needs under `tmp` and returns the CLI arguments
    after `run`; `names` is what the message must mention (a path, a key, a record)."""

    area: str
    name: str
    build: Callable[[Path], list[str]]
    names: Callable[[Path], str]
    slow: bool = False
    """Takes seconds (the Trainer, lm-eval's task index, a hub look-up that waits for the network
    unless HF_HUB_OFFLINE=1): kept out of the test table."""
    needs_state: bool = False
    """Uses the valid edit state made once at the start."""


@dataclass
class Outcome:
    case: Case
    rc: int
    stderr: str
    outcome: str
    wrote: bool
    seconds: float
    message: str = field(default="")


# Files -------------------------------------------------------------------------------------------


def world_records(n: int = 4) -> list[dict]:
    """The first `n` CounterFact records of the test world (valid), to be spoiled by the cases."""
    from lightning_edit.world import load_world

    return json.loads(load_world(WORLD).counterfact_path.read_text())[:n]


def easy(prompt="At home Viahand Guba keeps a pet", target="parrot", subject="Viahand Guba", **more) -> dict:
    record = {"prompt": prompt, "target_new": target, "subject": subject}
    record.update(more)
    return record


def write(tmp: Path, name: str, content) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return path


def data_case(area: str, name: str, name_of: str, content, filename: str = "edits.json", extra=(), method=FT,
              slow=False, names: str | None = None) -> Case:
    """A case whose data file holds `content`; the message must name the file plus `name_of` (or `names`)."""
    def build(tmp: Path) -> list[str]:
        return ["edit", *method, *BASE, f"data.path={write(tmp, filename, content)}", f"output_dir={tmp / 'out'}",
                *[a.format(tmp=tmp) for a in extra]]
    return Case(area, name, build, lambda tmp: names.format(tmp=tmp) if names else f"{filename}{name_of}", slow=slow)


def config_case(name: str, args: list[str], names: str, method=FT, slow=False) -> Case:
    def build(tmp: Path) -> list[str]:
        return ["edit", *method, *BASE, f"output_dir={tmp / 'out'}", *[a.format(tmp=tmp) for a in args]]
    return Case("config", name, build, lambda tmp: names.format(tmp=tmp), slow=slow)


def model_case(name: str, model: str, names: str, slow: bool = False) -> Case:
    """`model.name=<model>` with an edit file of its own (a model that is no world has no default edits)."""
    def build(tmp: Path) -> list[str]:
        return ["edit", *FT, *BASE, f"model.name={model.format(tmp=tmp)}", f"output_dir={tmp / 'out'}",
                f"data.path={write(tmp, 'edits.json', [easy()])}"]
    return Case("model", name, build, lambda tmp: names, slow=slow)


def coder_folder(tmp: Path, spoil: Callable[[dict, Path], None] | None = None, d_in: int = 64,
                 mode: str = "sae") -> Path:
    """A random top-k SAE (or transcoder) for the world's width at layers.0, spoiled by `spoil(tensors, folder)`."""
    import torch
    from safetensors.torch import save_file

    from lightning_edit.sparse import save_sparsify
    from lightning_edit.sparse.coder import TopKSparseCoder
    from lightning_edit.sparse.config import SparseCoderConfig

    torch.manual_seed(0)
    folder = tmp / "sae" / "layers.0"
    coder = TopKSparseCoder(SparseCoderConfig(d_in=d_in, num_latents=128, k=8, mode=mode))
    save_sparsify(coder, folder)
    if spoil is not None:
        tensors = {k: v.clone() for k, v in coder.state_dict().items()}
        spoil(tensors, folder)
        if tensors:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae.safetensors"))
    return folder


def component_case(name: str, spoil=None, names: str = "sae.safetensors", extra=(), **coder) -> Case:
    def build(tmp: Path) -> list[str]:
        folder = coder_folder(tmp, spoil, **coder)
        return ["edit", *MICRO, *BASE, f"component.path={folder}", f"output_dir={tmp / 'out'}", *extra]
    return Case("component", name, build, lambda tmp: names)


def poison(key: str, value: float):
    def spoil(tensors: dict, folder: Path) -> None:
        tensors[key].view(-1)[3] = value
    return spoil


def state_case(name: str, spoil: Callable[[Path], None], names: str) -> Case:
    """`run generate` on a copy of the valid edit state, spoiled by `spoil(folder)`."""
    def build(tmp: Path) -> list[str]:
        import shutil

        folder = tmp / "state"
        shutil.copytree(STATE["dir"], folder)
        spoil(folder)
        return ["generate", f"state={folder}", "prompt=At home Viahand Guba keeps a pet", "device=cpu"]
    return Case("state", name, build, lambda tmp: names.format(tmp=tmp), needs_state=True)


STATE: dict[str, Path] = {}


def make_state(tmp: Path) -> Path:
    """A valid edit state (FT-M, 2 edits on the test world), made once."""
    from lightning_edit.cli import main

    out = tmp / "valid"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["run", "edit", *FT, *BASE, "data.limit=2", f"output_dir={out}", "trainer.enable_checkpointing=false"])
    if rc != 0:
        raise SystemExit(f"bad_inputs: the valid reference run failed (exit {rc})")
    STATE["dir"] = out / "edit_state"
    return STATE["dir"]


def _spoil_json(name: str, text: str):
    return lambda folder: (folder / name).write_text(text)


def _nan_state(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "tensors.safetensors"))
    key = sorted(tensors)[0]
    tensors[key].view(-1)[0] = math.nan
    save_file(tensors, str(folder / "tensors.safetensors"))


def _remove(name: str):
    return lambda folder: (folder / name).unlink()


def _fake_checkpoint(kind: str):
    def build(tmp: Path) -> list[str]:
        import pickle

        import torch

        path = tmp / "given.ckpt"
        if kind == "garbage":
            path.write_bytes(b"not a checkpoint at all")
        elif kind == "pickle":
            path.write_bytes(pickle.dumps(subprocess.Popen))  # a global no weights-only load accepts
        else:
            torch.save({"state_dict": {}, "epoch": 0}, path)
        return ["edit", *FT, *BASE, f"output_dir={tmp / 'out'}", f"checkpoint.resume={path}"]
    return build


# The corpus --------------------------------------------------------------------------------------


def cases() -> list[Case]:
    long_prompt = "At home " + " ".join(["Viahand Guba"] * 600) + " keeps a pet"
    cf = world_records(4)
    cf_no_braces = json.loads(json.dumps(cf))
    cf_no_braces[1]["requested_rewrite"]["prompt"] = "At home keeps a pet"
    cf_no_true = json.loads(json.dumps(cf))
    del cf_no_true[2]["requested_rewrite"]["target_true"]
    out: list[Case] = [
        # Data files: the file itself.
        Case("data", "missing data file", lambda t: ["edit", *FT, *BASE, f"data.path={t / 'nope.json'}",
                                                     f"output_dir={t / 'out'}"], lambda t: "nope.json"),
        Case("data", "a folder as data.path", lambda t: ["edit", *FT, *BASE, f"data.path={t}",
                                                         f"output_dir={t / 'out'}"], lambda t: str(t)),
        data_case("data", "empty .json file", "", ""),
        data_case("data", "JSON syntax error", "", '[{"prompt": "a", "target_new": "b",}]'),
        data_case("data", "top level is an object", "", {"prompt": "a", "target_new": "b"}),
        data_case("data", "several JSON documents in a .json", "", '{"prompt": "a b", "target_new": "c"}\n'
                  '{"prompt": "d e", "target_new": "f"}\n'),
        data_case("data", "bad line in .jsonl", ": record 1 (line 3)",
                  json.dumps(easy()) + "\n\n{oops\n", filename="edits.jsonl"),
        data_case("data", ".jsonl line is an array", ": record 1 (line 2)",
                  json.dumps(easy()) + "\n[1, 2]\n", filename="edits.jsonl"),
        data_case("data", ".txt data file", "", "prompt\ttarget\n", filename="edits.txt"),
        data_case("data", "not UTF-8", "", b"\xff\xfe[{\x00", filename="edits.json"),
        data_case("data", "empty array", "", []),
        data_case("data", "record is a string", ": record 1", [easy(), "At home X keeps a pet"]),
        data_case("data", "record missing prompt", ": record 1", [easy(), {"target_new": "cat", "subject": "X"}]),
        data_case("data", "record missing target_new", ": record 2", [easy(), easy(), {"prompt": "a b c"}]),
        data_case("data", "target_new is a number", ": record 0", [easy(target=7)]),
        data_case("data", "target_new empty", ": record 1", [easy(), easy(target="")]),
        data_case("data", "prompt only spaces", ": record 1", [easy(), easy(prompt="   ")]),
        data_case("data", "rephrase list holds a number", ": record 0", [easy(rephrase_prompt=["ok a", 3])]),
        data_case("data", "locality lists of different lengths", ": record 0",
                  [easy(locality_prompt=["a b", "c d"], locality_ground_truth=["x"])]),
        data_case("data", "nested locality not an object", ": record 0", [easy(locality=["a"])]),
        data_case("data", "unknown record kind", ": record 0", [easy(kind="opinion")]),
        data_case("data", "case_id is a list", ": record 0", [easy(case_id=[1])]),
        data_case("data", "extra is a string", ": record 0", [easy(extra="x")]),
        data_case("data", "keys of no known format", ": record 0", [{"question": "a", "answer": "b"}]),
        data_case("data", "CounterFact template without {}", ": record 1", cf_no_braces),
        data_case("data", "CounterFact record without target_true", ": record 2", cf_no_true),
        data_case("data", "zsre record without alt", ": record 1",
                  [{"src": "a b", "alt": "c", "subject": "a"}, {"src": "d e", "subject": "d"}]),
        data_case("data", "data.format does not exist", "", [easy()], extra=["data.format=squad"], names="data.format"),
        data_case("data", "data.format of another dataset", ": record 0", [easy()], extra=["data.format=zsre"]),
        data_case("data", "corpus file missing", "", [easy()], extra=["data.corpus={tmp}/corpus.txt"],
                  names="corpus.txt"),
        # Records against the model's tokenizer and context.
        data_case("record", "target maps to <unk>", ": record 1", [easy(), easy(target="zzqx")]),
        data_case("record", "subject maps to <unk>", ": record 0", [easy(subject="Qwzzy", prompt="At home Qwzzy "
                                                                      "keeps a pet")]),
        data_case("record", "Arabic-only prompt", ": record 1", [easy(), easy(prompt="قال أحمد مرحبا",
                                                                              subject=None)]),
        data_case("record", "prompt longer than the context", ": record 0", [easy(prompt=long_prompt)]),
        data_case("record", "paraphrase longer than the context", ": record 0",
                  [easy(rephrase_prompt=[long_prompt])]),
        data_case("record", "locality prompt longer than the context", ": record 0",
                  [easy(locality_prompt=[long_prompt], locality_ground_truth=["ferret"])]),
        data_case("record", "duplicates under data.strict", "", [easy(), easy(), easy()],
                  extra=["data.strict=true"]),
        data_case("record", "conflicting targets under data.strict", "", [easy(), easy(target="cat")],
                  extra=["data.strict=true"]),
        data_case("record", "subject absent under data.strict", "", [easy(subject="Somebody Else")],
                  extra=["data.strict=true"]),
        data_case("record", "target of an invisible character", ": record 0", [easy(target="\u200b")]),
        # Config keys and values.
        config_case("unknown top-level key", ["lerning_rate=1"], "lerning_rate"),
        config_case("unknown nested key", ["data.lmit=3"], "data.lmit"),
        config_case("wrong type", ["data.limit=abc"], "data.limit"),
        config_case("data.limit=0", ["data.limit=0"], "data.limit"),
        config_case("data.limit negative", ["data.limit=-5"], "data.limit"),
        config_case("data.batch_size=0", ["data.batch_size=0"], "data.batch_size"),
        config_case("batch for a one-at-a-time editor", ["data.batch_size=2"], "data.batch_size",
                    method=["config=baselines/rome.yaml"]),
        config_case("unknown editor method", ["editor.method=romeo"], "romeo"),
        config_case("unknown editor key", ["editor.lr_rate=1"], "editor.lr_rate"),
        config_case("editor value of the wrong type", ["editor.lr=fast"], "editor.lr"),
        config_case("editor layer the model lacks", ["editor.layer=99"], "editor.layer"),
        config_case("config file missing", ["config=nope.yaml"], "nope.yaml"),
        Case("config", "config file with bad YAML",
             lambda t: ["edit", f"config={write(t, 'bad.yaml', 'data: [1, 2')}", *BASE[1:], f"output_dir={t / 'out'}"],
             lambda t: "bad.yaml"),
        Case("config", "config file with an unknown key",
             lambda t: ["edit", f"config={write(t, 'odd.yaml', ODD_YAML)}", *BASE,
                        f"output_dir={t / 'out'}"], lambda t: "dataa"),
        config_case("argument without =", ["limit"], "limit"),
        config_case("logger unknown", ["logger=tensorboardx"], "logger"),
        config_case("trainer option unknown", ["trainer.max_stepz=3"], "max_stepz"),
        config_case("trainer.max_epochs=2", ["trainer.max_epochs=2"], "max_epochs", slow=True),
        config_case("eval.checkpoints=[0]", ["eval.checkpoints=[0]"], "eval.checkpoints"),
        config_case("eval.checkpoints above T", ["eval.checkpoints=[1,5000]"], "eval.checkpoints"),
        config_case("eval.checkpoints negative", ["eval.checkpoints=[-1]"], "eval.checkpoints"),
        config_case("eval.checkpoints not a list", ["eval.checkpoints=abc"], "eval.checkpoints"),
        config_case("eval.batch_size=0", ["eval.batch_size=0"], "eval.batch_size"),
        config_case("checkpoint.every_n_edits=0", ["checkpoint.every_n_edits=0"], "checkpoint.every_n_edits"),
        config_case("on_nonfinite unknown", ["on_nonfinite=maybe"], "on_nonfinite"),
        config_case("locality callback at T=-1", ["callbacks.locality.enabled=true", "callbacks.locality.at=[-1]"],
                    "callbacks.locality.at"),
        config_case("locality prompts file missing", ["callbacks.locality.enabled=true",
                                                      "callbacks.locality.prompts_path={tmp}/loc.txt"],
                    "loc.txt", slow=True),
        config_case("downstream task unknown", ["callbacks.downstream.enabled=true",
                                                "callbacks.downstream.tasks=[nosuchtask]"], "nosuchtask", slow=True),
        config_case("job unknown", [], "nosuchjob"),
        # The model.
        config_case("model dtype unknown", ["model.dtype=float8"], "float8"),
        model_case("model folder missing", "{tmp}/model", "model"),
        Case("model", "model folder without config.json",
             lambda t: ["edit", *FT, *BASE, f"model.name={write(t, 'm/x.txt', 'x').parent}", f"output_dir={t / 'out'}",
                        f"data.path={write(t, 'edits.json', [easy()])}"],
             lambda t: "config.json"),
        model_case("model hub id unreachable", "nosuchorg/nosuchmodel", "nosuchorg/nosuchmodel", slow=True),
        config_case("model.device=cuda without a GPU", ["model.device=cuda:7"], "model.device"),
        config_case("model.device nonsense", ["model.device=gpu0"], "model.device"),
        # Components.
        Case("component", "component folder missing",
             lambda t: ["edit", *MICRO, *BASE, f"component.path={t / 'nosae'}", f"output_dir={t / 'out'}"],
             lambda t: "nosae"),
        Case("component", "component folder empty",
             lambda t: ["edit", *MICRO, *BASE, f"component.path={write(t, 'empty/.keep', '').parent}",
                        f"output_dir={t / 'out'}"], lambda t: "empty"),
        component_case("component cfg.json broken", lambda ts, f: ((f / "cfg.json").write_text("{oops"), ts.clear()),
                       names="cfg.json"),
        component_case("component weights truncated",
                       lambda ts, f: ((f / "sae.safetensors").write_bytes((f / "sae.safetensors").read_bytes()[:100]),
                                      ts.clear())),
        component_case("NaN in W_dec", poison("W_dec", math.nan), names="W_dec"),
        component_case("Inf in encoder.bias", poison("encoder.bias", math.inf), names="encoder.bias"),
        component_case("NaN in b_dec", poison("b_dec", math.nan), names="b_dec"),
        component_case("component of another width", d_in=32, names="layers.0"),
        component_case("a transcoder where an SAE is needed", mode="transcoder", names="transcoder"),
        component_case("component at a hookpoint the model lacks", names="layers.9",
                       extra=["component.hookpoint=layers.9"]),
        # Output folders.
        Case("output", "output_dir is a file",
             lambda t: ["edit", *FT, *BASE, f"output_dir={write(t, 'taken', 'x')}"], lambda t: "taken"),
        Case("output", "output_dir under a file",
             lambda t: ["edit", *FT, *BASE, f"output_dir={write(t, 'file', 'x')}/sub"], lambda t: "file"),
        Case("output", "output_dir on a read-only file system",
             lambda t: ["edit", *FT, *BASE, "output_dir=/proc/lightning-edit-run"], lambda t: "/proc"),
        # Resuming.
        Case("resume", "checkpoint.resume file missing",
             lambda t: ["edit", *FT, *BASE, f"output_dir={t / 'out'}", f"checkpoint.resume={t}/x.ckpt"],
             lambda t: "x.ckpt"),
        Case("resume", "checkpoint.resume not a checkpoint", _fake_checkpoint("garbage"), lambda t: "given.ckpt"),
        Case("resume", "checkpoint.resume a malicious pickle", _fake_checkpoint("pickle"), lambda t: "given.ckpt"),
        Case("resume", "checkpoint.resume of another job", _fake_checkpoint("other"), lambda t: "given.ckpt"),
        # Edit state folders (`run generate`).
        Case("state", "state folder missing", lambda t: ["generate", f"state={t}/nostate", "prompt=a"],
             lambda t: "nostate"),
        Case("state", "generate without a prompt", lambda t: ["generate", f"state={t}"], lambda t: "prompt"),
        state_case("state folder without tensors", _remove("tensors.safetensors"), "tensors.safetensors"),
        state_case("editor.json broken", _spoil_json("editor.json", "{"), "editor.json"),
        state_case("editor.json of another version", _spoil_json("editor.json", json.dumps(
            {"format_version": 99, "method": "ft"})), "format_version"),
        state_case("state.json broken", _spoil_json("state.json", "[1,"), "state.json"),
        state_case("tensors file corrupt", lambda f: (f / "tensors.safetensors").write_bytes(b"\x00" * 64),
                   "tensors.safetensors"),
        state_case("NaN in a state tensor", _nan_state, "tensors.safetensors"),
        state_case("state of an unknown method", lambda f: (f / "editor.json").write_text(json.dumps(
            {**json.loads((f / "editor.json").read_text()), "method": "nosuchmethod"})), "nosuchmethod"),
    ]
    # `job unknown` runs another job name than edit:
    for case in out:
        if case.name == "job unknown":
            case.build = lambda t: ["nosuchjob", *BASE]
    return out


# Running ------------------------------------------------------------------------------------------


def run_case(case: Case, tmp: Path, subprocess_mode: bool = False) -> Outcome:
    tmp.mkdir(parents=True, exist_ok=True)
    argv = ["run", *case.build(tmp)]
    start = time.perf_counter()
    if subprocess_mode:
        proc = subprocess.run([sys.executable, "-m", "lightning_edit", *argv], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        rc, err = proc.returncode, proc.stderr
    else:
        rc, err = run_in_process(argv)
    seconds = time.perf_counter() - start
    expected = case.names(tmp)
    lines = [line for line in err.splitlines() if line.strip()]
    traced = any(line.startswith("Traceback") for line in lines)
    errors = [line for line in lines if line.startswith("error:")]
    if rc == 0:
        outcome = "exit 0"
    elif rc == 2 and not traced and len(errors) == 1 and expected in errors[0]:
        outcome = "one-line exit 2"
    elif traced and lines and expected in lines[-1]:
        outcome = "traceback, clear"
    else:
        outcome = "traceback, unclear"
    message = errors[0] if errors else (lines[-1] if lines else "")
    return Outcome(case, rc, err, outcome, (tmp / "out").exists(), seconds, message)


def run_in_process(argv: list[str]) -> tuple[int, str]:
    """`lightning-edit <argv>` in this process: (exit code, stderr); an uncaught exception is a
    traceback on stderr and exit 1, as the interpreter would make it."""
    from lightning_edit.cli import main
    from lightning_edit.runtime import RUN_DIR_ENV

    err = io.StringIO()
    os.environ.pop(RUN_DIR_ENV, None)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except Exception:  # noqa: BLE001 - what the interpreter would print
            traceback.print_exc()
            rc = 1
    return int(rc or 0), err.getvalue()


def table(outcomes: list[Outcome]) -> str:
    counts = {o: sum(1 for x in outcomes if x.outcome == o) for o in OUTCOMES}
    wrote = sum(1 for x in outcomes if x.wrote)
    lines = ["| outcome | cases |", "|---|---:|"] + [f"| {o} | {counts[o]} |" for o in OUTCOMES]
    lines += [f"| (wrote an output folder) | {wrote} |", "", "| area | case | outcome | exit | s | message |",
              "|---|---|---|---:|---:|---|"]
    for x in outcomes:
        msg = x.message.replace("|", "\\|")[:160]
        lines.append(f"| {x.case.area} | {x.case.name} | {x.outcome} | {x.rc} | {x.seconds:.1f} | {msg} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subprocess", action="store_true", help="one `python -m lightning_edit` per case")
    parser.add_argument("--only", help="one area: data, record, config, model, component, output, resume, state")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    chosen = [c for c in cases() if not args.only or c.area == args.only]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="bad-inputs-") as root:
        if any(c.needs_state for c in chosen):
            make_state(Path(root))
        for i, case in enumerate(chosen):
            outcome = run_case(case, Path(root) / f"case{i:03d}", args.subprocess)
            print(f"[{i + 1}/{len(chosen)}] {case.area}: {case.name}: {outcome.outcome}", file=sys.stderr, flush=True)
            outcomes.append(outcome)
    command = "python bench/bad_inputs.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    text = f"# Bad inputs through the CLI ({len(outcomes)} kinds)\n\n`{command}`\n\n" + table(outcomes)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
