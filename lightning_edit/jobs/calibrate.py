"""`calibrate`: can MicroEdit's scope gates tell what was edited from what was not, and at which tau?

    lightning calibrate state=runs/edit/<stamp>             # a finished run (or its edit_state/)
    lightning calibrate T=50 editor.gate=ard               # edit T records of the world first

Measures each gate's statistic (ARD, delta, overlap) on the edited prompts, their rephrases, their
locality prompts and reference-corpus lines, before and after editing (`metrics/gates.py`), prints
the separation (AUROC) and a proposed tau as a config override, and writes report.json, summary.md
and ard_diagnostics.png to `out`.

With `state`, the saved edit state is rebuilt onto its base model (`load_edited`) and the records
behind its ledger are looked up in `data` (default: the embedded world's CounterFact export).
Without, the edit job's config (`edit_config`, MicroEdit options from `editor.*`) is built by the
same `build_edit_run` as `run edit` and the first T records of its stream are applied.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_edit.constants import REPORT_JSON, REPORT_PLOT, SUMMARY_MD

SUMMARY = "MicroEdit scope gates: ARD / delta / overlap diagnostics, AUROC and a proposed tau"
DEFAULT_CONFIG = "calibrate.yaml"
EXAMPLES = """Examples:
  lightning calibrate state=runs/edit/<stamp>              (a finished run, or its edit_state/)
  lightning calibrate state=runs/edit/<stamp> data=<edits.json> corpus=<corpus.txt>
  lightning calibrate T=50 editor.gate=ard                 (edit T records of the world first)"""
TAU_KEYS = {"ard": "tau", "delta": "delta_tau", "overlap": "overlap_tau"}
"""The MicroEdit config key holding each gate's threshold."""


@dataclass
class CalibrateConfig:
    state: str | None = None
    """A run folder (the one `run edit` prints) or its `edit_state/`; None = build a MicroEdit editor
    and apply `T` edits first."""
    data: str | None = None
    """Edit file: the records behind the state's ledger, or the stream edited first; None = the
    embedded world's CounterFact export."""
    corpus: str | None = None
    """Reference corpus (a text file, one passage a line); None = the embedded world's."""
    out: str = "runs/ard_diagnostics"
    """Where report.json, summary.md and ard_diagnostics.png are written."""
    n_reference: int = 256
    """Reference-corpus lines measured (evenly spaced through the corpus)."""
    threads: int = 1
    """torch CPU threads."""
    world: str = "toyworld"
    """Without `state`: model.name of the run edited first."""
    T: int = 50
    """Without `state`: how many records of the stream are applied first."""
    edit_config: str = "microedit.yaml"
    """Without `state`: the edit job's config the editor is built from."""
    editor: dict[str, Any] = field(default_factory=dict)
    """Without `state`: MicroEdit options over that config's `editor:` section (e.g. editor.gate=ard)."""
    edit_overrides: list[str] = field(default_factory=list)
    """Without `state`: any other `run edit` overrides, e.g. '["component.path=<sae folder>"]'."""


SCHEMA = CalibrateConfig


def run(cfg: DictConfig) -> int:
    from lightning_edit.runtime import set_cpu_threads

    set_cpu_threads(cfg.threads)
    try:
        editor, records, corpus = _from_state(cfg) if cfg.state else _edited_now(cfg)
    except (FileNotFoundError, KeyError, ValueError) as exc:  # a missing state, a bad option: nothing written
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}", file=sys.stderr)
        return 2
    from lightning_edit.metrics.gates import scope_report

    report = scope_report(editor, records, corpus, n_reference=cfg.n_reference)
    out = save_report(report, cfg.out)
    print(summary_table(report))
    gate = editor.cfg.effective_gate
    if gate in report["summary"]:
        tau = report["summary"][gate]["proposed_tau"]
        print(f"\nproposed tau for the {gate} gate: {tau:.6g} (configured: {editor.tau}); report in {out}")
        print(f"use it with: editor.gate={gate} editor.{TAU_KEYS[gate]}={tau:.6g}")
    return 0


def _from_state(cfg: DictConfig):
    """(editor, the records behind its ledger, corpus) of a saved edit state."""
    from lightning_edit.data import read_edits
    from lightning_edit.editors.state import find_edit_state, read_edit_state
    from lightning_edit.jobs.edit_run import load_edited, read_corpus
    from lightning_edit.world import world_for

    state = find_edit_state(cfg.state)
    settings, _ = read_edit_state(state)  # a folder that is no edit state fails here, before any model is loaded
    _check_microedit(settings["method"], state)
    editor, _, _ = load_edited(state)
    world = editor.ctx.world or world_for(settings.get("model"))
    path = cfg.data or (world.counterfact_path if world is not None else None)
    by_key = {(r.prompt, r.target_new): r for r in read_edits(path)} if path is not None else {}
    records = [by_key.get((e.prompt, e.target)) or _bare_record(e.prompt, e.target)
               for e in editor.ledger if not e.extra.get("rolled_back")]
    return editor, records, read_corpus(cfg.corpus, world) or []


