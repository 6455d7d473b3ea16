"""Diagnostics for MicroEdit's scope gates: can tau separate what was edited from what was not?

For a set of edit records and a reference corpus, `scope_report` measures each gate's statistic
(ARD, delta, overlap; see `gates.py`) per text, in groups:
    reference   corpus lines                     (out of scope)
    edit        the edit prompts                 (in scope)
    rephrase    their paraphrases                (in scope: Gen)
    locality    their locality prompts           (out of scope: Loc)
each measured with the unedited decoder ("before") and the decoder as edited now ("after"). It
reports quantiles per group, the AUROC of in-scope vs out-of-scope after editing (oriented so that
1.0 means the gate's admit direction separates them perfectly, 0.5 means not at all), and the tau
`propose_tau` picks. `plot_report` draws the histograms with tau as a line.

Texts are scored as the metrics feed them (prompt + " " + answer) unless `with_targets=False`, so a
proposed tau fits the teacher-forced Rel/Gen/Loc protocol.

    lightning-edit calibrate ...   (or `lightning calibrate ...`, the same arguments as below)
    python -m lightning_edit.editors.ard_diagnostics [world=toyworld] [T=50] [out=<dir>]
        [key=value: MicroEdit options, e.g. gate=ard]
    python -m lightning_edit.editors.ard_diagnostics state=<run>/edit_state [data=<edit file>]
        [corpus=<text file>] [out=<dir>]
runs T edits of the world's CounterFact stream with configs/microedit.yaml (or loads a saved edit
state, finding its records in `data`) and writes report.json, summary.md and ard_diagnostics.png;
the table and the proposed tau of the configured gate are printed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from lightning_edit.world import world_of

GROUPS_IN = ("edit", "rephrase")
GROUPS_OUT = ("locality", "reference")
ADMITS_HIGH = {"ard": False, "delta": True, "overlap": True}
TAU_KEYS = {"ard": "tau", "delta": "delta_tau", "overlap": "overlap_tau"}
"""The MicroEdit config key holding each gate's threshold."""


def _texts(records: Sequence[Any], with_targets: bool) -> dict[str, list[str]]:
    from lightning_edit.metrics import join_prompt_target

    def text(prompt: str, answer: str | None) -> str:
        return join_prompt_target(prompt, answer) if with_targets and answer else prompt

    return {
        "edit": [text(r.prompt, r.target_new) for r in records],
        "rephrase": [text(p, r.target_new) for r in records for p in r.rephrase_prompts],
        "locality": [text(p.prompt, p.answer) for r in records for p in r.locality],
    }


def auroc(in_scope: torch.Tensor, out_scope: torch.Tensor, admits_high: bool) -> float:
    """P(a random in-scope text is more admissible than a random out-of-scope one); NaN if a side is empty."""
    if len(in_scope) == 0 or len(out_scope) == 0:
        return math.nan
    from sklearn.metrics import roc_auc_score

    sign = 1.0 if admits_high else -1.0
    scores = torch.cat([in_scope, out_scope]).double() * sign
    labels = [1] * len(in_scope) + [0] * len(out_scope)
    return float(roc_auc_score(labels, scores.numpy()))


def propose_tau(in_scope: torch.Tensor | None, out_scope: torch.Tensor, admits_high: bool,
                max_out_admitted: float | None = None, quantile: float = 0.99) -> float:
    """A threshold for the gate.

    With in-scope statistics: the tau maximising TPR - FPR (Youden's J) over the observed values,
    or, with `max_out_admitted`, the most permissive tau that admits at most that share of the
    out-of-scope texts. Without (nothing edited yet): the `quantile` of the out-of-scope statistic
    (for ARD, the paper's "ARD <= tau" keeps that share of unrelated inputs on the SAE path).
    Always finite.
    """
    out_scope = out_scope.double()
    if in_scope is None or len(in_scope) == 0:
        q = quantile if not admits_high else 1.0 - quantile
        return float(torch.quantile(out_scope, q)) if len(out_scope) else 0.0
    in_scope = in_scope.double()
    sign = 1.0 if admits_high else -1.0  # work in "admit iff s >= t" with s = sign * stat
    s_in, s_out = in_scope * sign, out_scope * sign
    candidates = torch.cat([s_in, s_out]).unique()
    tpr = (s_in[None, :] >= candidates[:, None]).double().mean(1)
    fpr = (s_out[None, :] >= candidates[:, None]).double().mean(1) if len(s_out) else torch.zeros_like(tpr)
    if max_out_admitted is not None:
        ok = fpr <= max_out_admitted
        best = int(torch.nonzero(ok)[0]) if ok.any() else len(candidates) - 1  # most permissive allowed
    else:
        best = int((tpr - fpr).argmax())
    tau = float(candidates[best]) * sign
    return tau if math.isfinite(tau) else 0.0


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    if len(x) == 0:
        return {}
    qs = torch.quantile(x.double(), torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0], dtype=torch.double))
    return {"min": float(qs[0]), "p5": float(qs[1]), "p50": float(qs[2]), "p95": float(qs[3]),
            "max": float(qs[4]), "n": len(x)}


