"""The code benchmarks for every method in one pair of tables: KECode per method and cluster, MENT with
its variants and KN. Each run is the real edit job in its own process (`lightning-edit run edit
config=...`), one at a time; a failing run gets its error in the table.

    python bench/code_compare.py                        # KECode: tcpe microedit pnke ment rome memit kn; MENT + variants + KN
    python bench/code_compare.py --kecode tcpe,rome --ment ment,kn --model codeworld-small
    python bench/code_compare.py --reuse                # re-tabulate finished runs

KECode runs use `configs/code/kecode_<method>.yaml`; MENT runs use `configs/code/ment.yaml` with one
variant switch each (`loc-actv` = editor.locate=actv, ...) and `configs/code/ment_kn.yaml` for KN
(`kn-step1` = editor.steps=1). Runs land in `<runs-dir>/<name>/`, the tables in
`bench/results/code_kecode.md` and `bench/results/code_ment.md`, with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KECODE = ("tcpe", "microedit", "pnke", "ment", "rome", "memit", "kn")
MENT_VARIANTS = {
    "ment": ("code/ment.yaml", []),
    "loc-actv": ("code/ment.yaml", ["editor.locate=actv"]),
    "loc-rand": ("code/ment.yaml", ["editor.locate=rand"]),
    "est-onehot": ("code/ment.yaml", ["editor.estimate=onehot"]),
    "est-switch": ("code/ment.yaml", ["editor.estimate=switch"]),
    "est-pathway": ("code/ment.yaml", ["editor.pathway=true"]),
    "plan-rank": ("code/ment.yaml", ["editor.plan=rank"]),
    "plan-prob": ("code/ment.yaml", ["editor.plan=prob"]),
    "plan-score": ("code/ment.yaml", ["editor.plan=score"]),
    "kn": ("code/ment_kn.yaml", []),
    "kn-step1": ("code/ment_kn.yaml", ["editor.steps=1"]),
}


PAPER_MENT = {
    # MENT's paper (seeds/001), CodeGen-mono-350M: Table III (EM BM LM BLEU ROUGE) on FIMAX / CoNaLa / SPoC,
    # Table IV (NC, seconds per error), Table V (patched neurons, skip rate); "-" where a table has no value.
    "CodeGen": {"FIMAX": (0.476, 0.963, 0.869, 0.958, 0.951), "CoNaLa": (0.052, 0.690, 0.429, 0.541, 0.681),
                "SPoC": (0.342, 0.833, 0.655, 0.645, 0.862)},
    "+ KN (step=1)": {"FIMAX": (0.483, 0.964, 0.873, 0.959, 0.952, 10.853, 5.000, 0.976, 54.3),
                      "CoNaLa": (0.052, 0.698, 0.437, 0.549, 0.684, 10.853, 4.958, 0.976, 14.8),
                      "SPoC": (0.352, 0.837, 0.664, 0.654, 0.866, 10.817, 5.036, 0.969, 16.7)},
    "+ KN (step=20)": {"FIMAX": (0.563, 0.971, 0.895, 0.966, 0.962, 9.847, 5.456, 0.792, 143.8),
                       "CoNaLa": (0.064, 0.728, 0.465, 0.586, 0.720, 10.236, 4.641, 0.880, 95.8),
                       "SPoC": (0.374, 0.847, 0.680, 0.673, 0.876, 10.433, 4.530, 0.912, 102.0)},
    "+ MENT": {"FIMAX": (0.940, 0.997, 0.988, 0.996, 0.996, 2.151, 1.241, 0.093, 45.2),
               "CoNaLa": (0.669, 0.973, 0.894, 0.931, 0.970, 2.546, 1.474, 0.113, 8.3),
               "SPoC": (0.925, 0.992, 0.974, 0.977, 0.992, 1.707, 1.256, 0.046, 9.8)},
}
PAPER_PROBES = {  # MENT's Table VI (G MAE_rank, G MAE_prob, S MAE_rank, S MAE_prob, avg NC), 450 probe samples
    "MENT [std.]": (1.814, 0.354, 5.896, 0.343, 1.784), "KN (step=1)": (3.740, 0.196, 0.000, 0.000, 11.000),
    "KN (step=20)": (3.740, 0.196, 0.000, 0.000, 11.000), "[loc.-actv]": (1.661, 0.384, 7.316, 0.488, 1.944),
    "[loc.-rand]": (3.952, 0.211, 0.064, 0.005, 10.756), "[est.-onehot]": (2.006, 0.359, 5.429, 0.307, 1.896),
    "[est.-switch]": (1.765, 0.371, 4.737, 0.291, 1.158), "[est.-pathway]": (2.578, 0.237, 3.855, 0.173, 4.231),
    "[plan-rank]": (1.347, 0.328, 5.726, 0.338, 1.511), "[plan-prob]": (1.832, 0.382, 5.760, 0.353, 2.402),
    "[plan-score]": (1.608, 0.372, 7.002, 0.510, 3.031),
}


def paper_ment_table() -> str:
    """MENT's published CodeGen-350M figures in the measured table's columns (probe columns from Table VI)."""
    lines = ["| paper (CodeGen-350M) | task | EM | BM | LM | BLEU | ROUGE | NC | patched | skip | s/error |",
             "| --- | --- | " + " | ".join("---:" for _ in range(9)) + " |"]
    for approach, tasks in PAPER_MENT.items():
        for task, values in tasks.items():
            cells = [_fmt(v) if i < 8 else f"{v:.1f}" for i, v in enumerate(values)] + ["-"] * (9 - len(values))
            lines.append(f"| {approach} | {task} | " + " | ".join(cells) + " |")
    lines += ["", "| paper (CodeGen-350M, Table VI) | G MAE_rank | G MAE_prob | S MAE_rank | S MAE_prob | avg NC |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {a} | " + " | ".join(_fmt(v) for v in values) + " |" for a, values in PAPER_PROBES.items()]
    return "\n".join(lines) + "\n"


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def run(name: str, config: str, overrides: list[str], args) -> tuple[dict | None, str]:
    folder = Path(args.runs_dir) / name
    results = folder / "results.json"
    if args.reuse and results.is_file():
        return json.loads(results.read_text()), ""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lightning_edit", "run", "edit", f"config={config}", f"model.name={args.model}",
           "logger=csv", f"output_dir={folder}", *overrides, *args.set]
    start = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
    print(f"{name}: exit {done.returncode} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if done.returncode != 0 or not results.is_file():
        tail = (folder / "log.txt").read_text().strip().splitlines()[-1:] or ["?"]
        return None, f"exit {done.returncode}: {tail[0][:120]}"
    return json.loads(results.read_text()), ""


def kecode_table(outcomes: dict[str, tuple[dict | None, str]]) -> str:
    cols = [("generalization", "Generalization"), ("drift", "Cluster Drift"), ("specificity", "Specificity"),
            ("reliability", "Reliability"), ("compile_rate", "compiles"), ("fixed", "passes"), ("broken", "broken"),
            ("rel", "Rel"), ("loc", "Loc")]
    lines = ["| method | cluster | n | " + " | ".join(label for _, label in cols) + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in cols) + " |"]
    for method, (res, err) in outcomes.items():
        if res is None:
            lines.append(f"| {method} | {err} |" + " |" * (len(cols) + 1))
            continue
        for row in res["rows"]:
            lines.append(f"| {method} | {row['cluster']} | {int(row['n_target'])} | "
                         + " | ".join(_fmt(row.get(k)) for k, _ in cols) + " |")
        means = {k: [r[k] for r in res["rows"] if r.get(k) is not None and not
                     (isinstance(r[k], float) and math.isnan(r[k]))] for k, _ in cols}
        lines.append(f"| {method} | **mean** | | " + " | ".join(_fmt(sum(v) / len(v) if v else None) for v in
                                                                means.values()) + " |")
    return "\n".join(lines) + "\n"


def ment_table(outcomes: dict[str, tuple[dict | None, str]]) -> str:
    lines = ["| approach | EM | BM | LM | BLEU | ROUGE | NC | patched | skip | s/error | G MAE_rank | G MAE_prob | "
             "S MAE_rank | S MAE_prob | probe NC |",
             "| --- | " + " | ".join("---:" for _ in range(14)) + " |"]
    first = next((r for r, _ in outcomes.values() if r is not None), None)
    if first is not None:
        s = first["patch"]["summary"]
        lines.append("| unedited | " + " | ".join(_fmt(s[f"before_{k}"]) for k in ("em", "bm", "lm", "bleu", "rouge"))
                     + " |" + " |" * 9)
    for name, (res, err) in outcomes.items():
        if res is None:
            lines.append(f"| {name} | {err} |" + " |" * 13)
            continue
        s, p = res["patch"]["summary"], (res.get("probe") or {}).get("summary", {})
        lines.append(f"| {name} | " + " | ".join(_fmt(s[f"after_{k}"]) for k in ("em", "bm", "lm", "bleu", "rouge"))
                     + f" | {_fmt(s['neuron_cost'])} | {_fmt(s['patched'])} | {_fmt(s['skip_rate'])} | "
                     f"{_fmt(s['seconds'])} | "
                     + " | ".join(_fmt(p.get(k)) for k in ("g_mae_rank", "g_mae_prob", "s_mae_rank", "s_mae_prob",
                                                           "neuron_cost")) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kecode", default=",".join(KECODE), help="KECode methods (configs/code/kecode_<m>.yaml); '' = none")
    p.add_argument("--ment", default=",".join(MENT_VARIANTS), help=f"MENT runs among {', '.join(MENT_VARIANTS)}; '' = none")
    p.add_argument("--model", default="codeworld")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every run")
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "code_compare"))
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--reuse", action="store_true")
    args = p.parse_args(argv)
    command = "python bench/code_compare.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kecode = [m for m in args.kecode.split(",") if m]
    if kecode:
        results = {m: run(f"kecode_{m}", f"code/kecode_{m}.yaml", [], args) for m in kecode}
        table = kecode_table(results)
        (out / "code_kecode.md").write_text(f"`{command}` ({time.strftime('%Y-%m-%d')})\n\n{table}")
        print(table)
    ment = [m for m in args.ment.split(",") if m]
    unknown = [m for m in ment if m not in MENT_VARIANTS]
    if unknown:
        print(f"error: unknown MENT runs {unknown}; choices: {', '.join(MENT_VARIANTS)}", file=sys.stderr)
        return 2
    if ment:
        results = {m: run(f"ment_{m}", *MENT_VARIANTS[m], args) for m in ment}
        table = ment_table(results) + "\n" + paper_ment_table()
        (out / "code_ment.md").write_text(f"`{command}` ({time.strftime('%Y-%m-%d')})\n\n{table}")
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
