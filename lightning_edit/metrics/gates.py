"""How well a scope gate separates what was edited from what was not (MicroEdit's gates,
`editors/gates.py`), and the threshold it should use.

For a set of edit records and a reference corpus, `scope_report` measures each gate's statistic
(ARD, delta, overlap) per text, in groups:
    reference   corpus lines                     (out of scope)
    edit        the edit prompts                 (in scope)
    rephrase    their paraphrases                (in scope: Gen)
    locality    their locality prompts           (out of scope: Loc)
each measured with the unedited decoder ("before") and the decoder as edited now ("after"). It
reports quantiles per group, the AUROC of in-scope vs out-of-scope after editing (oriented so that
1.0 means the gate's admit direction separates them perfectly, 0.5 means not at all), and the tau
`propose_tau` picks. Texts are scored as the metrics feed them (prompt + " " + answer) unless
`with_targets=False`, so a proposed tau fits the teacher-forced Rel/Gen/Loc protocol.

The editor is anything with MicroEdit's `scope_statistics(texts, gates, base)`, `taus`, `alpha` and
`ledger`. `lightning calibrate` (jobs/calibrate.py) runs this and writes the report.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from lightning_edit.locate.statistics import evenly_spaced
from lightning_edit.tokens import join_prompt_target

GROUPS_IN = ("edit", "rephrase")
GROUPS_OUT = ("locality", "reference")
ADMITS_HIGH = {"ard": False, "delta": True, "overlap": True}
"""Each gate's admit direction: >= tau (True) or <= tau (False)."""


def scope_texts(records: Sequence[Any], with_targets: bool = True) -> dict[str, list[str]]:
    """The in-scope (edit, rephrase) and locality texts of `records`."""
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


def quantiles(x: torch.Tensor) -> dict[str, float]:
    """min, p5, p50, p95, max and n of a statistic ({} when empty)."""
    if len(x) == 0:
        return {}
    qs = torch.quantile(x.double(), torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0], dtype=torch.double))
    return {"min": float(qs[0]), "p5": float(qs[1]), "p50": float(qs[2]), "p95": float(qs[3]),
            "max": float(qs[4]), "n": len(x)}


def admitted(values: dict[str, torch.Tensor], tau: float, admits_high: bool) -> dict[str, float]:
    """The share of each group a gate admits at `tau` (NaN for an empty group)."""
    return {k: float(((v >= tau) if admits_high else (v <= tau)).double().mean()) if len(v) else math.nan
            for k, v in values.items()}


def scope_report(editor, records: Sequence[Any], corpus: Sequence[str],
                 gates: Sequence[str] = ("ard", "delta", "overlap"), n_reference: int = 256,
                 with_targets: bool = True) -> dict[str, Any]:
    """Each gate's statistic per group before and after editing, AUROC and a proposed tau.

    Returns {"values": {gate: {"before"|"after": {group: Tensor}}}, "summary": {gate: {...}},
    "alpha", "edits"}.
    """
    texts = scope_texts(records, with_targets)
    texts["reference"] = evenly_spaced([c for c in corpus if c.strip()], n_reference)
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
            "admitted_at_proposed_tau": admitted(after, tau, high),
            "quantiles": {when: {k: quantiles(v) for k, v in values[g][when].items()}
                          for when in ("before", "after")},
        }
    for g in gates:
        tau = editor.taus.get(g)
        if tau is None:
            continue
        summary[g]["admitted_at_current_tau"] = admitted(values[g]["after"], tau, ADMITS_HIGH[g])
        summary[g]["current_tau"] = tau
    return {"values": values, "summary": summary, "alpha": editor.alpha, "edits": len(editor.ledger)}
