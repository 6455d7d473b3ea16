"""Tables, plots and per-sample files of the code benchmarks (results.md / .json / .csv / .png)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

from .lexer import pretty


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _plain(obj: Any) -> Any:
    """JSON-safe: NaN -> None."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


KECODE_COLUMNS = (("generalization", "Generalization"), ("drift", "Cluster Drift"), ("specificity", "Specificity"),
                  ("reliability", "Reliability"), ("compile_rate", "compiles"), ("fixed", "passes"),
                  ("broken", "broken"), ("edited_fixed", "edited fixed"), ("rel", "Rel"), ("loc", "Loc"))


def kecode_report(rows: list[dict], before: dict, meta: dict, output_dir: Path, samples, translations_before,
                  after_by_group: dict, clusters) -> dict[str, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: output_dir / f"results.{ext}" for ext in ("json", "md", "csv", "png")}
    title = (f"KECode: {meta['method']} on {meta['model']}, {meta['samples']} samples, {meta['scenario']}, "
             f"{meta['edits_per_cluster']} edits per cluster ({meta['compiler']})")
    sig = clusters.signatures
    lines = [f"**{title}**", "",
             f"Unedited: {before['compile_rate']:.1%} of translations compile, {before['pass_rate']:.1%} pass all "
             "their tests. Clusters (first error, normalised):", ""]
    zero = before.get("zero_edit") or {}
    if zero.get("differs_from_base"):
        lines[-1:-1] = [f"With no edit applied, {meta['method']}'s model (its spliced component) compiles "
                        f"{zero['compile_rate']:.1%} and passes {zero['pass_rate']:.1%}; it alone breaks "
                        f"{int(zero['broken'])} passing programs and changes the cluster of {int(zero['changed_cluster'])} "
                        "samples (counted in the scores below, which compare with the base LM).", ""]
    lines.append(_table(["cluster", "samples", "signature"],
                        [[c["id"], c["size"], f"`` {c['signature']} ``"] for c in before["clusters"]["clusters"]]
                        + ([["other", before["clusters"]["other"], "rarer signatures"]] if before["clusters"]["other"] else [])))
    lines.append("")
    lines.append("Scores over held-out samples (never the edited ones); broken = programs that passed all tests "
                 "before the edit and do not after; Rel / Loc = the edit records, final-state.")
    lines.append("")
    body = [[r["cluster"], int(r["n_target"]), r["edits"]] + [r[k] for k, _ in KECODE_COLUMNS] for r in rows]
    if rows:
        body.append(["mean", "", ""] + [_mean(rows, k) for k, _ in KECODE_COLUMNS])
    lines.append(_table(["cluster", "n", "edits"] + [label for _, label in KECODE_COLUMNS], body))
    paths["md"].write_text("\n".join(lines))
    payload = {"meta": meta, "before": before, "rows": rows,
               "metrics": {"generalization": "share of the target cluster's held-out samples whose first error left it",
                           "drift": "share of the target cluster's held-out samples now failing in another cluster",
                           "specificity": "share of other clusters' held-out samples whose cluster is unchanged",
                           "reliability": "mean unit-test pass rate of the target cluster's samples that compile after",
                           "broken": "held-out programs passing all tests before, not after"}}
    paths["json"].write_text(json.dumps(_plain(payload), indent=1) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        keys = ["n_target", "edits"] + [k for k, _ in KECODE_COLUMNS] + ["n_other", "n_passing", "edit_seconds"]
        writer.writerow(["cluster", "signature"] + keys)
        for r in rows:
            writer.writerow([r["cluster"], sig.get(r["cluster"], "")] + [_fmt(r.get(k), 4) for k in keys])
    _kecode_plot(rows, paths["png"], title)
    outcomes = []
    for i, (s, t) in enumerate(zip(samples, translations_before)):
        entry = {"id": s.id, "template": s.program.template, "cluster": clusters.assign(t.signature),
                 "errors": t.result.errors[:2], "tests_passed": sum(t.result.tests), "d_generated": pretty(t.source)}
        for group, after in after_by_group.items():
            a = after[i]
            entry[f"after_{group}"] = {"cluster": clusters.assign(a.signature), "errors": a.result.errors[:1],
                                       "tests_passed": sum(a.result.tests),
                                       **({"d_generated": pretty(a.source)} if a.source != t.source else {})}
        outcomes.append(entry)
    (output_dir / "kecode_samples.json").write_text(json.dumps(outcomes, indent=1) + "\n")
    return paths


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
    return sum(vals) / len(vals) if vals else math.nan


def _kecode_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("generalization", "Generalization"), ("drift", "Cluster Drift"), ("specificity", "Specificity"),
            ("reliability", "Reliability"), ("broken_rate", "passing broken")]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows) + 2), 3.6))
    width = 0.8 / len(keys)
    for j, (key, label) in enumerate(keys):
        values = [r.get(key, math.nan) for r in rows]
        values = [0 if v is None or math.isnan(v) else v for v in values]
        ax.bar([i + j * width for i in range(len(rows))], values, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['cluster']}\n(n={int(r['n_target'])})" for r in rows], fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("share")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.set_title(title, fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PATCH_COLUMNS = ("em", "bm", "lm", "bleu", "rouge")


