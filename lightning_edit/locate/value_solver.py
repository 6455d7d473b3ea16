"""ROME's value solver (Meng et al. 2022, section 3.1, Eq. 4; `compute_v` of the reference code).

Find the vector v* that the MLP at layer l should output at the subject's last token so that the model
predicts the new target: optimise a delta added to the MLP output at that position, in the rewrite
prompt and in a few context-prefixed copies of it, minimising

    NLL(target | prompt, h + delta)                      (teacher forced, mean over contexts and tokens)
  + kl_factor * KL(P_delta || P_orig)                    (next-token distribution at the subject's last
                                                          token of the "{subject} is a" essence prompts)
  + weight_decay * ||delta||^2 / ||h||^2                 (see `ValueSolverConfig.decay`)

with Adam, projecting delta back into the ball ||delta|| <= clamp_norm_factor * ||h|| after each step.
The key k* is the down projection's input at the same position: a rank-one editor maps k* to v*.

Rules instead of model-sized constants (issue 12): ROME's `v_lr` is an absolute Adam step, which moves
delta by about lr * sqrt(d) per step whatever ||h|| is, so a value fitted to one model over- or
under-shoots on another. Here, by default,
  - the learning rate is relative: lr = lr_scale * ||h|| / sqrt(d), each early Adam step moving delta
    by about lr_scale * ||h||;
  - it halves whenever the loss rises (the step overshot);
  - the step budget `steps` grows, up to `max_steps`, while the target NLL still falls, and when it
    stalls above the goal the KL and norm penalties are halved (to `min_penalty` at least);
and the result says whether the NLL goal was met (`ValueResult.goal_met`), so an editor can report it.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lightning_edit.data.records import EditRecord
from lightning_edit.locate.activations import (
    Site,
    SiteSpec,
    capture,
    resolve_site,
)
from lightning_edit.locate.positions import subject_span, token_ending_at
from lightning_edit.models import ModelAdapter, eval_mode, hidden_of, model_device, with_hidden
from lightning_edit.tokens import encode_prompt, pad_id, right_padded, target_positions

DECAY_FORMS = ("relative_sq", "rome")
GENERIC_ESSENCE = "{subject} is a"
"""ROME's essence prompt, used for a model that is not an embedded world."""


def essence_templates(world: Any = None) -> tuple[str, ...]:
    """The prompts the KL term keeps: an embedded world's relation essences (`Relation.essence`, phrased
    as that world's corpus phrases what a subject is), else ROME's generic "{subject} is a"."""
    if world is None:
        return (GENERIC_ESSENCE,)
    return tuple(dict.fromkeys(r.essence for r in world.kb.relations)) or (GENERIC_ESSENCE,)


