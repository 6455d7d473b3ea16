"""Does a neuron-level editor need a wider MLP? Every method at T = 100 on worlds that differ only in
MLP width, one table and one plot.

The worlds are `toyworld` (MLP 512) and its `toyworld-mlp<N>` variants (`world/spec.py`: the same
knowledge base, seed, tokenizer, depth and hidden size 128, MLP width N; built on first use). For each
(method, world) pair the script runs `bench/compare_methods.py --methods <method> --model <world>
--jobs 1 --reuse` into `<runs-dir>/<world>/` (a finished run is collected, not re-run), method by
method, cheap methods first and every width of a method before the next method, so the plot fills in
even if the study is stopped; a pair whose world is still being built (by another process) waits
until the pairs whose world is ready are done. Then it assembles:

    python bench/width_study.py                        # run what is missing, then the table and plot
    python bench/width_study.py --collect              # only assemble what has finished
    python bench/width_study.py --methods grace,rome --timeout 1800

- `bench/results/width_T100.md` (+ `.json`): one row per method and width, final-state Rel / Gen /
  Loc at T, immediate scores, landed, s/edit, params/edit, and why a row is empty (failed, timed out,
  not run);
- `docs/figures/width_T100.png`: final-state Rel and Loc at T against MLP width (log x), one line
  per method.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORLDS = "toyworld,toyworld-mlp2048,toyworld-mlp8192"
# cheapest first (s/edit and setup cost on toyworld: bench/results/compare_methods.md), so that an
# interrupted study still has every width of the methods it reached
DEFAULT_METHODS = "grace,ft,rome,memit,alphaedit,pnke,fine,ment,tcpe,microedit,wise"
METRICS = ("rel", "gen", "loc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/width_study.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default=DEFAULT_WORLDS, help="comma-separated embedded worlds (one per width)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods, in the order to run them")
    p.add_argument("--limit", type=int, default=100, help="T: edits in the stream")
    p.add_argument("--timeout", type=float, default=None, help="seconds per method run before it is stopped")
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "width"), help="<runs-dir>/<world>/<method>/")
    p.add_argument("--collect", action="store_true", help="run nothing; assemble the finished runs")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "width_T100.md"))
    p.add_argument("--figure", default=str(REPO / "docs" / "figures" / "width_T100.png"))
    return p.parse_args(argv)


def mlp_width(world: str) -> int:
    """The world's MLP width, from its spec (nothing is built)."""
    from lightning_edit.world import SPECS

    if world not in SPECS:
        print(f"error: --worlds: '{world}' is not an embedded fact world; choices: {', '.join(SPECS)}",
              file=sys.stderr)
        raise SystemExit(2)  # a user's mistake: one line, exit 2
    model = SPECS[world].model
    return getattr(model, "intermediate_size", None) or getattr(model, "n_inner")


def world_ready(world: str) -> bool:
    from lightning_edit.world import world_dir

    return (world_dir(world) / "accuracy.json").is_file()


def pair_json(runs_dir: Path, world: str, method: str) -> Path:
    """The one-method compare_methods table of a (method, world) pair."""
    return runs_dir / world / f"_{method}.json"