def ment_report(patch: dict, probe: dict | None, meta: dict, output_dir: Path) -> dict[str, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: output_dir / f"results.{ext}" for ext in ("json", "md", "csv", "png")}
    s = patch["summary"]
    title = f"MENT benchmark: {meta['method']} on {meta['model']}"
    lines = [f"**{title}**", "",
             f"Patch sets (RQ1, RQ2): {int(s['data_pairs'])} data pairs, {int(s['errors'])} LLM errors, each "
             "patched alone (patch set size 1) and undone; generation metrics over all data pairs.", ""]
    lines.append(_table(["", "EM", "BM", "LM", "BLEU", "ROUGE"],
                        [["before"] + [s[f"before_{k}"] for k in PATCH_COLUMNS],
                         ["after"] + [s[f"after_{k}"] for k in PATCH_COLUMNS]]))
    lines.append("")
    lines.append(_table(["errors", "resolved", "NC", "patched neurons", "skip rate", "s / error"],
                        [[int(s["errors"]), s["resolved"], s["neuron_cost"], s["patched"], s["skip_rate"], s["seconds"]]]))
    if probe:
        p = probe["summary"]
        lines += ["", "Probes (RQ3): each sample patched alone; G = its subtype's other prompts (reference: the "
                  "original argmax), S = other subtypes' prompts (reference: the target before). Lower is better.", ""]
        rows = [["all"] + [p[k] for k in ("g_mae_rank", "g_mae_prob", "s_mae_rank", "s_mae_prob", "neuron_cost",
                                          "skip", "resolved")]]
        rows += [[st] + [v[k] for k in ("g_mae_rank", "g_mae_prob", "s_mae_rank", "s_mae_prob", "neuron_cost", "skip",
                                        "resolved")] for st, v in probe["subtypes"].items()]
        lines.append(_table(["subtype", "G MAE_rank", "G MAE_prob", "S MAE_rank", "S MAE_prob", "NC", "skip",
                             "resolved"], rows))
    paths["md"].write_text("\n".join(lines) + "\n")
    paths["json"].write_text(json.dumps(_plain({"meta": meta, "patch": patch, "probe": probe}), indent=1) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["part", "metric", "value"])
        for k, v in s.items():
            writer.writerow(["patch", k, _fmt(v, 4)])
        if probe:
            for k, v in probe["summary"].items():
                writer.writerow(["probe", k, _fmt(v, 4)])
            for st, vals in probe["subtypes"].items():
                for k, v in vals.items():
                    writer.writerow([f"probe/{st}", k, _fmt(v, 4)])
    _ment_plot(patch, probe, paths["png"], title)
    return paths


def _ment_plot(patch: dict, probe: dict | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = patch["summary"]
    fig, axes = plt.subplots(1, 2 if probe else 1, figsize=(10 if probe else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    xs = range(len(PATCH_COLUMNS))
    ax.bar([x - 0.2 for x in xs], [s[f"before_{k}"] for k in PATCH_COLUMNS], 0.4, label="before")
    ax.bar([x + 0.2 for x in xs], [s[f"after_{k}"] for k in PATCH_COLUMNS], 0.4, label="after")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([k.upper() for k in PATCH_COLUMNS])
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("patch sets", fontsize=9)
    if probe:
        ax = axes[0][1]
        names = list(probe["subtypes"])
        width = 0.2
        for j, (key, label) in enumerate((("g_mae_rank", "G MAE_rank"), ("s_mae_rank", "S MAE_rank"))):
            ax.bar([i + j * width for i in range(len(names))],
                   [probe["subtypes"][n].get(key, math.nan) for n in names], width, label=label)
        ax2 = ax.twinx()
        for j, (key, label) in enumerate((("g_mae_prob", "G MAE_prob"), ("s_mae_prob", "S MAE_prob"))):
            ax2.bar([i + (j + 2) * width for i in range(len(names))],
                    [probe["subtypes"][n].get(key, math.nan) for n in names], width, label=label,
                    color=("tab:green", "tab:red")[j])
        ax.set_xticks([i + 1.5 * width for i in range(len(names))])
        ax.set_xticklabels(names, fontsize=7, rotation=15)
        ax.set_ylabel("MAE rank (top 10)")
        ax2.set_ylabel("MAE probability")
        ax2.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
        ax2.legend(fontsize=7, loc="upper right")
        ax.set_title("probes per subtype", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
