"""The results of an edit stream: one row per checkpoint T, each number labelled with its protocol.

A row is a plain dict (JSON types only, so it also rides in Lightning checkpoints):
`{"T": int, "final-state": {rel, gen, loc, rel_em, gen_em, ...}, "immediate": {...} | None,
"seconds_per_edit": float, "landed": float | None, "landed_n": int, "edits": int}`; `landed` is the
share of the edits so far whose target was the argmax right after the edit (`landed_share`), and the
table warns, naming the method, when it is below `LANDED_WARNING` (a stream whose edits mostly did not
happen says so, whatever its Rel, Gen and Loc). "final-state" scores every edit made so far on the model as it is after
T edits (the headline, METHODS.md section 3); "immediate" is the mean of the scores each edit got
right after it was applied. Written as markdown (printed), JSON, CSV and a PNG plot.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

from lightning_edit.constants import RESULTS_STEM

FINAL = "final-state"
IMMEDIATE = "immediate"
PROTOCOLS = (FINAL, IMMEDIATE)
COLUMNS = {FINAL: ("rel", "gen", "loc", "rel_em", "gen_em"), IMMEDIATE: ("rel", "gen", "loc")}
"""Metric columns of the markdown table per protocol (JSON and CSV keep every metric)."""
LANDED_WARNING = 0.9
"""Below this share of landed edits the table prints a warning."""
LABELS = {"rel": "Rel", "gen": "Gen", "loc": "Loc", "rel_em": "Rel_EM", "gen_em": "Gen_EM",
          "rel_ppl": "Rel_PPL"}


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _table_columns(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """(protocol, metric) columns: the fixed ones, plus rel_ppl when hallucination records exist."""
    columns = []
    for protocol in PROTOCOLS:
        if not any(row.get(protocol) for row in rows):
            continue
        metrics = list(COLUMNS[protocol])
        if any("rel_ppl" in (row.get(protocol) or {}) for row in rows):
            metrics.insert(1, "rel_ppl")
        columns += [(protocol, m) for m in metrics]
    return columns


def landed_share(ledger: Sequence[Any]) -> dict[str, Any]:
    """`landed` (share, None when no entry was checked), `landed_n` and `edits` of ledger entries
    (`LedgerEntry`s or their dicts) whose `landed` was checked."""
    flags = [e.get("landed") if isinstance(e, dict) else getattr(e, "landed", None) for e in ledger]
    checked = [bool(f) for f in flags if f is not None]
    return {"landed": sum(checked) / len(checked) if checked else None, "landed_n": sum(checked),
            "edits": len(checked)}


def landed_warning(rows: Sequence[dict], method: str | None) -> str | None:
    """A line naming `method` and the share when the last row's `landed` is below `LANDED_WARNING`."""
    last = rows[-1] if rows else {}
    share = last.get("landed")
    if share is None or share >= LANDED_WARNING:
        return None
    return (f"WARNING: {method or 'the method'} landed only {share:.0%} of its edits ({last.get('landed_n')}/"
            f"{last.get('edits')}: the target was not the argmax right after the other edits), below "
            f"{LANDED_WARNING:.0%}; its scores describe edits that mostly did not happen.")


def loc_unavailable(rows: Sequence[dict]) -> str | None:
    """A note when the last row's final-state Loc could not be measured (NaN: no locality prompt left)."""
    loc = ((rows[-1] if rows else {}).get(FINAL) or {}).get("loc")
    if rows and (loc is None or (isinstance(loc, float) and math.isnan(loc))):
        return ("Loc unavailable (final-state): no record of the stream has a locality prompt left to score "
                "(the data gives none, or each is the prompt or a rephrase of an edit)")
    return None


def markdown_table(rows: Sequence[dict], title: str | None = None, method: str | None = None,
                   notes: Sequence[str] = ()) -> str:
    """Rows T; Rel, Gen, Loc, Rel_EM, Gen_EM under the final-state protocol, then the immediate ones,
    landed; below the table a warning naming `method` when too few edits landed (`landed_warning`),
    then `notes` (e.g. "Loc unavailable: ...")."""
    columns = _table_columns(rows)
    show_landed = any(row.get("landed") is not None for row in rows)
    header = ["T"] + [f"{LABELS.get(m, m)} ({p})" for p, m in columns] + ["landed"] * show_landed + ["s/edit"]
    lines = [f"**{title}**", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join(["---:"] * len(header)) + " |")
    for row in rows:
        cells = [str(row["T"])] + [_fmt((row.get(p) or {}).get(m)) for p, m in columns]
        cells += [_fmt(row.get("landed"))] * show_landed
        cells.append(_fmt(row.get("seconds_per_edit")))
        lines.append("| " + " | ".join(cells) + " |")
    warning = landed_warning(rows, method)
    if warning:
        lines += ["", f"**{warning}**"]
    lines += [f"\n**{note}**" for note in notes]
    return "\n".join(lines) + "\n"


def flat_row(row: dict) -> dict[str, Any]:
    """One CSV row: `T`, `seconds_per_edit`, and `<protocol>/<metric>` for every metric."""
    out: dict[str, Any] = {"T": row["T"], "seconds_per_edit": row.get("seconds_per_edit"), "landed": row.get("landed")}
    for protocol in PROTOCOLS:
        for key, value in (row.get(protocol) or {}).items():
            out[f"{protocol}/{key}"] = value
    return out


def plot_results(rows: Sequence[dict], path: str | Path, title: str | None = None) -> Path:
    """Rel, Gen and Loc against T (log x): solid = final-state, dashed = immediate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    ts = [row["T"] for row in rows]
    for metric, color in (("rel", "tab:blue"), ("gen", "tab:orange"), ("loc", "tab:green")):
        for protocol, style in ((FINAL, "-"), (IMMEDIATE, "--")):
            values = [(row.get(protocol) or {}).get(metric, math.nan) for row in rows]
            if all(v is None or math.isnan(v) for v in values):
                continue
            values = [math.nan if v is None else v for v in values]
            ax.plot(ts, values, style, marker="o", color=color, label=f"{LABELS[metric]} ({protocol})")
    ax.set_xscale("log")
    ax.set_xlabel("T (edits so far)")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_results(rows: Sequence[dict], output_dir: str | Path, meta: dict[str, Any] | None = None,
                 title: str | None = None) -> dict[str, Path]:
    """Write results.csv, results.md, results.png and, last, results.json (rows + run metadata),
    each atomically (a temporary file in the same folder, then a rename): a folder holding
    results.json holds the whole run."""
    import io

    from lightning_edit.runtime import atomic_write, temp_path

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: output_dir / f"{RESULTS_STEM}.{ext}" for ext in ("json", "csv", "md", "png")}
    payload = {"protocols": {FINAL: "all edits so far scored after T edits",
                             IMMEDIATE: "mean of each edit's score right after it was applied"},
               "meta": meta or {}, "rows": list(rows)}
    flat = [flat_row(row) for row in rows]
    fields = list(dict.fromkeys(key for row in flat for key in row))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(flat)
    atomic_write(paths["csv"], buffer.getvalue())
    atomic_write(paths["md"], markdown_table(rows, title, (meta or {}).get("method"), (meta or {}).get("notes") or ()))
    png = temp_path(paths["png"]).with_suffix(".png")
    try:
        plot_results(rows, png, title)
        png.replace(paths["png"])
    finally:
        png.unlink(missing_ok=True)
    atomic_write(paths["json"], json.dumps(payload, indent=1) + "\n")
    return paths


def load_results(path: str | Path) -> list[dict]:
    """The rows of a results.json."""
    return json.loads(Path(path).read_text())["rows"]
