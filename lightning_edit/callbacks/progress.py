"""`EditProgressBar`: Lightning's tqdm bar over the edit stream, showing T, the last edit's time,
the latest final-state Rel / Loc (at the last checkpoint) and the last edit's immediate Rel."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar

from lightning_edit.results import FINAL

from .common import edit_count


class EditProgressBar(TQDMProgressBar):
    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.set_description("edits")
        return bar

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description("edits")

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = dict(super().get_metrics(trainer, pl_module))
        items.pop("v_num", None)
        items["T"] = edit_count(pl_module)
        seconds = getattr(pl_module, "edit_seconds", None)
        if seconds:
            items["s/edit"] = f"{seconds[-1]:.2f}"
        immediate = getattr(pl_module, "immediate_scores", None)
        if immediate and "rel" in immediate[-1]:
            items["rel_now"] = f"{immediate[-1]['rel']:.2f}"
        rows = getattr(pl_module, "rows", None)
        if rows:
            final = rows[-1].get(FINAL) or {}
            for key in ("rel", "loc"):
                if final.get(key) is not None:
                    items[key] = f"{final[key]:.3f}"
            items["at"] = rows[-1]["T"]
        return items