def scope_report(editor, records: Sequence[Any], corpus: Sequence[str] | None = None,
                 gates: Sequence[str] = ("ard", "delta", "overlap"), n_reference: int = 256,
                 with_targets: bool = True) -> dict[str, Any]:
    """Each gate's statistic per group before and after editing, AUROC and a proposed tau.

    Returns {"values": {gate: {"before"|"after": {group: Tensor}}}, "summary": {gate: {...}}}.
    """
    from lightning_edit.editors.microedit import _spread

    corpus = corpus if corpus is not None else (editor.reference_corpus or [])
    texts = _texts(records, with_targets)
    texts["reference"] = _spread([c for c in corpus if c.strip()], n_reference)
    values: dict[str, dict[str, dict[str, torch.Tensor]]] = {g: {"before": {}, "after": {}} for g in gates}
    for when, base in (("before", True), ("after", False)):
        for group, items in texts.items():
            if not items:
                for g in gates:
                    values[g][when][group] = torch.zeros(0)
                continue
            stats = editor.scope_statistics(items, gates=gates, base=base)
            for g in gates:
                values[g][when][group] = stats[g]
    summary = {}
    for g in gates:
        high = ADMITS_HIGH[g]
        after = values[g]["after"]
        s_in = torch.cat([after[k] for k in GROUPS_IN])
        s_out = torch.cat([after[k] for k in GROUPS_OUT])
        tau = propose_tau(s_in if len(records) else None, s_out, high)
        summary[g] = {
            "admit": ">= tau" if high else "<= tau",
            "auroc_in_vs_out": auroc(s_in, s_out, high),
            "auroc_edit_vs_locality": auroc(after["edit"], after["locality"], high),
            "auroc_rephrase_vs_locality": auroc(after["rephrase"], after["locality"], high),
            "proposed_tau": tau,
            "admitted_at_proposed_tau": {
                k: float(((v >= tau) if high else (v <= tau)).double().mean()) if len(v) else math.nan
                for k, v in after.items()},
            "quantiles": {when: {k: _quantiles(v) for k, v in values[g][when].items()}
                          for when in ("before", "after")},
        }
    for g in gates:
        tau = editor.taus.get(g)
        if tau is None:
            continue
        high = ADMITS_HIGH[g]
        summary[g]["admitted_at_current_tau"] = {
            k: float(((v >= tau) if high else (v <= tau)).double().mean()) if len(v) else math.nan
            for k, v in values[g]["after"].items()}
        summary[g]["current_tau"] = tau
    return {"values": values, "summary": summary, "alpha": editor.alpha, "edits": len(editor.ledger)}


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Histograms of every gate's statistic per group, before and after editing, tau as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in report.items() if k != "values"}
    data["values"] = {g: {w: {k: v.tolist() for k, v in groups.items()} for w, groups in whens.items()}
                      for g, whens in report["values"].items()}
    (out_dir / "report.json").write_text(json.dumps(data, indent=1) + "\n")
    plot_report(report, out_dir / "ard_diagnostics.png")
    (out_dir / "summary.md").write_text(summary_table(report) + "\n")
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(int(args.pop("threads", "1")))
    from lightning_edit.data import read_edits

    out = Path(args.pop("out", "runs/ard_diagnostics"))
    state = args.pop("state", None)
    if state:
        from lightning_edit.editors.state import load_edited

        editor, model, _ = load_edited(state)
        records = _ledger_records(editor, args.pop("data", None), model)
        corpus = args.pop("corpus", None)
        if corpus:
            corpus = Path(corpus).read_text().splitlines()
        else:
            world = world_of(model)
            corpus = world.corpus_path.read_text().splitlines() if world is not None else []
        editor.reference_corpus = corpus
    else:
        from lightning_edit.config import load_config
        from lightning_edit.editors.microedit import MicroEdit
        from lightning_edit.jobs.edit import SCHEMA
        from lightning_edit.models import ModelAdapter, load_model
        from lightning_edit.world import load_world

        world_name = args.pop("world", "toyworld")
        T = int(args.pop("T", "50"))
        overrides = [f"model.name={world_name}"] + [f"editor.{k}={v}" for k, v in args.items()]
        cfg = load_config(SCHEMA, overrides, default_config="microedit.yaml")
        world = load_world(world_name)
        model, tokenizer = load_model(world_name)
        editor = MicroEdit.from_config(cfg, model, tokenizer, ModelAdapter(model))
        corpus = editor.reference_corpus
        editor.prepare(corpus)
        records = read_edits(world.counterfact_path)[:T]
        for record in records:
            editor.apply([record])
    report = scope_report(editor, records, corpus)
    save_report(report, out)
    print(summary_table(report))
    g = editor.cfg.effective_gate
    if g in report["summary"]:
        tau = report["summary"][g]["proposed_tau"]
        print(f"\nproposed tau for the {g} gate: {tau:.6g} (configured: {editor.tau}); report in {out}")
        print(f"use it with: editor.gate={g} editor.{TAU_KEYS[g]}={tau:.6g}")
    return 0


def _ledger_records(editor, data: str | None, model) -> list[Any]:
    """The records behind the ledger: looked up by prompt and target in `data` (default: the
    embedded world's CounterFact export), else just prompt and target (no rephrases, no locality)."""
    from lightning_edit.data import EditRecord, read_edits

    path = data
    if path is None:
        world = world_of(model)
        path = world.counterfact_path if world is not None else None
    by_key = {}
    if path is not None:
        by_key = {(r.prompt, r.target_new): r for r in read_edits(path)}
    return [by_key.get((e.prompt, e.target)) or EditRecord(prompt=e.prompt, target_new=e.target)
            for e in editor.ledger if not e.extra.get("rolled_back")]


if __name__ == "__main__":
    raise SystemExit(main())
