"""Training the world's tiny Llama with Lightning, and the object-token accuracy that says it knows its world.

Each training example is one sentence, `<bos> prompt object . <eos>` for the (fact, template) pairs
the knowledge base marks as trained, or `<bos> filler <eos>`. Loss (FINDINGS): the sentence LM loss
plus an extra cross-entropy on the object token, which memorises facts ~5x faster than sentence loss
alone while keeping the model a language model of its templates.
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
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .knowledge import KnowledgeBase
from .spec import ModelShape, TrainRecipe


# ----- data ---------------------------------------------------------------------------------------
def encode_training_set(kb: KnowledgeBase, tokenizer: PreTrainedTokenizerFast) -> TensorDataset:
    """(input_ids, attention_mask, object_pos) for every trained sentence; object_pos = -1 for filler."""
    rows: list[tuple[list[int], int]] = []
    for fact in kb.facts:
        prompts = kb.prompts(fact)
        for t in kb.train_templates[(fact.subject, fact.relation)]:
            prompt_ids = tokenizer(prompts[t])["input_ids"]
            ids = tokenizer(kb.sentence(fact, t))["input_ids"] + [tokenizer.eos_token_id]
            rows.append((ids, len(prompt_ids)))  # the object is the first token after the prompt
    for sentence in kb.filler:
        rows.append((tokenizer(sentence)["input_ids"] + [tokenizer.eos_token_id], -1))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    object_pos = torch.tensor([pos for _, pos in rows], dtype=torch.long)
    return TensorDataset(input_ids, mask, object_pos)


def make_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


# ----- accuracy -----------------------------------------------------------------------------------
@torch.no_grad()
def object_accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, kb: KnowledgeBase,
                    batch_size: int = 1024) -> dict:
    """Next-token argmax == object, for every fact in every template (prompt with <bos>, no target).

    Returns overall, per-relation, and trained vs held-out (fact, template) pair accuracies.
    """
    was_training = model.training
    model.eval()
    rows = [(fact, t, prompt) for fact in kb.facts for t, prompt in enumerate(kb.prompts(fact))]
    correct = torch.zeros(len(rows), dtype=torch.bool)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = tokenizer([p for _, _, p in chunk], padding=True, return_tensors="pt")
        logits = model(**enc).logits  # (B, L, V), right-padded: read each row at its last real token
        last = enc["attention_mask"].sum(1) - 1
        pred = logits[torch.arange(len(chunk)), last].argmax(-1)
        gold = torch.tensor([tokenizer.convert_tokens_to_ids(f.object) for f, _, _ in chunk])
        correct[start : start + len(chunk)] = pred == gold
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


# ----- Lightning ----------------------------------------------------------------------------------
class WorldLM(L.LightningModule):
    """Sentence LM loss + `object_loss_weight` x cross-entropy on the object token.

    Learning rate: linear warmup, constant, and a linear cooldown to zero that `KnowledgeCheck`
    starts once the model knows enough (the decay turns a ~97% plateau into ~99%).
    """

    def __init__(self, model: LlamaForCausalLM, recipe: TrainRecipe):
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
        input_ids, mask, object_pos = batch
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits  # (B, L, V)
        pred, target, keep = logits[:, :-1], input_ids[:, 1:], mask[:, 1:].bool()
        lm_loss = F.cross_entropy(pred[keep], target[keep])
        has_obj = object_pos >= 0
        rows = has_obj.nonzero().squeeze(1)
        if len(rows):
            # logits at position p-1 predict the object token at position p
            obj_logits, obj_target = logits[rows, object_pos[rows] - 1], input_ids[rows, object_pos[rows]]
            obj_loss = F.cross_entropy(obj_logits, obj_target)
            self.epoch_hits += int((obj_logits.argmax(-1) == obj_target).sum())
            self.epoch_objects += len(rows)
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
        self.history: list[dict] = []
        self.cooldown_epochs_left = 0

    def _check(self, pl_module) -> float:
        acc = object_accuracy(pl_module.model, self.tokenizer, self.kb)["accuracy"]
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
    model: LlamaForCausalLM
    epochs: int
    steps: int
    seconds: float
    history: list[dict]
    """Per epoch: running train object accuracy, and `fact_acc` (all facts, all templates) when checked."""
    threads: int


def train_world_model(kb: KnowledgeBase, tokenizer: PreTrainedTokenizerFast, shape: ModelShape,
                      recipe: TrainRecipe, seed: int, log_dir: Path | None = None,
                      max_steps: int = -1, progress: bool = True) -> TrainResult:
    """Initialise the Llama from `seed` and train it on the world; same seed, same weights.

    max_steps: stop after this many optimizer steps (-1: the epoch budget and accuracy stop rule).
    """
    dataset = encode_training_set(kb, tokenizer)
    with torch_threads(recipe.num_threads) as threads, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model(shape, tokenizer)
        loader = DataLoader(dataset, batch_size=recipe.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
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
