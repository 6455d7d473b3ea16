"""Training top-k SAEs and transcoders on a frozen LM's activations, one LM forward per step.

Per step: the token batch goes through the frozen LM under ``no_grad`` with hooks on every selected
hookpoint (the forward stops once the last one has fired); BOS and padding positions are dropped;
the tokens go through a shuffle buffer; every coder takes one Adam step on
``FVU + auxk_alpha * AuxK (+ multi-top-k FVU / 8)`` (sparsify's loss), with the decoder-norm
constraint around the step in SAE mode (METHODS.md section 1).

The LM is held in a plain attribute (``self.adapter``), not registered as a submodule: DDP never
sees it (no broadcast, no gradient buckets), Lightning's checkpoints hold only the coders, their
dead-latent trackers and a few counters, and each rank keeps its own frozen copy.

Shuffle buffer: each batch's tokens are split by a seeded permutation into ``shuffle_buffer`` parts
that are trained on in that step and the next ``shuffle_buffer - 1`` steps, so a step mixes tokens of
that many batches (about one batch's worth). The buffer is a function of the token stream, so on
resume it is rebuilt by re-running the LM on the preceding batches instead of being checkpointed.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from lightning_edit.locate.activations import StopForward, run_until_captured
from lightning_edit.models import ModelAdapter, hidden_of, with_hidden
from lightning_edit.sparse import DeadLatentTracker, SparseCoderConfig, TopKSparseCoder, ce_loss_score, default_lr

Acts = dict[str, tuple[Tensor, Tensor | None]]
"""Per hookpoint: (coder input [n_tokens, d_in], target [n_tokens, d_out] or None for an SAE)."""


def training_positions(input_ids: Tensor, attention_mask: Tensor | None, bos_token_id: int | None) -> Tensor:
    """Bool [B, T]: the positions whose activations train the coders (not padding, not BOS).

    BOS activations are outliers of huge norm that say nothing about the text (attention sinks).
    """
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if bos_token_id is not None:
        mask = mask & (input_ids != bos_token_id)
    return mask


def hookpoint_key(hookpoint: str) -> str:
    """ModuleDict key for a hookpoint (module names cannot contain dots)."""
    return hookpoint.replace(".", "/")


class FractionOfVarianceUnexplained(Metric):
    """sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 over every token seen (mean over all of them)."""

    full_state_update = False

    def __init__(self, dim: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("sse", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_y", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_y2", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, y_hat: Tensor, y: Tensor) -> None:
        y, y_hat = y.double(), y_hat.double()
        self.sse += (y - y_hat).pow(2).sum()
        self.sum_y += y.sum(0)
        self.sum_y2 += y.pow(2).sum()
        self.count += y.shape[0]

    def compute(self) -> Tensor:
        variance = self.sum_y2 - self.sum_y.pow(2).sum() / self.count.clamp_min(1)
        return (self.sse / variance.clamp_min(1e-12)).float()


class TokenShuffle:
    """Mixes tokens across batches: batch t's tokens are spread over steps t .. t + K - 1.

    Deterministic in (seed, rank, step), so it can be rebuilt on resume (see module doc).
    """

    def __init__(self, num_batches: int, seed: int, rank: int = 0):
        if num_batches < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1 (1 = no shuffling), got {num_batches}")
        self.num_batches, self.seed, self.rank = num_batches, seed, rank
        self.pending: dict[int, list[Acts]] = defaultdict(list)

    def add(self, step: int, acts: Acts, keep_from: int = 0) -> None:
        """Queue batch ``step``'s tokens; parts for steps before ``keep_from`` are dropped."""
        n = next(iter(acts.values()))[0].shape[0]
        seed = int(np.random.SeedSequence([self.seed, self.rank, step]).generate_state(1)[0])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        for delay, part in enumerate(torch.tensor_split(order, self.num_batches)):
            if step + delay < keep_from or part.numel() == 0:
                continue
            index = part.to(next(iter(acts.values()))[0].device)
            self.pending[step + delay].append(
                {hp: (x[index], None if y is None else y[index]) for hp, (x, y) in acts.items()}
            )

    def pop(self, step: int) -> Acts:
        """Every token queued for ``step``, in the order the batches were added."""
        parts = self.pending.pop(step, [])
        for stale in [s for s in self.pending if s < step]:  # never left behind (e.g. after a skip)
            del self.pending[stale]
        if not parts:
            return {}
        return {
            hp: (
                torch.cat([p[hp][0] for p in parts]),
                None if parts[0][hp][1] is None else torch.cat([p[hp][1] for p in parts]),
            )
            for hp in parts[0]
        }

    def clear(self) -> None:
        self.pending.clear()


