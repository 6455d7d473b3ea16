"""Every editing method on the same edit stream, through the real edit job, in one table.

Each method in `EDITORS` (or `--methods`) runs `python -m lightning_edit run edit config=<its YAML>`
in its own process (a crash or a bad config fails that method only; its error goes in the table),
with the same world, stream order, seed, T and evaluation checkpoints for all:

    python bench/compare_methods.py                          # all methods, default world, T = 100
    python bench/compare_methods.py --methods ft,rome --model toyworld-small --limit 5 --checkpoints 1,5

A method's YAML is `configs/<method>.yaml` or `configs/baselines/<method>.yaml`; a method without one
is skipped with the reason printed. Runs land in `<runs-dir>/<method>/` (results.json, log.txt,
edit_state/), the table in `--out` (markdown, with the command that made it) and beside it as JSON.

Columns, each labelled with its protocol (lightning_edit/results.py):
- `Rel@T (final)`, `Gen@T (final)`, `Loc@T (final)`: final-state protocol, every edit made so far
  scored on the model as it is after T edits, for each T in `--checkpoints` (`-` when T > the
  stream).
- `Rel (immediate)`, ...: immediate protocol, the mean over all edits of the stream of each edit's
  score taken right after it was applied.
- `landed`: the share of the stream's edits whose target was the argmax (every target token, teacher
  forced) right after the edit (`landed` of the last results row, from `LedgerEntry.landed`).
- `s/edit`: mean wall-clock seconds of `editor.apply` per edit over the stream (the job's own
  timing; evaluation excluded). With `--jobs > 1` the runs share the cores: use `--jobs 1` for timings.
- `units/edit`: mean over ledger entries of the number of indices in `LedgerEntry.changed`, summed
  over its parameters (rows, columns, decoder rows or codebook entries an edit touched).
- `params/edit`: mean over ledger entries (`edit_state/ledger.json`, one per edited record) of
  sum over `changed` of len(indices) x width, the number of numbers in one indexed slice:
  1. `entry.extra["params_changed"]` when an editor records it (it knows best) is used as is;
  2. a 2-D parameter of the model: its indices are rows or columns, whichever axis of the final
     edited weight (the saved edit state reloaded with `load_edited`) minus the base weight has the
     changed-index set closest (Jaccard) to the ledger's indices; width = the other dimension
     (rows of a [d_out, d_in] weight: d_in each; columns / neurons: d_out each);
  3. a tensor the editor owns (a sparse component's `W_dec`, ...) whose attribute path ends with
     the name's last part: an index is one row, width = numel / rows;
  otherwise `?` (the units are still counted). Overlapping edits are counted once per edit.
- `note`: what the ledger says did not happen: edits the method skipped (`extra.skip`, MENT's
  skip-action) or rolled back (`extra.rolled_back`), and edits that did not land, as counts of the
  stream, then any problem collecting the columns.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lightning_edit.constants import EDIT_STATE_DIR, LEDGER_JSON, RESULTS_JSON

REPO = Path(__file__).resolve().parents[1]
METRICS = ("rel", "gen", "loc")
LABEL = {"rel": "Rel", "gen": "Gen", "loc": "Loc"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None, help="comma-separated subset of EDITORS (default: all)")
    p.add_argument("--limit", type=int, default=100, help="T: edits in the stream (data.limit)")
    p.add_argument("--checkpoints", default="1,10,100", help="T values for the final-state columns")
    p.add_argument("--model", default="toyworld", help="model.name for every run (an embedded world by default)")
    p.add_argument("--order-seed", type=int, default=0, help="data.order_seed: the same stream for all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (FINDINGS: 1 for tiny models)")
    p.add_argument("--jobs", type=int, default=1, help="methods run at once (timings are only comparable with 1)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per method before it is stopped")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                   help="extra job override for every run, or for one method with a METHOD: prefix (repeatable)")
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "compare"), help="one run folder per method in here")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "compare_methods.md"),
                   help="markdown table (the JSON goes beside it)")
    p.add_argument("--reuse", action="store_true",
                   help="collect a method's finished run (results.json) instead of re-running it")
    return p.parse_args(argv)


# Finding configs and running jobs ---------------------------------------------------------------


def method_config(method: str, configs_dir: Path) -> tuple[Path | None, str]:
    """(YAML path, "") or (None, why it is skipped)."""
    from omegaconf import OmegaConf

    for path in (configs_dir / f"{method}.yaml", configs_dir / "baselines" / f"{method}.yaml"):
        if path.is_file():
            declared = OmegaConf.select(OmegaConf.load(path), "editor.method")
            if declared != method:
                return None, f"{path.relative_to(configs_dir.parent)} declares editor.method={declared!r}"
            return path, ""
    return None, f"no configs/{method}.yaml or configs/baselines/{method}.yaml yet"


def job_overrides(args: argparse.Namespace, method: str, config: Path, run_dir: Path,
                  checkpoints: list[int]) -> list[str]:
    overrides = [
        f"config={config}",
        f"model.name={args.model}",
        "logger=csv",
        f"seed={args.seed}",
        f"threads={args.threads}",
        "data.path=null",  # the world's CounterFact export: the same file for every method
        f"data.order_seed={args.order_seed}",
        f"data.limit={args.limit}",
        f"eval.checkpoints=[{','.join(map(str, checkpoints))}]",
        "eval.immediate=true",
        f"output_dir={run_dir}",
        "callbacks.downstream.enabled=false",
        "trainer.enable_checkpointing=false",  # mid-stream checkpoints only cost time here
        "trainer.enable_progress_bar=false",
    ]
    for item in args.overrides:
        scope, sep, rest = item.partition(":")
        if sep and "=" not in scope:  # METHOD:key=value
            if scope == method:
                overrides.append(rest)
        else:
            overrides.append(item)
    return overrides


def last_error(log: Path, rc: int | None) -> str:
    """The line of a failed run's log that says why: an `error:` line, else the exception's last line."""
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()] if log.is_file() else []
    for line in reversed(lines):
        if line.startswith("error:") or "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]:
            return line
    status = "timed out" if rc is None else f"exit {rc}"
    return f"{status}: {lines[-1] if lines else '(no output)'}"


def run_method(args: argparse.Namespace, method: str, config: Path, checkpoints: list[int]) -> dict[str, Any]:
    run_dir = Path(args.runs_dir) / method
    results = run_dir / RESULTS_JSON
    shown = config.relative_to(REPO) if config.is_relative_to(REPO) else config
    out: dict[str, Any] = {"method": method, "config": str(shown), "run_dir": str(run_dir)}
    if args.reuse and results.is_file():
        out.update(status="ok", reused=True)
        return out
    run_dir.mkdir(parents=True, exist_ok=True)
    results.unlink(missing_ok=True)  # a stale table must not pass for this run's
    command = [sys.executable, "-m", "lightning_edit", "run", "edit",
               *job_overrides(args, method, config, run_dir, checkpoints)]
    out["command"] = shlex.join(command)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    log = run_dir / "log.txt"
    print(f"[{method}] running ({log})", flush=True)
    start = time.perf_counter()
    rc: int | None
    with log.open("w") as f:
        f.write(out["command"] + "\n")
        f.flush()
        try:
            rc = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    out["wall_seconds"] = time.perf_counter() - start
    if rc == 0 and results.is_file():
        out["status"] = "ok"
    else:
        out.update(status="failed", error=last_error(log, rc))
    print(f"[{method}] {out['status']} in {out['wall_seconds']:.0f} s"
          + (f": {out['error']}" if out["status"] != "ok" else ""), flush=True)
    return out


# Reading a finished run -------------------------------------------------------------------------


def collect_scores(run: dict[str, Any], checkpoints: list[int]) -> None:
    """Final-state scores at each checkpoint, immediate scores and s/edit at the stream's end."""
    payload = json.loads((Path(run["run_dir"]) / RESULTS_JSON).read_text())
    rows = {row["T"]: row for row in payload["rows"]}
    last = payload["rows"][-1]
    run["edits"] = last["T"]
    run["final"] = {str(t): {m: (rows[t].get("final-state") or {}).get(m) for m in METRICS}
                    for t in checkpoints if t in rows}
    run["immediate"] = {m: (last.get("immediate") or {}).get(m) for m in METRICS}
    run["seconds_per_edit"] = last.get("seconds_per_edit")
    run["landed"] = last.get("landed")