@dataclass
class ValueSolverConfig:
    """Hyperparameters of the value solver; defaults are ROME's (GPT-2 XL / GPT-J configs)."""

    steps: int = 20
    """Forward passes in the first budget (ROME's v_num_grad_steps); as in ROME the last one only evaluates."""
    max_steps: int | None = None
    """Cap on the forward passes: past `steps` the solve goes on while the target NLL still falls (by 10%
    over the last steps/4 passes) and stops at this cap. None = `steps` (ROME's fixed budget)."""
    lr: float | None = None
    """Absolute Adam learning rate on delta (ROME's v_lr). None = the relative rule with `lr_scale`.
    Adam's step is about lr per coordinate whatever the scale of h, so an absolute value is
    size-dependent: 0.5 suits GPT-2 XL's ||h|| of tens; on toyworld-small (||h|| ~ 0.5 in 64 dims)
    0.05 flipped 20/20 edits at the last token where 0.5 flipped 16-18."""
    lr_scale: float = 0.5
    """The relative rule: lr = lr_scale * ||h|| / sqrt(d), an early Adam step of about lr_scale * ||h||.
    ROME's v_lr 0.5 is 0.74 ||h|| per step at toyworld's layer 0 (||h|| 7.6, d 128) and 2.6 ||h|| at
    toyworld-gpt2's layer 1 (||h|| 2.7, d 192), where the NLL rose instead of falling; 0.5 ||h||
    per step, halved on every rise, met the NLL goal on both worlds (README, value solver)."""
    lr_backoff: float = 0.5
    """The learning rate is multiplied by this whenever the loss rises from one step to the next."""
    min_penalty: float = 1.0 / 64
    """Past the first budget, a solve whose NLL has stalled above the goal halves the weights of its KL and
    norm terms (down to this fraction of `kl_factor` and `weight_decay`) and goes on from the initial
    learning rate. ROME's penalties are sized for GPT-2 XL, where ||delta|| / ||h||^2 is small; with
    ||h|| of 2-7 they balanced the NLL at 0.08-0.5 for 6 of 20 edits on toyworld-gpt2 (layer 0)."""
    weight_decay: float = 0.5
    """Weight of the norm penalty on delta (ROME's v_weight_decay; its Llama configs use 1e-3..0.5)."""
    decay: str = "relative_sq"
    """Penalty form: "relative_sq" = ||delta||^2 / ||h||^2 (scale-free); "rome" = ||delta|| / ||h||^2,
    as ROME's and MEMIT's reference code computes it."""
    clamp_norm_factor: float = 4.0
    """||delta|| is kept <= clamp_norm_factor * ||h||, h the original MLP output at the key position."""
    kl_factor: float = 0.0625
    """Weight of the KL term on the essence prompts (ROME's kl_factor)."""
    nll_threshold: float = 5e-2
    """Stop early once the mean target NLL (nats per token) is below this."""
    context_templates: tuple[str, ...] = (
        "{}",
        "It was a quiet morning. {}",
        "The weather was mild that day. {}",
        "Everyone gathered for the meeting. {}",
    )
    """Copies of the prompt the delta must work in ("{}" is the prompt). ROME samples ten short
    continuations from the model; fixed prefixes keep the solve deterministic and offline. A model
    that never saw two sentences in a row (the embedded worlds) loses its facts after a prefix: use
    ("{}",) there."""
    essence_templates: tuple[str, ...] = (GENERIC_ESSENCE,)
    """Prompts whose next-token distribution at the subject's last token the KL term keeps
    (`essence_templates(world)` gives an embedded world's own)."""
    position: str = "subject_last"
    """Key position: "subject_last" (falls back to the prompt's last token without a subject) or "last"."""
    value_site: SiteSpec = "mlp_output"
    """Where delta is added: the MLP output (= down projection output); "layer_output" for MEMIT."""
    key_site: SiteSpec | None = "down_proj_input"
    """Where the key is read (None: no key, e.g. when a transcoder replaces the MLP)."""

    def __post_init__(self) -> None:
        if self.decay not in DECAY_FORMS:
            raise ValueError(f"ValueSolverConfig.decay is {self.decay!r} (expected one of {DECAY_FORMS})")
        if self.position not in ("subject_last", "last"):
            raise ValueError(f"ValueSolverConfig.position is {self.position!r} (expected 'subject_last' or 'last')")
        if not self.context_templates or any("{}" not in t for t in self.context_templates):
            raise ValueError(f"ValueSolverConfig.context_templates {self.context_templates!r}: each needs '{{}}'")
        if self.steps < 1:
            raise ValueError(f"ValueSolverConfig.steps is {self.steps} (expected >= 1)")
        if self.max_steps is not None and self.max_steps < self.steps:
            raise ValueError(f"ValueSolverConfig.max_steps is {self.max_steps} (expected >= steps = {self.steps})")
        if not 0 < self.lr_backoff <= 1:
            raise ValueError(f"ValueSolverConfig.lr_backoff is {self.lr_backoff} (expected a number in (0, 1])")