def run_pair(args: argparse.Namespace, world: str, method: str) -> None:
    runs_dir = Path(args.runs_dir)
    out = pair_json(runs_dir, world, method).with_suffix(".md")
    command = [sys.executable, str(REPO / "bench" / "compare_methods.py"), "--model", world, "--methods", method,
               "--limit", str(args.limit), "--checkpoints", f"1,10,{args.limit}", "--jobs", "1", "--reuse",
               "--runs-dir", str(runs_dir / world), "--out", str(out)]
    if args.timeout:
        command += ["--timeout", str(args.timeout)]
    print(f"[width] {method} on {world} ...", flush=True)
    start = time.perf_counter()
    rc = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL).returncode
    print(f"[width] {method} on {world}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)


def run_missing(args: argparse.Namespace, worlds: list[str], methods: list[str]) -> None:
    runs_dir = Path(args.runs_dir)
    todo = [(m, w) for m in methods for w in worlds if not _finished(runs_dir, w, m)]
    while todo:
        ready = [pair for pair in todo if world_ready(pair[1])]
        method, world = (ready or todo)[0]  # nothing ready: this run builds the world (or waits on its lock)
        run_pair(args, world, method)
        todo.remove((method, world))


def _finished(runs_dir: Path, world: str, method: str) -> bool:
    path = pair_json(runs_dir, world, method)
    if not path.is_file():
        return False
    runs = json.loads(path.read_text())["runs"]
    return bool(runs) and runs[0].get("status") == "ok"


def collect(args: argparse.Namespace, worlds: list[str], methods: list[str]) -> list[dict[str, Any]]:
    """One row per (method, world): the pair's compare_methods run, or why there is none."""
    runs_dir = Path(args.runs_dir)
    rows = []
    for method in methods:
        for world in worlds:
            row: dict[str, Any] = {"method": method, "world": world, "mlp_width": mlp_width(world)}
            path = pair_json(runs_dir, world, method)
            if not path.is_file():
                row.update(status="not run", error="not run" + ("" if world_ready(world) else " (world not built)"))
            else:
                run = json.loads(path.read_text())["runs"][0]
                row["status"] = run.get("status")
                if run.get("status") == "ok":
                    final = run.get("final", {}).get(str(args.limit))
                    if final is None:
                        row.update(status="failed", error=f"no final-state row at T={args.limit} "
                                                          f"(the stream has {run.get('edits')} edits)")
                    else:
                        row["final"] = final
                    for key in ("immediate", "landed", "seconds_per_edit", "units_per_edit", "params_per_edit",
                                "note", "wall_seconds", "run_dir"):
                        row[key] = run.get(key)
                else:
                    row["error"] = run.get("error") or run.get("status")
            rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if digits == 0 else f"{value:.{digits}f}"
    return str(value)


def markdown(rows: list[dict[str, Any]], limit: int, header: list[str]) -> str:
    columns = [f"Rel@{limit} (final)", f"Gen@{limit} (final)", f"Loc@{limit} (final)", "mean (final)",
               "Rel (immediate)", "Loc (immediate)", "landed", "s/edit", "params/edit", "note"]
    lines = header + ["", "| method | MLP width | " + " | ".join(columns) + " |",
                      "| --- | ---: | " + " | ".join(["---:"] * (len(columns) - 1)) + " | --- |"]
    for row in rows:
        final = row.get("final")
        if final is None:
            cells = ["-"] * (len(columns) - 1) + [str(row.get("error", row["status"])).replace("|", "\\|")[:160]]
        else:
            scores = [final.get(m) for m in METRICS]
            mean = sum(scores) / 3 if None not in scores else None
            imm = row.get("immediate") or {}
            cells = [_fmt(s) for s in scores] + [_fmt(mean), _fmt(imm.get("rel")), _fmt(imm.get("loc")),
                                                 _fmt(row.get("landed")), _fmt(row.get("seconds_per_edit")),
                                                 _fmt(row.get("params_per_edit"), 0), row.get("note") or ""]
        lines.append(f"| {row['method']} | {row['mlp_width']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], limit: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    widths = sorted({r["mlp_width"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    cmap = plt.get_cmap("tab10")
    markers = "osD^v<>ph*X"
    for i, method in enumerate(methods):
        points = sorted((r["mlp_width"], r["final"]) for r in rows if r["method"] == method and r.get("final"))
        if not points:
            continue
        for ax, metric in zip(axes, ("rel", "loc")):
            ax.plot([w for w, _ in points], [f[metric] for _, f in points], marker=markers[i % len(markers)],
                    color=cmap(i % 10), label=method, linewidth=1.5, markersize=6)
    unmeasured = [w for w in widths if not any(r.get("final") for r in rows if r["mlp_width"] == w)]
    for ax, title in zip(axes, (f"Rel@{limit} (final state)", f"Loc@{limit} (final state)")):
        for w in unmeasured:  # a width in the study with no finished run says so, rather than vanishing
            ax.axvline(w, color="grey", linestyle=":", linewidth=1)
            ax.text(w, 0.5, "not measured", rotation=90, ha="right", va="center", color="grey", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [f"{w:,}" for w in widths])
        ax.minorticks_off()
        ax.set_xlabel("MLP width (hidden 128, 4 layers, same facts)")
        ax.set_title(title)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9)
    fig.suptitle(f"Every editing method at T = {limit} on toyworld with a wider MLP")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    worlds = [w.strip() for w in args.worlds.split(",") if w.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    widths = {w: mlp_width(w) for w in worlds}  # unknown worlds fail here, before anything runs
    if not args.collect:
        run_missing(args, worlds, methods)
    rows = collect(args, worlds, methods)
    command = " ".join(["python", "bench/width_study.py", *(sys.argv[1:] if argv is None else argv)])
    header = [f"# Every method at T = {args.limit} against MLP width (toyworld, same facts)", "",
              f"Command: `{command}`", "",
              f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores; worlds: "
              + ", ".join(f"{w} (MLP {n:,})" for w, n in widths.items())
              + "; each row is one `bench/compare_methods.py --jobs 1` run (runs in "
              f"`{os.path.relpath(args.runs_dir, REPO)}`); final = every edit so far scored after T edits; "
              "mean = (Rel + Gen + Loc) / 3."]
    table = markdown(rows, args.limit, header)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "limit": args.limit, "worlds": widths,
                                                    "rows": rows}, indent=1, default=str) + "\n")
    plot(rows, args.limit, Path(args.figure))
    print(f"table: {out} (+ .json); figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