def ledger_note(ledger: list[dict[str, Any]]) -> str:
    """Edits the ledger says were skipped, rolled back or did not land, as counts of the stream."""
    n = len(ledger)
    counts = {"skipped": sum(bool((e.get("extra") or {}).get("skip")) for e in ledger),
              "rolled back": sum(bool((e.get("extra") or {}).get("rolled_back")) for e in ledger),
              "not landed": sum(e.get("landed") is False for e in ledger)}
    return "; ".join(f"{what} {k}/{n}" for what, k in counts.items() if k)


def _jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _editor_tensors(editor) -> dict[str, Any]:
    """Tensors an editor owns, by attribute path (its nn.Modules' parameters and buffers, tensors,
    and tensors in lists / dicts one level down); the model itself is left out."""
    import torch

    found: dict[str, torch.Tensor] = {}
    for attr, value in vars(editor).items():
        if value is editor.model:
            continue
        if isinstance(value, torch.nn.Module):
            found.update({f"{attr}.{n}": t for n, t in value.named_parameters()})
            found.update({f"{attr}.{n}": t for n, t in value.named_buffers()})
        elif isinstance(value, torch.Tensor):
            found[attr] = value
        elif isinstance(value, (list, tuple)):
            found.update({f"{attr}.{i}": t for i, t in enumerate(value) if isinstance(t, torch.Tensor)})
        elif isinstance(value, dict):
            found.update({f"{attr}.{k}": t for k, t in value.items() if isinstance(t, torch.Tensor)})
    return found