@dataclass
class ValueSolverFields:
    """The value solver's hyperparameters as fields of an editor's config (ROME, MEMIT, AlphaEdit, TCPE,
    PNKE), named as the reference code names them (`v_*`); defaults are ROME's (GPT-2 XL,
    `hparams/ROME/gpt2-xl.json`). A method whose paper sets other values overrides the field."""

    position: str = "subject_last"
    """Key position: "subject_last" (the subject's last token: ROME Sec. 3.1, MEMIT Sec. 4.3) or "last"
    (the prompt's)."""
    v_steps: int = 20
    """Value-solver steps in the first budget (the reference code's `v_num_grad_steps`; ROME Eq. 4)."""
    v_max_steps: int | None = 100
    """Cap on the value-solver steps: past `v_steps` the solve goes on while the target NLL still falls
    (`ValueSolverConfig.max_steps`; not in the papers). None = `v_steps`, ROME's fixed budget."""
    v_lr: float | None = None
    """Absolute value-solver Adam learning rate (`v_lr`); size-dependent (see `ValueSolverConfig.lr`).
    None (the default) = the relative rule, `v_lr_scale * ||h|| / sqrt(d)`."""
    v_lr_scale: float = 0.5
    """The relative learning rate rule's scale (`ValueSolverConfig.lr_scale`; not in the papers)."""
    v_weight_decay: float = 0.5
    """Weight of the norm penalty on the value delta (`v_weight_decay`)."""
    v_decay: str = "rome"
    """Penalty form: "rome" = ||delta|| / ||h||^2 as the reference code, "relative_sq" = ||delta||^2 / ||h||^2."""
    clamp_norm_factor: float = 4.0
    """||delta|| <= clamp_norm_factor * ||h||, h the MLP output at the key position (`clamp_norm_factor`)."""
    kl_factor: float = 0.0625
    """Weight of the KL term that keeps the subject's essence prompt (`kl_factor`, ROME Eq. 4's second
    term): an embedded world's `Relation.essence`, else "{subject} is a" (`essence_templates`)."""
    nll_threshold: float = 5e-2
    """The value solver stops once the target NLL is below this (the reference code's 5e-2)."""
    context_templates: list[str] = field(default_factory=lambda: list(ValueSolverConfig.context_templates))
    """Prefixes the value must work in, and that ROME, MEMIT and AlphaEdit average their keys over ("{}" =
    the prompt itself; the reference code samples short continuations from the model, fixed prefixes keep
    the edit deterministic). The embedded worlds need ["{}"]."""

    def value_solver(self, value_site: SiteSpec, key_site: SiteSpec | None, world: Any = None) -> ValueSolverConfig:
        """The solver these fields describe, adding its delta at `value_site` and reading keys at `key_site`;
        its KL term keeps `world`'s essence prompts (an embedded world's, else the generic one)."""
        return ValueSolverConfig(
            steps=self.v_steps, max_steps=self.v_max_steps, lr=self.v_lr, lr_scale=self.v_lr_scale,
            weight_decay=self.v_weight_decay, decay=self.v_decay,
            clamp_norm_factor=self.clamp_norm_factor, kl_factor=self.kl_factor, nll_threshold=self.nll_threshold,
            context_templates=tuple(self.context_templates), essence_templates=essence_templates(world),
            position=self.position, value_site=value_site, key_site=key_site)


@dataclass
class ValueResult:
    """What the solver found for one edit (tensors float32 on the model's device, detached)."""

    value: torch.Tensor
    """v* = h + delta, [d_model]: the MLP output the key position should have."""
    key: torch.Tensor | None
    """k*: the key site's vector at the key position of the bare prompt, [d_key] (None without key_site)."""
    delta: torch.Tensor
    """The optimised delta, [d_model]."""
    original: torch.Tensor
    """h: the MLP output at the key position of the bare prompt before the edit, [d_model]."""
    context_keys: torch.Tensor | None
    """The key in every context template, [n_contexts, d_key] (ROME averages them for its u)."""
    position: int
    """Token index of the key position in the bare prompt."""
    losses: list[dict[str, float]] = field(default_factory=list)
    """Per forward: total, nll, kl, decay, target_prob (mean probability of the target tokens), lr, penalty
    (the fraction of the KL and norm weights in force)."""
    final_nll: float = float("nan")
    """Target NLL (nats per token) with the returned delta: the last forward's, or the lowest seen when
    the goal was not met (then the delta of that forward is returned)."""
    goal_met: bool = False
    """Whether the target NLL went below `nll_threshold` within the step cap."""
    lr: float = 0.0
    """The Adam learning rate the solve started with (after the relative rule)."""


