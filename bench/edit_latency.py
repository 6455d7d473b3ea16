"""Milliseconds per edit as a lifelong stream grows (T = 10, 100, 1000), and peak memory, in one run.

The editor is driven directly, as the edit job builds it (its YAML through `build_edit_run`: the
stream, the model and the editor prepared on the world's corpus), then `editor.apply([record])` runs over the world's CounterFact stream in the job's
seeded order with nothing else in the timed loop (no scoring, no Lightning). A row T is the window
of edits T-w+1..T (w = `--window`, 10 by default): e.g. edits 1-10, 91-100 and 991-1000.

    python bench/edit_latency.py                             # microedit, default world, T = 10, 100, 1000
    python bench/edit_latency.py --method rome --checkpoints 10,100 editor.v_steps=20

Columns: mean and median ms per edit in the window; steps per edit (the ledger's optimisation
steps) and ms per step, which tell "later edits need more steps" from "each step got slower";
mean / first window; resident memory (VmRSS) after the window. Below the table: setup time (model,
editor, `prepare`), peak RSS of the process (`resource.getrusage`), peak CUDA memory on GPU, and the
target of issue 7: the last window within 1.2x of the first, under 0.5 s per edit.
The world holds 1,800 facts, so T = 1000 is one stream. The first window also pays first-call costs
(lazy initialisation, allocator warm-up), which flatter the ratio; on shared cores other load falls
on the windows unevenly: read the medians and ms/step beside the means.

Probes (`--probe N`, default 20, for editors with `rollback`, e.g. MicroEdit): a window compares
different records, whose difficulty differs. So at each T the same N held-out records (the ones
after the stream's last checkpoint, in its order) are also applied one at a time to the state after
T edits, each timed and rolled back at once (the state is restored exactly, the stream goes on
untouched). The probe columns are "ms per edit at T" for one fixed set of edits; the target is
judged on them when they are there, else on the windows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.2
TARGET_SECONDS = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="microedit")
    p.add_argument("--config", default=None,
                   help="edit-job YAML (default: configs/<method>.yaml or configs/baselines/<method>.yaml)")
    p.add_argument("--model", default=None, help="model.name (default: the config's)")
    p.add_argument("--checkpoints", default="10,100,1000", help="T at the end of each timed window")
    p.add_argument("--window", type=int, default=10, help="edits per window")
    p.add_argument("--order-seed", type=int, default=None, help="data.order_seed (default: the config's)")
    p.add_argument("--probe", type=int, default=20,
                   help="held-out records timed (and rolled back) at each T; 0 = none (editors without rollback: none)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (FINDINGS: 1 for tiny models)")
    p.add_argument("--out", default=None, help="also write the table here (markdown; JSON beside it)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="edit-job config overrides (editor.lr=...)")
    return p.parse_args(argv)


def find_config(method: str) -> Path:
    for path in (REPO / "configs" / f"{method}.yaml", REPO / "configs" / "baselines" / f"{method}.yaml"):
        if path.is_file():
            return path
    raise SystemExit(f"error: no configs/{method}.yaml or configs/baselines/{method}.yaml; pass --config")


def rss_mib() -> float:
    """Resident memory now (VmRSS), MiB; the peak where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mib()


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/edit_latency.py", *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from lightning_edit.config import load_config
    from lightning_edit.jobs.edit import SCHEMA
    from lightning_edit.jobs.edit_run import build_edit_run
    from lightning_edit.runtime import seed_everything, set_cpu_threads

    config = Path(args.config) if args.config else find_config(args.method)
    overrides = [f"config={config}", *args.overrides]
    overrides += [f"model.name={args.model}"] if args.model else []
    overrides += [f"data.order_seed={args.order_seed}"] if args.order_seed is not None else []
    cfg = load_config(SCHEMA, overrides)
    method = cfg.editor.get("method")
    if method != args.method and not args.config:
        raise SystemExit(f"error: {config} declares editor.method={method!r}, not {args.method!r}")
    checkpoints = sorted({int(t) for t in args.checkpoints.split(",") if t.strip()})
    if checkpoints[0] < args.window:
        raise SystemExit(f"error: --checkpoints starts at {checkpoints[0]}, below --window {args.window}")
    cfg.data.batch_size, cfg.data.limit = 1, checkpoints[-1] + args.probe

    seed_everything(cfg.seed)
    set_cpu_threads(args.threads)
    rss_start = rss_mib()
    start = time.perf_counter()
    run = build_edit_run(cfg)  # the stream, the model, the editor prepared on the corpus
    editor, records = run.editor, run.stream.records
    if len(records) < checkpoints[-1] + args.probe:
        print(f"note: {run.stream.path} holds {len(records)} records; checkpoints above {len(records) - args.probe} "
              "are dropped", file=sys.stderr)
        checkpoints = [t for t in checkpoints if t <= len(records) - args.probe]
    probes = records[checkpoints[-1]:checkpoints[-1] + args.probe]
    records = records[: checkpoints[-1]]
    if probes and not editor.supports_rollback:
        print(f"note: {method} cannot roll an edit back; no probes", file=sys.stderr)
        probes = []
    setup_seconds = time.perf_counter() - start
    rss_setup = rss_mib()
    device = str(editor.device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    seconds: list[float] = []
    steps: list[int] = []
    rss_at: dict[int, float] = {}
    probe_at: dict[int, tuple[list[float], list[int]]] = {}

    def timed_apply(record) -> tuple[float, int, list]:
        """(seconds, optimisation steps, ledger entries) of one `editor.apply`."""
        begin = time.perf_counter()
        entries = editor.apply([record])
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - begin, sum(e.steps for e in entries), entries

    def run_probes() -> tuple[list[float], list[int]]:
        times, probe_steps = [], []
        for record in probes:
            took, n_steps, entries = timed_apply(record)
            times.append(took)
            probe_steps.append(n_steps)
            for entry in entries:
                editor.rollback(entry.edit_id)
        return times, probe_steps

    loop_start = time.perf_counter()
    for t, record in enumerate(records, start=1):
        took, n_steps, _ = timed_apply(record)
        seconds.append(took)
        steps.append(n_steps)
        if t in checkpoints:
            rss_at[t] = rss_mib()
            if probes:
                probe_at[t] = run_probes()
        if t % 100 == 0 or t == len(records):
            print(f"  {t}/{len(records)} edits, {time.perf_counter() - loop_start:.0f} s", file=sys.stderr, flush=True)

    rows = []
    for t in checkpoints:
        window = seconds[t - args.window:t]
        window_steps = steps[t - args.window:t]
        rows.append({"T": t, "edits": f"{t - args.window + 1}-{t}",
                     "mean_ms": 1000 * statistics.fmean(window), "median_ms": 1000 * statistics.median(window),
                     "steps_per_edit": statistics.fmean(window_steps),
                     "ms_per_step": 1000 * sum(window) / sum(window_steps) if sum(window_steps) else None,
                     "rss_mib": rss_at[t]})
        if t in probe_at:
            times, probe_steps = probe_at[t]
            rows[-1].update(probe_ms=1000 * statistics.fmean(times), probe_steps=statistics.fmean(probe_steps))
    for row in rows:
        row["ratio"] = row["mean_ms"] / rows[0]["mean_ms"]
        row["median_ratio"] = row["median_ms"] / rows[0]["median_ms"]
        if "probe_ms" in row:
            row["probe_ratio"] = row["probe_ms"] / rows[0]["probe_ms"]
    last = rows[-1]
    judged_ms, judged_ratio = ((last["probe_ms"], last["probe_ratio"]) if "probe_ms" in last
                               else (last["mean_ms"], last["ratio"]))
    passed = judged_ratio <= TARGET_RATIO and judged_ms < 1000 * TARGET_SECONDS
    summary = {
        "setup_seconds": setup_seconds, "rss_start_mib": rss_start, "rss_after_setup_mib": rss_setup,
        "peak_rss_mib": peak_rss_mib(),
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "mean_ms_all": 1000 * statistics.fmean(seconds), "target_met": passed,
    }

    def ms(v):
        return "-" if v is None else f"{v:.1f}"

    shown = config.relative_to(REPO) if config.is_relative_to(REPO) else config
    lines = [f"# Edit latency: {method} on {cfg.model.name}, T up to {checkpoints[-1]} (one stream)", "",
             f"Command: `{command}`", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()} {os.cpu_count()} cores, {device}, "
             f"torch {torch.__version__}, {args.threads} thread(s); config {shown}, order seed "
             f"{cfg.data.order_seed}. Windows of {args.window} edits; editor.apply only.", "",
             "| T | edits | ms/edit (mean) | ms/edit (median) | steps/edit | ms/step | mean / first "
             "| median / first | probes: ms/edit | probes: steps/edit | probes: / first | RSS MiB |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        probe = (f"{ms(r['probe_ms'])} | {r['probe_steps']:.1f} | {r['probe_ratio']:.2f}" if "probe_ms" in r
                 else "- | - | -")
        lines.append(f"| {r['T']} | {r['edits']} | {ms(r['mean_ms'])} | {ms(r['median_ms'])} | "
                     f"{r['steps_per_edit']:.1f} | {ms(r['ms_per_step'])} | {r['ratio']:.2f} | "
                     f"{r['median_ratio']:.2f} | {probe} | {r['rss_mib']:.0f} |")
    lines += ["",
              f"- setup (model, editor, prepare): {setup_seconds:.1f} s; all {len(seconds)} edits: "
              f"{summary['mean_ms_all']:.1f} ms/edit mean",
              f"- memory: RSS {rss_start:.0f} MiB at start, {rss_setup:.0f} MiB after setup, "
              f"{rss_at[checkpoints[-1]]:.0f} MiB after T = {checkpoints[-1]}; "
              f"peak RSS {summary['peak_rss_mib']:.0f} MiB"
              + (f"; peak CUDA allocated {summary['peak_cuda_mib']:.0f} MiB" if cuda else ""),
              f"- target (issue 7): T = {last['T']} within {TARGET_RATIO}x of T = {rows[0]['T']} and under "
              f"{TARGET_SECONDS} s/edit, on the {'probes' if 'probe_ms' in last else 'windows'}: "
              f"{'met' if passed else 'NOT met'} ({judged_ratio:.2f}x, {judged_ms / 1000:.3f} s)"]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        out.with_suffix(".json").write_text(json.dumps(
            {"command": command, "method": method, "model": cfg.model.name, "device": device,
             "threads": args.threads, "window": args.window, "probes": len(probes), "rows": rows, **summary,
             "seconds_per_edit": seconds, "steps_per_edit": steps}, indent=1) + "\n")
        print(f"table: {out} (+ {out.with_suffix('.json').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