def slice_width(name: str, indices: set[int], editor, base: dict[str, Any]) -> tuple[int | None, str]:
    """(numbers per index of `name`, how it was found) per rule 2 or 3 of the module docstring."""
    params = dict(editor.adapter.base_model.named_parameters())
    params.update(editor.model.named_parameters())
    if name in params:
        weight = params[name].detach()
        if weight.dim() != 2:
            return weight[0].numel() if weight.dim() else 1, "entries along dim 0"
        before = base.get(name)
        if before is None:
            return None, f"base weight of '{name}' not found"
        change = weight.float() != before.float()  # [d_out, d_in]
        rows = set(change.any(dim=1).nonzero().flatten().tolist())
        cols = set(change.any(dim=0).nonzero().flatten().tolist())
        if _jaccard(indices, rows) >= _jaccard(indices, cols):
            return weight.shape[1], "rows"
        return weight.shape[0], "columns"
    last = name.split(".")[-1]
    owned = _editor_tensors(editor)
    for path, tensor in owned.items():
        if (path == name or path.endswith("." + last) or path == last) and tensor.dim() >= 1 \
                and tensor.shape[0] > max(indices, default=-1):
            return tensor[0].numel(), f"rows of {path}"
    return None, f"'{name}' is neither a model parameter nor a tensor the editor holds"


def collect_params(run: dict[str, Any], model_name: str) -> None:
    """units/edit and params/edit from the run's edit ledger (module docstring)."""
    state_dir = Path(run["run_dir"]) / EDIT_STATE_DIR
    ledger = json.loads((state_dir / LEDGER_JSON).read_text())
    run["note"] = ledger_note(ledger)
    if not ledger:
        run.update(units_per_edit=0.0, params_per_edit=0.0)
        return
    run["units_per_edit"] = sum(sum(len(v) for v in e["changed"].values()) for e in ledger) / len(ledger)
    if all("params_changed" in (e.get("extra") or {}) for e in ledger):
        run["params_per_edit"] = sum(e["extra"]["params_changed"] for e in ledger) / len(ledger)
        run["params_rule"] = "extra.params_changed"
        return

    import torch

    from transformers.utils import logging as hf_logging

    from lightning_edit.jobs.edit_run import load_edited
    from lightning_edit.models import ModelAdapter, load_model

    hf_logging.disable_progress_bar()
    editor, _, _ = load_edited(state_dir)
    base_model, _ = load_model(model_name)
    base = dict(ModelAdapter(base_model).base_model.named_parameters())
    base.update(base_model.named_parameters())
    names = sorted({n for e in ledger for n in e["changed"]})
    widths, rules = {}, {}
    with torch.no_grad():
        for name in names:
            union = {i for e in ledger for i in e["changed"].get(name, [])}
            widths[name], rules[name] = slice_width(name, union, editor, base)
    run["params_rule"] = rules
    total = 0
    for e in ledger:
        if "params_changed" in (e.get("extra") or {}):
            total += e["extra"]["params_changed"]
            continue
        for name, idx in e["changed"].items():
            if idx and widths[name] is None:
                run.update(params_per_edit=None, note="; ".join(filter(None, [run["note"], f"params/edit: {rules[name]}"])))
                return
            total += len(idx) * (widths[name] or 0)
    run["params_per_edit"] = total / len(ledger)