@dataclass
class _Example:
    ids: list[int]
    position: int          # where delta is added
    target_start: int      # first target token (0 for essence prompts: no target)


def _key_index(tok: Any, text: str, char_offset: int, prompt: str, subject: str | None, rule: str) -> int:
    """Key token index in `text`, which contains `prompt` starting at character `char_offset`."""
    span = subject_span(prompt, subject) if rule == "subject_last" else None
    if span is None:
        return len(encode_prompt(tok, text)) - 1
    return token_ending_at(tok, text, char_offset + span[1])


def _examples(tok: Any, record: EditRecord, cfg: ValueSolverConfig) -> tuple[list[_Example], list[_Example]]:
    """(rewrite examples, one per context template; essence examples, empty without a subject)."""
    rewrite = []
    for template in cfg.context_templates:
        text = template.replace("{}", record.prompt, 1)
        offset = template.index("{}")
        ids, start = target_positions(tok, text, record.target_new)
        position = _key_index(tok, text, offset, record.prompt, record.subject, cfg.position)
        rewrite.append(_Example(ids, position, start))
    essence = []
    if record.subject and cfg.kl_factor > 0:
        for template in cfg.essence_templates:
            text = template.replace("{subject}", record.subject)
            offset = template.index("{subject}")
            position = _key_index(tok, text, offset, record.subject, record.subject, "subject_last")
            essence.append(_Example(encode_prompt(tok, text), position, 0))
    return rewrite, essence


