"""MENT's data (seeds/001, III-C and III-D) on the code world.

**Patch sets** (RQ1/RQ2): every D line of a set of held-out programs is a data pair, "line-level
code generation": the input is the program's Java with the *reference* D of the lines before
(`format.prompt`), the ground truth is the reference line. The LM writes the line greedily; where it
first differs from the ground truth is an **LLM error**, whose patch set (size 1) is the input
extended by the correct tokens before the error, and the correct next token as the target (`<j>`
when the model should have ended the line). Pairs without an error stay in the set: EM and the other
generation metrics are averaged over all data pairs, as in the paper's Table III.

**Probe benchmark** (RQ3): for each Expression subtype (`world.SUBTYPES`: assign, assign_multiply,
arithmetic_mod, bit_logical_and, comparison_ge) `n` prompts that end right before that operator in a
reference D line, each one the LM completes with the operator (its argmax), each paired with the
subtype's three target tokens: 3n samples per subtype (the paper: 10 prompts x 3 targets). Each
sample is a patch set (make the target the argmax); the other prompts of its subtype are the
generalisation probe G and the prompts of the other subtypes the specificity probe S.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from lightning_edit.tokens import encode_prompt, pad_id, right_padded

from .format import JAVA, java_lines, prompt, statement_pairs
from .lexer import pretty
from .programs import Program
from .translate import MAX_LINE_TOKENS, Generate, first_line


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """[n, V] float32 log-probabilities of the token after each prompt (right-padded batches)."""
    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(prompts), batch_size):
            seqs = [encode_prompt(tokenizer, p) for p in prompts[first:first + batch_size]]
            ids, mask = right_padded(seqs, pad_id(tokenizer), device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            last = mask.sum(dim=1) - 1
            out.append(torch.log_softmax(logits[torch.arange(len(seqs)), last], dim=-1))
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def data_pairs(programs: Sequence[Program]) -> list[dict]:
    """Every non-empty reference D line of `programs` as (prompt, ground truth)."""
    pairs = []
    for pid, p in enumerate(programs):
        sp = statement_pairs(p, "d")
        java, ref = [j for j, _ in sp], [d for _, d in sp]
        for k, line in enumerate(ref):
            if line:
                pairs.append({"program": pid, "template": p.template, "line": k, "prompt": prompt(java, ref, k),
                              "ground_truth": " ".join(line)})
    return pairs


def first_error(generated: list[str], truth: list[str]) -> int | None:
    """Index of the first token where `generated` (a whole line) departs from `truth`; None if equal.
    Index len(truth) means the model did not end the line there."""
    for i, tok in enumerate(truth):
        if i >= len(generated) or generated[i] != tok:
            return i
    return len(truth) if len(generated) > len(truth) else None


def with_errors(pairs: list[dict], generated: list[list[str]]) -> list[dict]:
    """`pairs` with the generation and its first error (the patch set) filled in."""
    out = []
    for pair, gen in zip(pairs, generated):
        truth = pair["ground_truth"].split()
        at = first_error(gen, truth)
        error = None
        if at is not None:
            error = {"position": at, "prompt": " ".join([pair["prompt"], *truth[:at]]),
                     "target": truth[at] if at < len(truth) else JAVA,
                     "predicted": gen[at] if at < len(gen) else JAVA}
        out.append({**pair, "generated": " ".join(gen), "error": error})
    return out


def generate_lines(generate: Generate, prompts: list[str], batch_size: int = 64) -> list[list[str]]:
    out = []
    for first in range(0, len(prompts), batch_size):
        out += [first_line(t) for t in generate(prompts[first:first + batch_size], MAX_LINE_TOKENS)]
    return out


def build_patch_sets(generate: Generate, programs: Sequence[Program], tokenizer=None) -> list[dict]:
    """The data pairs of `programs` with the LM's generation and first error each (`ment_patch.json`)."""
    pairs = data_pairs(programs)
    generated = generate_lines(generate, [p["prompt"] for p in pairs])
    out = with_errors(pairs, generated)
    for i, pair in enumerate(out):
        pair["id"] = i
    for pid, p in enumerate(programs):  # the programs themselves, for people reading the file
        for pair in out:
            if pair["program"] == pid:
                pair.setdefault("java", pretty(p.java))
                break
    return out


def build_probe_set(model, tokenizer, programs: Sequence[Program], subtypes: dict[str, tuple[str, tuple[str, ...]]],
                    n_prompts: int, seed: int) -> list[dict]:
    """`n_prompts` prompts per subtype where the LM's argmax is the subtype's operator, each with the
    subtype's three targets (`ment_probe.json`); prompts from distinct programs where possible."""
    rng = random.Random(f"probe:{seed}")
    candidates: dict[str, list[tuple[int, str]]] = {name: [] for name in subtypes}
    for pid, p in enumerate(programs):
        sp = statement_pairs(p, "d")
        java, ref = java_lines(p), [d for _, d in sp]
        for k, line in enumerate(ref):
            for pos, tok in enumerate(line):
                for name, (op, _) in subtypes.items():
                    if tok == op:
                        candidates[name].append((pid, prompt(java, ref, k, line[:pos])))
    samples = []
    vocab = tokenizer.get_vocab()
    for name, (op, targets) in subtypes.items():
        pool = candidates[name]
        rng.shuffle(pool)
        lp = next_token_logprobs(model, tokenizer, [text for _, text in pool]) if pool else torch.empty(0)
        chosen, used = [], set()
        for (pid, text), row in zip(pool, lp):
            if int(row.argmax()) == vocab[op] and pid not in used:
                chosen.append((pid, text))
                used.add(pid)
            if len(chosen) == n_prompts:
                break
        if len(chosen) < n_prompts:  # allow a second prompt from the same program
            for (pid, text), row in zip(pool, lp):
                if len(chosen) == n_prompts:
                    break
                if int(row.argmax()) == vocab[op] and (pid, text) not in chosen:
                    chosen.append((pid, text))
        if len(chosen) < n_prompts:
            raise ValueError(f"MENT probe subtype {name}: only {len(chosen)} prompts where the LM predicts {op!r}; "
                             f"need {n_prompts}")
        for k, (pid, text) in enumerate(chosen):
            for target in targets:
                samples.append({"id": len(samples), "type": "expression", "subtype": name, "prompt_id": f"{name}/{k}",
                                "argmax": op, "target": target, "prompt": text, "program": pid,
                                "template": programs[pid].template})
    return samples
