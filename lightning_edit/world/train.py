"""Training a world's tiny LM with Lightning, and the object accuracy that says it knows its world.

Each training example is one sentence as the world's tokenizer encodes it, `[<bos>] prompt object .
<eos>` for the (fact, template) pairs the knowledge base marks as trained, or `[<bos>] filler <eos>`.
Loss (FINDINGS): the sentence LM loss plus an extra cross-entropy on the object's tokens, which
memorises facts ~5x faster than sentence loss alone while keeping the model a language model of its
templates.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Sampler, TensorDataset
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from .knowledge import KnowledgeBase
from .spec import Architecture, TrainRecipe


# ----- data ---------------------------------------------------------------------------------------
def encode_rows(tokenizer: PreTrainedTokenizerFast, rows: list[tuple[str, str | None, str]],
                append_eos: bool) -> TensorDataset:
    """(input_ids, attention_mask, object_mask), right-padded, for rows (prompt, object, text).

    `text` is what is encoded (a fact sentence that starts with `prompt + " " + object`, or a filler
    sentence with prompt and object None); `object_mask` marks the object's tokens, found as the edit
    metrics find a target (`target_positions`: the tokens of `prompt + " " + object` beyond the
    prompt's own), so a world's accuracy is the metrics' teacher-forced exact match.
    """
    from lightning_edit.tokens import pad_id, right_padded, target_positions

    sequences, spans = [], []
    for prompt, obj, text in rows:
        ids = tokenizer(text)["input_ids"] + ([tokenizer.eos_token_id] if append_eos else [])
        span = (0, 0)
        if obj is not None:
            fact_ids, start = target_positions(tokenizer, prompt, obj)
            if ids[: len(fact_ids)] != fact_ids:
                raise ValueError(f"{text!r} does not tokenise as its fact {prompt!r} + {obj!r} followed by more")
            span = (start, len(fact_ids))
        sequences.append(ids)
        spans.append(span)
    input_ids, mask = right_padded(sequences, pad_id(tokenizer))
    object_mask = torch.zeros_like(mask, dtype=torch.bool)
    for i, (start, end) in enumerate(spans):
        object_mask[i, start:end] = True
    return TensorDataset(input_ids, mask, object_mask)


def encode_training_set(kb: KnowledgeBase, tokenizer: PreTrainedTokenizerFast) -> TensorDataset:
    """Every trained fact sentence (+ EOS) and every filler sentence (no object tokens)."""
    rows: list[tuple[str, str | None, str]] = []
    for fact in kb.facts:
        prompts = kb.prompts(fact)
        for t in kb.train_templates[(fact.subject, fact.relation)]:
            rows.append((prompts[t], fact.object, kb.sentence(fact, t)))
    rows += [(None, None, sentence) for sentence in kb.filler]
    return encode_rows(tokenizer, rows, append_eos=True)


# ----- accuracy -----------------------------------------------------------------------------------
def object_hits(logits: torch.Tensor, input_ids: torch.Tensor, object_mask: torch.Tensor) -> torch.Tensor:
    """Per object token (in `object_mask` order): is it the argmax of the logits one position earlier?"""
    target_mask = object_mask[:, 1:]
    return logits[:, :-1][target_mask].argmax(-1) == input_ids[:, 1:][target_mask]


@torch.no_grad()
def object_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, kb: KnowledgeBase,
                    batch_size: int = 1024, encoded: TensorDataset | None = None) -> dict:
    """Teacher-forced object accuracy for every fact in every template: a fact is known in a template
    when every object token is the argmax after `prompt + " " + object`'s preceding tokens (the edit
    metrics' exact match; for single-token objects, next-token argmax == object).

    encoded: `fact_probes(kb, tokenizer)`, when already computed. Returns overall, per-relation, and
    trained vs held-out (fact, template) pair accuracies.
    """
    was_training = model.training
    model.eval()
    rows = [(fact, t) for fact in kb.facts for t in range(len(kb.prompts(fact)))]
    input_ids, mask, object_mask = (encoded or fact_probes(kb, tokenizer)).tensors
    correct = torch.zeros(len(rows), dtype=torch.bool)
    for start in range(0, len(rows), batch_size):
        sl = slice(start, start + batch_size)
        width = int(mask[sl].sum(1).max())  # rows are right-padded: drop columns nobody uses
        ids, m, obj = input_ids[sl, :width], mask[sl, :width], object_mask[sl, :width]
        logits = model(input_ids=ids, attention_mask=m).logits
        hit = torch.ones_like(obj)
        hit[:, 1:][obj[:, 1:]] = object_hits(logits, ids, obj)
        correct[sl] = hit.all(1)
    model.train(was_training)

    def mean(keep) -> float | None:
        picked = [bool(c) for c, row in zip(correct, rows) if keep(row)]
        return sum(picked) / len(picked) if picked else None

    trained = lambda row: row[1] in kb.train_templates[(row[0].subject, row[0].relation)]  # noqa: E731
    return {
        "accuracy": mean(lambda row: True),
        "per_relation": {r.name: mean(lambda row, n=r.name: row[0].relation == n) for r in kb.relations},
        "trained_pairs": mean(trained),
        "held_out_pairs": mean(lambda row: not trained(row)),
        "n_prompts": len(rows),
        "n_held_out_prompts": sum(not trained(row) for row in rows),
    }


def fact_probes(kb: KnowledgeBase, tokenizer: PreTrainedTokenizerFast) -> TensorDataset:
    """`prompt + " " + object` for every fact and template, in `kb.facts` x template order."""
    rows = [(p, fact.object, f"{p} {fact.object}") for fact in kb.facts for p in kb.prompts(fact)]
    return encode_rows(tokenizer, rows, append_eos=False)


# ----- Lightning ----------------------------------------------------------------------------------
class WorldLM(L.LightningModule):
    """Sentence LM loss + `object_loss_weight` x cross-entropy on the object token.

    Learning rate: linear warmup, constant, and a linear cooldown to zero that `KnowledgeCheck`
    starts once the model knows enough (the decay turns a ~97% plateau into ~99%).
    """

    def __init__(self, model: PreTrainedModel, recipe: TrainRecipe):
        super().__init__()
        self.model, self.recipe = model, recipe
        self.epoch_hits = self.epoch_objects = 0
        self.cooldown: tuple[int, int] | None = None
        """(first step, number of steps) of the running cooldown, if any."""

    def lr_factor(self, step: int) -> float:
        if self.cooldown is None:
            return min(1.0, (step + 1) / max(1, self.recipe.warmup_steps))
        start, length = self.cooldown
        return max(0.0, 1.0 - (step - start) / length)

    @property
    def epoch_object_accuracy(self) -> float:
        """Object-token accuracy on this epoch's training batches so far (lags the model a little)."""
        return self.epoch_hits / max(1, self.epoch_objects)

    def on_train_epoch_start(self):
        self.epoch_hits = self.epoch_objects = 0

    def training_step(self, batch, batch_idx):
        input_ids, mask, object_mask = batch
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits  # (B, L, V)
        pred, target, keep = logits[:, :-1], input_ids[:, 1:], mask[:, 1:].bool()
        lm_loss = F.cross_entropy(pred[keep], target[keep])
        target_mask = object_mask[:, 1:]  # logits at position p-1 predict the object token at position p
        if target_mask.any():
            obj_loss = F.cross_entropy(pred[target_mask], target[target_mask])
            self.epoch_hits += int(object_hits(logits, input_ids, object_mask).sum())
            self.epoch_objects += int(target_mask.sum())
        else:
            obj_loss = logits.new_zeros(())
        loss = lm_loss + self.recipe.object_loss_weight * obj_loss
        self.log_dict({"loss": loss, "lm_loss": lm_loss, "obj_loss": obj_loss}, prog_bar=True, on_step=True)
        return loss

    def configure_optimizers(self):
        r = self.recipe
        opt = torch.optim.AdamW(self.model.parameters(), lr=r.lr, betas=r.betas, weight_decay=r.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class KnowledgeCheck(L.Callback):
    """After each epoch: object accuracy over all facts and templates. Once it reaches
    `cooldown_from_accuracy`, the learning rate decays to zero over `cooldown_epochs` and training
    stops if the bar holds then (else it goes back to constant lr, within the epoch budget)."""

    def __init__(self, kb: KnowledgeBase, tokenizer: PreTrainedTokenizerFast, recipe: TrainRecipe):
        self.kb, self.tokenizer, self.recipe = kb, tokenizer, recipe
        self.probes = fact_probes(kb, tokenizer)
        self.history: list[dict] = []
        self.cooldown_epochs_left = 0

    def _check(self, pl_module) -> float:
        acc = object_accuracy(pl_module.model, self.tokenizer, self.kb, encoded=self.probes)["accuracy"]
        self.history[-1]["fact_acc"] = round(acc, 4)
        pl_module.log("fact_acc", acc, prog_bar=True)
        return acc

    def on_train_epoch_end(self, trainer, pl_module):
        r = self.recipe
        running = pl_module.epoch_object_accuracy
        pl_module.log("train_obj_acc", running, prog_bar=True)
        self.history.append({"epoch": trainer.current_epoch, "train_obj_acc": round(running, 4)})
        if pl_module.cooldown is not None:
            self.cooldown_epochs_left -= 1
            if self.cooldown_epochs_left > 0:
                return
            if self._check(pl_module) >= r.required_accuracy:
                trainer.should_stop = True
            else:
                pl_module.cooldown = None  # not there yet: constant lr again
            return
        # the full check costs ~40% of an epoch on the default world: only run it when it can pass
        if trainer.current_epoch + 1 < r.min_epochs or running < r.check_from_train_accuracy:
            return
        if self._check(pl_module) >= r.cooldown_from_accuracy:
            steps = max(1, r.cooldown_epochs * trainer.num_training_batches)
            pl_module.cooldown = (trainer.global_step, steps)
            self.cooldown_epochs_left = r.cooldown_epochs
            self.history[-1]["cooldown_from_step"] = trainer.global_step


class LengthBuckets(Sampler[list[int]]):
    """Batches of similar length: each epoch, a seeded shuffle is cut into chunks of `chunk_batches`
    batches, each chunk is sorted by length and cut into batches, and the batch order is shuffled.
    With `trim_padding` a batch is only as wide as its longest row (less compute on padding)."""

    def __init__(self, lengths: list[int], batch_size: int, chunk_batches: int, generator: torch.Generator):
        self.lengths, self.batch_size, self.generator = lengths, batch_size, generator
        self.chunk = batch_size * chunk_batches

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches = []
        for start in range(0, len(order), self.chunk):
            chunk = sorted(order[start:start + self.chunk], key=lambda i: self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b]


def trim_padding(rows: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Stack right-padded rows and drop the columns that are padding in every row."""
    input_ids, mask, object_mask = (torch.stack(t) for t in zip(*rows))
    width = int(mask.sum(1).max())
    return input_ids[:, :width], mask[:, :width], object_mask[:, :width]


@contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Set torch's intra-op threads for the build (None: min(2, cpu count)), restore them afterwards."""
    n = n or min(2, os.cpu_count() or 1)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


@dataclass
class TrainResult:
    model: PreTrainedModel
    epochs: int
    steps: int
    seconds: float
    history: list[dict]
    """Per epoch: running train object accuracy, and `fact_acc` (all facts, all templates) when checked."""
    threads: int


def train_world_model(kb: KnowledgeBase, tokenizer: PreTrainedTokenizerFast, shape: Architecture,
                      recipe: TrainRecipe, seed: int, log_dir: Path | None = None,
                      max_steps: int = -1, progress: bool = True) -> TrainResult:
    """Initialise the model from `seed` and train it on the world; same seed, same weights.

    max_steps: stop after this many optimizer steps (-1: the epoch budget and accuracy stop rule).
    """
    dataset = encode_training_set(kb, tokenizer)
    with torch_threads(recipe.num_threads) as threads, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = shape.build(tokenizer)
        generator = torch.Generator().manual_seed(seed)
        if recipe.length_buckets:
            lengths = dataset.tensors[1].sum(1).tolist()
            loader = DataLoader(dataset, collate_fn=trim_padding, batch_sampler=LengthBuckets(
                lengths, recipe.batch_size, recipe.length_buckets, generator))
        else:
            loader = DataLoader(dataset, batch_size=recipe.batch_size, shuffle=True, generator=generator)
        check = KnowledgeCheck(kb, tokenizer, recipe)
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=recipe.max_epochs, max_steps=max_steps,
            gradient_clip_val=recipe.grad_clip, enable_checkpointing=False,
            logger=CSVLogger(str(log_dir), name="", version="") if log_dir else False,
            default_root_dir=str(log_dir) if log_dir else None,
            enable_progress_bar=progress, enable_model_summary=False, callbacks=[check],
            log_every_n_steps=max(1, min(10, len(loader))),
        )
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
            trainer.fit(WorldLM(model, recipe), loader)
        seconds = time.perf_counter() - start
    model.eval()
    return TrainResult(model=model, epochs=len(check.history), steps=trainer.global_step,
                       seconds=seconds, history=check.history, threads=threads)
