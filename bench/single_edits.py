"""Single-edit success of every method: does one edit on the unedited model make its target the argmax?

The issues' first bar for a method ("the target is the argmax for at least 90% of single edits on
the default world", T = 1). For each method, each of the first `--n` records of the world's
CounterFact stream (the same order as the edit job's) is applied alone to a fresh copy of the base
model with a freshly built editor (its YAML config, `editor.prepare` on the same corpus as the job),
then scored teacher-forced on the edited model: `argmax` = every target token is the argmax (the
exact-match Rel of METHODS 3), `rel` = token accuracy, `gen` = the rephrases' token accuracy, `loc` =
the record's own neighbourhood prompts still answered as the unedited model does (Loc at T = 1),
`units` = rows, columns, latents or codebook entries the edit changed (`LedgerEntry.changed`).

    python bench/single_edits.py                        # every method, toyworld, 50 records
    python bench/single_edits.py --methods ft --n 20 --set editor.lr=1e-2

Prints a markdown table (and writes it with `--out`); nothing here is timed against a threshold.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None, help="comma-separated subset of the registered editors (default: all)")
    p.add_argument("--model", default="toyworld")
    p.add_argument("--n", type=int, default=50, help="records, each edited alone")
    p.add_argument("--order-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                   help="job override for every method, or for one with a METHOD: prefix (repeatable)")
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    return p.parse_args(argv)


def single_edits(method: str, config: Path, args: argparse.Namespace) -> dict[str, float]:
    import torch

    from lightning_edit.config import load_config
    from lightning_edit.jobs.edit import SCHEMA
    from lightning_edit.jobs.edit_run import build_edit_run
    from lightning_edit.metrics import loc_score, locality_predictions, rel_gen_scores

    overrides = [f"config={config}", f"model.name={args.model}", "data.path=null",
                 f"data.order_seed={args.order_seed}", f"data.limit={args.n}",
                 "eval.checkpoints=null"]  # a config's stream checkpoints (kn: 1, 10, 100) do not apply here
    for item in args.overrides:
        scope, sep, rest = item.partition(":")
        if sep and "=" not in scope:
            if scope == method:
                overrides.append(rest)
        else:
            overrides.append(item)
    run = build_edit_run(load_config(SCHEMA, overrides))  # the job's stream, model and corpus
    records = list(run.stream.records)
    with torch.no_grad():
        base = locality_predictions(run.model, run.tokenizer, records)
    hits, rel, gen, loc, units, seconds = [], [], [], [], [], []
    for record in records:
        editor = run.new_editor(copy.deepcopy(run.model))  # fresh: run.model is never edited
        start = time.perf_counter()
        editor.apply([record])
        seconds.append(time.perf_counter() - start)
        with torch.no_grad(), editor.edited() as edited:
            scores = rel_gen_scores(edited, run.tokenizer, [record])
            if record.locality:
                loc.append(loc_score(locality_predictions(edited, run.tokenizer, [record]), [base[len(hits)]]))
        units.append(sum(len(v) for entry in editor.ledger for v in entry.changed.values()))
        hits.append(scores["rel_em"])
        rel.append(scores["rel"])
        gen.append(scores["gen"])
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"n": len(records), "argmax": mean(hits), "rel": mean(rel), "gen": mean(gen), "loc": mean(loc),
            "units": mean(units), "s_per_edit": mean(seconds)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bench.compare_methods import method_config
    from lightning_edit.editors import EDITORS

    torch.set_num_threads(args.threads)
    methods = args.methods.split(",") if args.methods else list(EDITORS)
    unknown = [m for m in methods if m not in EDITORS]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; registered: {', '.join(EDITORS)}", file=sys.stderr)
        raise SystemExit(2)  # a user's mistake: one line, exit 2
    lines = [f"Single edits on `{args.model}`: each of the first {args.n} records of the CounterFact stream "
             f"(order seed {args.order_seed}) applied alone to the unedited model.", "",
             "| method | edits | target is argmax | Rel (token acc.) | Gen (token acc.) | Loc (T = 1) | units/edit "
             "| s/edit |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for method in methods:
        config, why = method_config(method, REPO / "configs")
        if config is None:
            row = f"| {method} | - | skipped: {why} | | | | | |"
        else:
            s = single_edits(method, config, args)
            row = (f"| {method} | {s['n']} | {s['argmax']:.0%} ({round(s['argmax'] * s['n'])}/{s['n']}) | "
                   f"{s['rel']:.3f} | {s['gen']:.3f} | {s['loc']:.3f} | {s['units']:.1f} | {s['s_per_edit']:.3f} |")
        lines.append(row)
        print(row, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n\nCommand: `python bench/single_edits.py "
                                  + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