class SparseCoderModule(LightningModule):
    """Top-k SAEs (``mode="sae"``) or transcoders (``mode="transcoder"``) on a frozen causal LM.

    ``hookpoints``: names or patterns relative to the base model (``layers.2``, ``layers.*.mlp``);
    an SAE reads a hookpoint's output hidden state, a transcoder maps a module's input (an MLP's
    post-norm hidden state) to its output. ``coder``: SparseCoderConfig fields shared by all coders
    (d_in/d_out come from the model). ``lr`` None = ``default_lr(num_latents)`` per coder.
    """

    def __init__(
        self,
        model: nn.Module,
        hookpoints: list[str] | str,
        mode: str = "sae",
        coder: dict[str, Any] | None = None,
        lr: float | None = None,
        auxk_alpha: float = 1 / 32,
        lr_warmup_steps: int = 0,
        shuffle_buffer: int = 4,
        seed: int = 0,
        max_tokens: int | None = None,
        bos_token_id: int | None = None,
        dump_rank_weights_to: str | None = None,
        activation_cache: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        model.eval().requires_grad_(False)
        self.adapter = ModelAdapter(model)  # a plain attribute: not a submodule (module doc)
        self.hookpoints = self.adapter.resolve_hookpoints(hookpoints)
        self.mode = mode
        coders, trackers = {}, {}
        for hp in self.hookpoints:
            d_in, d_out = self.adapter.hookpoint_io_dims(hp)
            if mode == "sae" and d_in != d_out:
                d_in = d_out  # an SAE reads the hookpoint's output
            cfg = SparseCoderConfig(
                d_in=d_in, d_out=d_out if mode == "transcoder" else None, mode=mode, **(coder or {})
            )
            coders[hookpoint_key(hp)] = TopKSparseCoder(cfg)
            trackers[hookpoint_key(hp)] = coders[hookpoint_key(hp)].new_dead_latent_tracker()
        self.coders = nn.ModuleDict(coders)
        self.trackers = nn.ModuleDict(trackers)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("train_microseconds", torch.zeros((), dtype=torch.long))
        # Python mirrors of the buffers above, so that a step needs no device sync to read them.
        self._initialized, self._tokens_seen, self._train_microseconds = False, 0, 0
        self.automatic_optimization = False
        self.shuffle = TokenShuffle(shuffle_buffer, seed)
        self._batch_started = 0.0
        self.cache = None  # an ActivationCache, opened by on_train_start when activation_cache is set
        self.cache_note: str | None = None
        """"built" (with the time) or "reused", and the folder; None without a cache."""

        keys = [hookpoint_key(hp) for hp in self.hookpoints]
        self.val_ce_clean = MeanMetric()
        self.val_ce_spliced = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.val_ce_zero = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.val_l0 = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.val_fvu = nn.ModuleDict(
            {k: FractionOfVarianceUnexplained(self.coder(hp).d_out) for hp, k in zip(self.hookpoints, keys)}
        )
        self.final_metrics: dict[str, dict[str, Any]] = {}
        """Per hookpoint, the last validation's figures (fvu, l0, ce_*, whether ce_loss_score is
        meaningful and why not), read by the job's table."""
        # The LM's output width (ln of it: the uniform CE); validation reads it off the logits too.
        self._vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.last_val_step = -1

    # --- access ----------------------------------------------------------------------------------

    @property
    def lm(self) -> nn.Module:
        return self.adapter.model

    def coder(self, hookpoint: str) -> TopKSparseCoder:
        return self.coders[hookpoint_key(hookpoint)]

    def tracker(self, hookpoint: str) -> DeadLatentTracker:
        return self.trackers[hookpoint_key(hookpoint)]

    def coders_by_hookpoint(self) -> dict[str, TopKSparseCoder]:
        return {hp: self.coder(hp) for hp in self.hookpoints}

    def _lm_to_device(self) -> None:
        """The LM is not a submodule, so Lightning does not move it: follow the coders."""
        param = next(self.lm.parameters())
        if param.device != self.device:
            self.lm.to(self.device)

    @property
    def _distributed(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    # --- activations -----------------------------------------------------------------------------

    def _capture_hooks(self, batch: dict[str, Tensor], stop: bool) -> tuple[Tensor, Acts, dict[str, Any]]:
        """(training positions [B, T], the store the hooks fill, one forward hook per hookpoint): each
        keeps its hookpoint's (input, output) for a transcoder or (output, None) for an SAE at those
        positions; with `stop`, the last one ends the forward."""
        mask = training_positions(batch["input_ids"], batch.get("attention_mask"), self.hparams.bos_token_id)
        store: Acts = {}
        transcoder = self.mode == "transcoder"

        def capture(hp: str):
            def hook(module, args, output):
                hidden = hidden_of(output)
                if transcoder:
                    if not args:
                        raise RuntimeError(
                            f"hookpoint {hp!r}: the module was called without positional input, "
                            "so its input cannot be captured for a transcoder"
                        )
                    store[hp] = (args[0][mask], hidden[mask])
                else:
                    store[hp] = (hidden[mask], None)
                if stop and len(store) == len(self.hookpoints):
                    raise StopForward  # the last hookpoint is read: the rest of the forward is not needed

            return hook

        return mask, store, {hp: capture(hp) for hp in self.hookpoints}

    @torch.no_grad()
    def collect_activations(self, batch: dict[str, Tensor], use_cache: bool = True) -> tuple[Acts, int]:
        """One LM forward with hooks on every hookpoint -> (activations at training positions, count).

        With an open activation cache, a batch of training rows (``batch["rows"]``) is read from it
        instead: the same tokens in the same order."""
        if use_cache and self.cache is not None and "rows" in batch:
            return self.cache.read(batch["rows"].cpu(), device=self.device)
        mask, store, hooks = self._capture_hooks(batch, stop=True)
        with self.adapter.hooks(hooks):
            run_until_captured(self.lm, input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        missing = [hp for hp in self.hookpoints if hp not in store]
        if missing:
            raise RuntimeError(f"hookpoints {missing} did not run during the LM forward")
        return store, int(mask.sum())

    # --- training --------------------------------------------------------------------------------

    def configure_optimizers(self):
        groups = [
            {"params": list(c.parameters()), "lr": self.hparams.lr or default_lr(c.num_latents)}
            for c in self.coders.values()
        ]
        optimizer = torch.optim.Adam(groups)
        warmup = self.hparams.lr_warmup_steps
        if not warmup:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @torch.no_grad()
    def _initialize(self, acts: Acts) -> None:
        """Data-dependent init on the first batch; rank 0's result is broadcast under DDP."""
        for hp, (x, y) in acts.items():
            self.coder(hp).initialize(x.float(), None if y is None else y.float())
        if self._distributed:
            for tensor in [*self.coders.parameters(), *self.coders.buffers()]:
                torch.distributed.broadcast(tensor.data, src=0)
        self.initialized.fill_(True)
        self._initialized = True

    # --- activation cache ------------------------------------------------------------------------

    def _open_activation_cache(self, datamodule) -> None:
        """Fill the cache's missing shards (each rank its own), wait for every rank, then map it."""
        from lightning_edit.config import ConfigError
        from lightning_edit.downstream.cache import state_fingerprint
        from lightning_edit.sparse.activation_cache import ActivationCache, cache_bytes
        from datamodules.tokens import make_batch

        if datamodule is None or not hasattr(datamodule, "rows_fingerprint"):
            raise RuntimeError("data.activation_cache needs the TokenDataModule (its training rows)")
        ids, lengths = datamodule.train_ids, datamodule.train_lengths
        dtype = next(self.lm.parameters()).dtype
        key = {
            "model": state_fingerprint(self.lm),
            "corpus": datamodule.source_description(),
            "rows": datamodule.rows_fingerprint(),
            "context_length": datamodule.context_length,
            "packing": datamodule.packing,
            "hookpoints": self.hookpoints,
            "mode": self.mode,
            "bos_token_id": self.hparams.bos_token_id,
            "dtype": str(dtype),
        }
        cache = ActivationCache(self.hparams.activation_cache, key, n_rows=len(ids))
        rank, world_size = self.global_rank, self.trainer.world_size
        missing = cache.missing_shards()
        started = time.perf_counter()
        # Rank 0 decides, so that every rank takes the same branch (and meets the same barriers).
        if self.trainer.strategy.broadcast(bool(missing), src=0):
            widths = {hp: self.adapter.hookpoint_io_dims(hp) for hp in self.hookpoints}
            widths = {hp: (d_out, None) if self.mode == "sae" else (d_in, d_out) for hp, (d_in, d_out) in widths.items()}
            valid = torch.arange(ids.shape[1]) < lengths.unsqueeze(1)
            n_tokens = int(training_positions(ids, valid, self.hparams.bos_token_id).sum())
            need = cache_bytes(n_tokens, widths, dtype)
            free = shutil.disk_usage(_existing_parent(cache.root)).free
            if need > free:
                raise ConfigError(f"data.activation_cache={cache.root}: the cache needs {need / 1e9:.2f} GB "
                                  f"({n_tokens:,} tokens), {free / 1e9:.2f} GB are free there")
            if rank == 0:
                for line in cache.other_caches():
                    print(f"activation cache: {line}", file=sys.stderr, flush=True)
                print(f"activation cache: computing {len(missing)} of {cache.n_shards} shards "
                      f"({n_tokens:,} tokens, {need / 1e9:.2f} GB) into {cache.dir}", file=sys.stderr, flush=True)
                cache.write_manifest(widths, dtype)
            self.trainer.strategy.barrier("activation_cache_manifest")

            def compute(start: int, stop: int):
                acts: dict[str, list] = {hp: [] for hp in self.hookpoints}
                counts = []
                step = datamodule.batch_size
                for a in range(start, stop, step):
                    batch = make_batch(ids[a : min(a + step, stop)], lengths[a : min(a + step, stop)])
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    got, _ = self.collect_activations(batch, use_cache=False)
                    counts.append(training_positions(batch["input_ids"], batch["attention_mask"],
                                                     self.hparams.bos_token_id).sum(1).cpu())
                    for hp, pair in got.items():
                        acts[hp].append(pair)
                joined = {hp: (torch.cat([x for x, _ in parts]),
                               None if parts[0][1] is None else torch.cat([y for _, y in parts]))
                          for hp, parts in acts.items()}
                return joined, torch.cat(counts)

            cache.build(compute, rank, world_size, progress=rank == 0)
            self.trainer.strategy.barrier("activation_cache_built")
            self.cache_note = f"built in {time.perf_counter() - started:.1f} s: {cache.dir}"
        else:
            self.cache_note = f"reused: {cache.dir}"
        if rank == 0:
            print(f"activation cache: {self.cache_note}", file=sys.stderr, flush=True)
        cache.open()
        self.cache = cache

    def on_train_start(self) -> None:
        self._lm_to_device()
        if self.hparams.activation_cache and self.cache is None:
            self._open_activation_cache(getattr(self.trainer, "datamodule", None))
        self._initialized = bool(self.initialized)  # restored from a checkpoint, or not
        self._tokens_seen, self._train_microseconds = int(self.tokens_seen), int(self.train_microseconds)
        self.shuffle.rank = self.global_rank
        self.shuffle.clear()
        start, k = self.global_step, self.hparams.shuffle_buffer
        if start == 0 or k == 1:
            return
        # Resume: rebuild the shuffle buffer from the K - 1 batches before the resume point.
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "replay_batches"):
            raise RuntimeError(
                "resuming with data.shuffle_buffer > 1 needs the TokenDataModule (it replays the "
                "batches that fed the shuffle buffer)"
            )
        with self.trainer.precision_plugin.train_step_context():
            for batch in datamodule.replay_batches(start - k + 1, start):
                batch = self.trainer.strategy.batch_to_device(batch)
                acts, _ = self.collect_activations(batch)
                self.shuffle.add(int(batch["step"]), acts, keep_from=start)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_started = time.perf_counter()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self._lm_to_device()
        step = int(batch["step"])
        if step != self.global_step:
            raise RuntimeError(
                f"token stream out of step: batch for step {step} at global step {self.global_step} "
                "(the sparse-coder trainer takes one optimizer step per batch; gradient accumulation "
                "is not supported)"
            )
        acts, n_lm_tokens = self.collect_activations(batch)
        if not self._initialized:
            self._initialize(acts)
        self.shuffle.add(step, acts)
        train = self.shuffle.pop(step)

        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        logs: dict[str, Tensor] = {}
        fired: list[Tensor] = []
        n_train = next(iter(train.values()))[0].shape[0] if train else 0
        for hp in self.hookpoints:
            coder, tracker = self.coder(hp), self.tracker(hp)
            x, y = train[hp]
            out = coder(
                x.float(),
                None if y is None else y.float(),
                dead_mask=tracker.dead_mask if coder.cfg.auxk else None,
            )
            hp_loss = out.fvu + self.hparams.auxk_alpha * out.auxk_loss
            if coder.cfg.multi_topk:
                hp_loss = hp_loss + out.multi_topk_fvu / 8  # sparsify's weighting
            loss = loss + hp_loss
            fired.append(tracker.fired_mask(out.latent_indices, out.latent_acts))
            prefix = f"{self.mode}/{hp}"
            logs[f"{prefix}/fvu"] = out.fvu.detach()
            logs[f"{prefix}/auxk"] = out.auxk_loss.detach()
            logs[f"{prefix}/l0"] = (out.latent_acts > 0).sum(-1).float().mean().detach()
            if coder.cfg.multi_topk:
                logs[f"{prefix}/multi_topk_fvu"] = out.multi_topk_fvu.detach()

        self.manual_backward(loss)
        for coder in self.coders.values():
            if coder.cfg.normalize_decoder:
                coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        for coder in self.coders.values():
            if coder.cfg.normalize_decoder:
                coder.set_decoder_norm_to_unit_norm()
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            schedulers.step()

        # Dead latents: a latent fired if it fired on any rank; tokens are counted over all ranks.
        counts = torch.cat([f.long() for f in fired] + [torch.tensor([n_train, n_lm_tokens], device=self.device)])
        if self._distributed:
            torch.distributed.all_reduce(counts)
        global_train, global_lm = counts[-2:].tolist()  # the step's one device sync
        offset = 0
        for hp, f in zip(self.hookpoints, fired):
            tracker = self.tracker(hp)
            tracker.update_fired(counts[offset : offset + f.numel()] > 0, global_train)
            offset += f.numel()
            logs[f"{self.mode}/{hp}/dead_frac"] = tracker.dead_mask.float().mean()
        self._tokens_seen += global_lm
        self.tokens_seen.fill_(self._tokens_seen)
        logs["train/loss"] = loss.detach()
        logs["train/tokens_seen"] = float(self._tokens_seen)
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=max(n_train, 1))
        max_tokens = self.hparams.max_tokens
        if max_tokens and self._tokens_seen >= max_tokens:
            self.trainer.should_stop = True
        return loss.detach()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._train_microseconds += int((time.perf_counter() - self._batch_started) * 1e6)
        self.train_microseconds.fill_(self._train_microseconds)
        self.log("train/tokens_per_s", self.tokens_per_second(), on_step=True, on_epoch=False)

    def tokens_per_second(self) -> float:
        """Training tokens (all ranks) per second of training-step wall time (validation excluded)."""
        seconds = self._train_microseconds / 1e6
        return self._tokens_seen / seconds if seconds > 0 else 0.0

    def on_train_end(self) -> None:
        directory = self.hparams.dump_rank_weights_to
        if directory:  # a test aid: every rank writes what it holds, to compare DDP replicas
            from safetensors.torch import save_file

            Path(directory).mkdir(parents=True, exist_ok=True)
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(tensors, str(Path(directory) / f"rank{self.global_rank}.safetensors"))

    # --- validation: splice each coder into the LM -----------------------------------------------

    def _ce(self, logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, int]:
        """Mean next-token cross-entropy over real (non-padding) targets, and their count."""
        labels = input_ids[:, 1:]
        valid = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask[:, 1:].bool()
        ce = F.cross_entropy(logits[:, :-1][valid].float(), labels[valid])
        return ce, int(valid.sum())

    def _splice_hook(self, hp: str, mask: Tensor, zero: bool):
        coder, transcoder = self.coder(hp), self.mode == "transcoder"

        def hook(module, args, output):
            hidden = hidden_of(output)
            source = args[0] if transcoder else hidden
            new = hidden.clone()
            if zero:
                new[mask] = 0
            else:
                new[mask] = coder.reconstruct(source[mask].float()).to(new.dtype)
            return with_hidden(output, new)

        return hook

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._lm_to_device()
        ids, attention = batch["input_ids"], batch.get("attention_mask")
        mask, store, hooks = self._capture_hooks(batch, stop=False)
        with self.adapter.hooks(hooks):
            logits = self.lm(input_ids=ids, attention_mask=attention, use_cache=False).logits
        self._vocab_size = logits.shape[-1]
        ce_clean, n = self._ce(logits, ids, attention)
        self.val_ce_clean.update(ce_clean, n)
        for hp in self.hookpoints:
            key, coder = hookpoint_key(hp), self.coder(hp)
            x, y = store[hp]
            acts, indices = coder.encode(x.float())
            self.val_fvu[key].update(coder.reconstruct(x.float()), (x if y is None else y).float())
            self.val_l0[key].update((acts > 0).sum(-1).float().mean(), acts.shape[0])
            for zero, metric in ((False, self.val_ce_spliced[key]), (True, self.val_ce_zero[key])):
                with self.adapter.hooks({hp: self._splice_hook(hp, mask, zero)}):
                    spliced = self.lm(input_ids=ids, attention_mask=attention, use_cache=False).logits
                metric.update(self._ce(spliced, ids, attention)[0], n)

    def on_validation_epoch_end(self) -> None:
        metrics = [self.val_ce_clean, *self.val_ce_spliced.values(), *self.val_ce_zero.values(),
                   *self.val_l0.values(), *self.val_fvu.values()]
        if self.val_ce_clean.update_count == 0 and not self._distributed:
            return
        clean = float(self.val_ce_clean.compute())
        logs: dict[str, float] = {"val/ce_clean": clean}
        results: dict[str, dict[str, float]] = {}
        for hp in self.hookpoints:
            key = hookpoint_key(hp)
            spliced, zero = float(self.val_ce_spliced[key].compute()), float(self.val_ce_zero[key].compute())
            ce = ce_loss_score(clean, spliced, zero, self._vocab_size)
            results[hp] = {
                "fvu": float(self.val_fvu[key].compute()),
                "l0": float(self.val_l0[key].compute()),
                "ce_clean": clean,
                "ce_spliced": spliced,
                "ce_zero": zero,
                "ce_loss_score": ce.score,
                "ce_uniform": ce.uniform,
                "ce_loss_score_meaningful": float(ce.meaningful),
            }
            for name, value in results[hp].items():
                if name not in ("ce_clean", "ce_uniform"):
                    logs[f"val/{hp}/{name}"] = value
            results[hp]["ce_loss_score_meaningful"] = ce.meaningful
            results[hp]["ce_loss_score_note"] = ce.note
        for metric in metrics:
            metric.reset()
        if self.trainer.sanity_checking:
            return
        # Already reduced over ranks by torchmetrics; sync_dist averages equal values (and is quiet).
        self.log_dict(logs, on_step=False, on_epoch=True, sync_dist=True)
        self.final_metrics = results
        self.last_val_step = self.global_step


def _existing_parent(path: Path) -> Path:
    """``path`` or its nearest existing parent (for a free-space check before it is created)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path