def compute_value(model: nn.Module, tok: Any, adapter: ModelAdapter, layer: int, record: EditRecord,
                  config: ValueSolverConfig | None = None, **overrides: Any) -> ValueResult:
    """Solve for v* at `layer` so that `record.target_new` follows `record.prompt` (ROME's compute_v).

    `config` fields can be overridden by keyword (`compute_value(..., steps=40)`). The model's weights
    are not touched and get no `.grad`; it runs in eval mode for the solve. When the NLL goal is not met
    within the cap, the delta with the lowest target NLL seen is returned and `goal_met` is False.
    """
    cfg = replace(config or ValueSolverConfig(), **overrides)
    value_site: Site = resolve_site(adapter, layer, cfg.value_site)
    key_site: Site | None = resolve_site(adapter, layer, cfg.key_site) if cfg.key_site is not None else None
    rewrite, essence = _examples(tok, record, cfg)
    examples = rewrite + essence
    device = model_device(model)
    ids, mask = right_padded([e.ids for e in examples], pad_id(tok), device)
    rows = torch.arange(len(examples), device=device)
    positions = torch.tensor([e.position for e in examples], device=device)
    n_rw = len(rewrite)

    # Teacher-forced target: token j is predicted at j - 1; a [rows, T] mask picks those positions.
    target_mask = torch.zeros(n_rw, ids.shape[1], dtype=torch.bool, device=device)
    for i, e in enumerate(rewrite):
        target_mask[i, e.target_start - 1:len(e.ids) - 1] = True
    next_ids = torch.roll(ids[:n_rw], shifts=-1, dims=1)  # [n_rw, T]: the token each position predicts

    onehot = torch.zeros(ids.shape, device=device)
    onehot[rows, positions] = 1.0
    onehot = onehot.unsqueeze(-1)  # [B, T, 1]: where delta is added in each row

    def add(x: torch.Tensor) -> torch.Tensor:  # at the layer's own device and dtype (a device map's too)
        return x + onehot.to(x.device, x.dtype) * delta.to(x.device, x.dtype)

    if value_site.io == "output":
        hook, kind = (lambda module, args, output: with_hidden(output, add(hidden_of(output)))), "forward"
    else:
        hook, kind = (lambda module, args: (add(args[0]), *args[1:])), "forward_pre"

    with eval_mode(model):
        # The unedited pass: h, the keys, and the essence distributions the KL term keeps.
        with torch.no_grad(), ExitStack() as stack:
            seen_value = stack.enter_context(capture(adapter, value_site))
            seen_key = stack.enter_context(capture(adapter, key_site)) if key_site is not None else None
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        # Under a device map the layer and the logits may sit on other devices than the input ids.
        at_value = seen_value[0].device
        original = seen_value[0][0, int(positions[0])].float()  # h, [d_model], on the layer's device
        context_keys = (seen_key[0][rows[:n_rw].to(seen_key[0].device), positions[:n_rw].to(seen_key[0].device)]
                        .float().to(at_value) if seen_key else None)
        device = logits.device
        rows, positions = rows.to(device), positions.to(device)
        target_mask, next_ids = target_mask.to(device), next_ids.to(device)
        essence_init = torch.log_softmax(logits[rows[n_rw:], positions[n_rw:]].float(), dim=-1)

        delta = torch.zeros_like(original, requires_grad=True)  # read by `add` at call time
        h_norm = original.norm()
        lr = cfg.lr if cfg.lr is not None else float(cfg.lr_scale * h_norm / original.numel() ** 0.5)
        opt = torch.optim.Adam([delta], lr=lr)
        max_norm = cfg.clamp_norm_factor * h_norm
        cap = max(cfg.steps, cfg.max_steps or cfg.steps)
        window = max(1, cfg.steps // 4)
        losses: list[dict[str, float]] = []
        best_nll, best_delta = float("inf"), delta.detach().clone()
        penalty, since = 1.0, 0  # the penalties' current fraction; the step it last changed
        for step in range(cap):
            with torch.enable_grad(), adapter.hooks({value_site.hookpoint: hook}, kind=kind):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                logprobs = torch.log_softmax(logits[:n_rw], dim=-1)
                token_lp = logprobs.gather(2, next_ids[..., None]).squeeze(-1)[target_mask]
                nll = -token_lp.mean()
                if essence:
                    now = torch.log_softmax(logits[rows[n_rw:], positions[n_rw:]], dim=-1)
                    # KL(P_delta || P_orig), batch mean, as ROME's kl_div(init, now, log_target=True).
                    kl = (now.exp() * (now - essence_init)).sum(-1).mean()
                else:
                    kl = torch.zeros((), device=device)
                if cfg.decay == "relative_sq":
                    decay = delta.pow(2).sum() / h_norm.pow(2)
                else:
                    decay = delta.norm() / h_norm.pow(2)
                loss = nll + penalty * (cfg.kl_factor * kl + cfg.weight_decay * decay.to(device))
            row = {"total": loss.item(), "nll": nll.item(), "kl": kl.item(), "decay": decay.item(),
                   "target_prob": token_lp.exp().mean().item(), "lr": opt.param_groups[0]["lr"], "penalty": penalty}
            losses.append(row)
            if row["nll"] < best_nll:
                best_nll, best_delta = row["nll"], delta.detach().clone()
            if row["nll"] < cfg.nll_threshold or step == cap - 1:
                break
            # Past the first budget, go on while the NLL still falls (10% over the last `window` passes); once
            # it stalls, relax the penalties that hold it above the goal, or stop when they are spent.
            stalled = step - since >= window and not row["nll"] < 0.9 * losses[step - window]["nll"]
            if step >= cfg.steps - 1 and stalled:
                if penalty / 2 < cfg.min_penalty or (cfg.kl_factor == 0 and cfg.weight_decay == 0):
                    break
                penalty, since = penalty / 2, step
                for group in opt.param_groups:
                    group["lr"] = lr
            elif step > 0 and row["total"] > losses[step - 1]["total"]:
                for group in opt.param_groups:  # the last step overshot
                    group["lr"] *= cfg.lr_backoff
            (grad,) = torch.autograd.grad(loss, delta)
            delta.grad = grad
            opt.step()
            with torch.no_grad():
                norm = delta.norm()
                if norm > max_norm:
                    delta.mul_(max_norm / norm)

    goal_met = losses[-1]["nll"] < cfg.nll_threshold
    delta = delta.detach() if goal_met else best_delta
    key = context_keys[0] if context_keys is not None else None
    return ValueResult(value=original + delta, key=key, delta=delta, original=original,
                       context_keys=context_keys, position=rewrite[0].position, losses=losses,
                       final_nll=losses[-1]["nll"] if goal_met else best_nll, goal_met=goal_met, lr=lr)