def _edited_now(cfg: DictConfig):
    """(editor, the records it applied, corpus): `build_edit_run` on the edit config, T edits applied."""
    from lightning_edit.config import load_config
    from lightning_edit.jobs import edit as edit_job
    from lightning_edit.jobs.edit_run import build_edit_run

    overrides = [f"config={cfg.edit_config}", f"model.name={cfg.world}", f"data.limit={cfg.T}",
                 f"threads={cfg.threads}", *cfg.edit_overrides]
    edit_cfg = load_config(edit_job.SCHEMA, overrides)
    edit_cfg.data.path, edit_cfg.data.corpus = cfg.data, cfg.corpus
    edit_cfg.editor = OmegaConf.merge(edit_cfg.editor, cfg.editor)
    _check_microedit(edit_cfg.editor.get("method"), cfg.edit_config)
    run = build_edit_run(edit_cfg)
    records = list(run.stream.records)
    for record in records:
        run.editor.apply([record])
    return run.editor, records, run.editor_corpus or []


def _check_microedit(method: str | None, where: Any) -> None:
    if method != "microedit":
        raise ValueError(f"{where}: calibrate measures MicroEdit's scope gates; this is a '{method}' editor")


def _bare_record(prompt: str, target: str):
    from lightning_edit.data import EditRecord

    return EditRecord(prompt=prompt, target_new=target)


# --- the report ---------------------------------------------------------------------------------


def summary_table(report: dict[str, Any]) -> str:
    lines = ["| gate | admit | AUROC in/out | AUROC edit/loc | AUROC rephrase/loc | proposed tau | admitted edit / rephrase / locality / reference |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for g, s in report["summary"].items():
        adm = s["admitted_at_proposed_tau"]
        lines.append(f"| {g} | {s['admit']} | {s['auroc_in_vs_out']:.3f} | {s['auroc_edit_vs_locality']:.3f} | "
                     f"{s['auroc_rephrase_vs_locality']:.3f} | {s['proposed_tau']:.4g} | "
                     + " / ".join(f"{adm.get(k, math.nan):.2f}" for k in ("edit", "rephrase", "locality", "reference"))
                     + " |")
    return "\n".join(lines)


def save_report(report: dict[str, Any], out_dir: str | Path) -> Path:
    """report.json (statistics and values), summary.md and the histogram PNG in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in report.items() if k != "values"}
    data["values"] = {g: {w: {k: v.tolist() for k, v in groups.items()} for w, groups in whens.items()}
                      for g, whens in report["values"].items()}
    (out_dir / REPORT_JSON).write_text(json.dumps(data, indent=1) + "\n")
    plot_report(report, out_dir / REPORT_PLOT)
    (out_dir / SUMMARY_MD).write_text(summary_table(report) + "\n")
    return out_dir


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Histograms of every gate's statistic per group, before and after editing, tau as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    gates = list(report["values"])
    fig, axes = plt.subplots(len(gates), 2, figsize=(11, 3.2 * len(gates)), squeeze=False)
    colors = {"reference": "grey", "locality": "tab:red", "edit": "tab:blue", "rephrase": "tab:green"}
    for row, g in enumerate(gates):
        log = g in ("ard", "delta")
        for col, when in enumerate(("before", "after")):
            ax = axes[row][col]
            groups = report["values"][g][when]
            pooled = torch.cat([v for v in groups.values() if len(v)]).double()
            if len(pooled) == 0 or float(pooled.abs().max()) == 0.0:
                ax.text(0.5, 0.5, f"{g}: 0 for every text (no edit to compare with)", ha="center",
                        va="center", transform=ax.transAxes)
                ax.set_title(f"{g} {when} editing", fontsize=10)
                continue
            if log:
                pos = pooled[pooled > 0]
                lo = float(pos.min()) if len(pos) else 1e-6
                hi = float(pooled.max()) if len(pooled) else 1.0
                bins = torch.logspace(math.log10(lo), math.log10(max(hi, lo * 10)), 40).numpy()
                ax.set_xscale("log")
            else:
                bins = torch.linspace(0, max(1e-6, float(pooled.max()) if len(pooled) else 1), 40).numpy()
            for group, v in groups.items():
                if len(v):
                    data = v.double().clamp_min(bins[0]).numpy()
                    ax.hist(data, bins=bins, alpha=0.45, density=True, label=f"{group} ({len(v)})",
                            color=colors.get(group))
            summary = report["summary"][g]
            ax.axvline(summary["proposed_tau"], color="black", linestyle="--", label="proposed tau")
            if "current_tau" in summary:
                ax.axvline(summary["current_tau"], color="purple", linestyle=":", label="config tau")
            title = f"{g} {when} editing"
            if when == "after":
                title += f" (AUROC in/out {summary['auroc_in_vs_out']:.2f})"
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=7)
    fig.suptitle(f"MicroEdit scope statistics after {report['edits']} edits (admit: "
                 + ", ".join(f"{g} {report['summary'][g]['admit']}" for g in gates) + ")", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