# The table --------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _count(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def markdown(runs: list[dict[str, Any]], checkpoints: list[int], header: list[str]) -> str:
    columns = [f"{LABEL[m]}@{t} (final)" for t in checkpoints for m in METRICS]
    columns += [f"{LABEL[m]} (immediate)" for m in METRICS]
    columns += ["landed", "s/edit", "units/edit", "params/edit", "note"]
    lines = header + ["", "| method | " + " | ".join(columns) + " |",
                      "| --- | " + " | ".join(["---:"] * (len(columns) - 1)) + " | --- |"]
    for run in runs:
        if run["status"] != "ok":
            note = run.get("error") or run["status"]
            cells = ["-"] * (len(columns) - 1) + [note.replace("|", "\\|")[:160]]
        else:
            final = run.get("final", {})
            cells = [_fmt((final.get(str(t)) or {}).get(m)) for t in checkpoints for m in METRICS]
            cells += [_fmt(run["immediate"].get(m)) for m in METRICS]
            cells += [_fmt(run.get("landed")), _fmt(run.get("seconds_per_edit"), 3), _count(run.get("units_per_edit")),
                      _count(run.get("params_per_edit")), run.get("note", "")]
        lines.append(f"| {run['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/compare_methods.py", *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from lightning_edit.config import repo_configs_dir
    from lightning_edit.editors import EDITORS

    checkpoints = sorted({int(t) for t in args.checkpoints.split(",") if t.strip()})
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(EDITORS)
    unknown = [m for m in methods if m not in EDITORS]
    if unknown:
        print(f"error: --methods: unknown {', '.join(unknown)}; registered: {', '.join(EDITORS)}", file=sys.stderr)
        return 2
    configs_dir = REPO / "configs" if (REPO / "configs").is_dir() else repo_configs_dir()

    skipped, todo = {}, []
    for method in methods:
        config, why = method_config(method, configs_dir)
        if config is None:
            print(f"[{method}] skipped: {why}", flush=True)
            skipped[method] = {"method": method, "status": "skipped", "error": f"skipped: {why}"}
        else:
            todo.append((method, config))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = dict(zip([m for m, _ in todo],
                        pool.map(lambda mc: run_method(args, mc[0], mc[1], checkpoints), todo)))
    runs = [done.get(m) or skipped[m] for m in methods]

    for run in runs:
        if run["status"] != "ok":
            continue
        try:
            collect_scores(run, checkpoints)
        except Exception as exc:  # a run that wrote an unreadable table is that method's failure
            run.update(status="failed", error=f"results.json: {type(exc).__name__}: {exc}")
            continue
        try:
            collect_params(run, args.model)
        except Exception as exc:  # the scores still stand; say why the count is missing
            run["note"] = "; ".join(filter(None, [run.get("note"), f"params/edit: {type(exc).__name__}: {exc}"[:160]]))

    world = args.model
    header = [
        f"# Editing methods compared on {world}: T = {args.limit}, stream order seed {args.order_seed}",
        "",
        f"Command: `{command}`",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()} {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {args.threads} thread(s) per run, {args.jobs} run(s) at a time. "
        "final = every edit so far scored after T edits; immediate = mean of each edit's score right "
        "after it was applied; landed = share of edits whose target was the argmax right after the edit; "
        "s/edit = editor.apply only; params/edit per bench/compare_methods.py.",
    ]
    table = markdown(runs, checkpoints, header)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    payload = {"command": command, "model": world, "limit": args.limit, "order_seed": args.order_seed,
               "checkpoints": checkpoints, "threads": args.threads, "jobs": args.jobs, "runs": runs}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"table: {out} (+ {out.with_suffix('.json').name}); runs in {args.runs_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
