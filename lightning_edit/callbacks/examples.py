"""`ExamplesTable`: example prompts with the model's greedy generations before the first edit and
at the end of the stream, as a W&B table (`examples`) and as examples.csv / examples.md beside the
CSV log.

Rows: the first `n_edits` edit prompts of the stream (kind `edit`) and their first paraphrase
(`paraphrase`), whose target is the new object, and `n_locality` of their locality prompts
(`locality`), which should not change.
"""

from __future__ import annotations

import csv
from typing import Any

from lightning import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_edit.downstream import greedy_complete

from .common import edit_count, run_dir, stream_records, wandb_loggers

COLUMNS = ["kind", "edit", "applied", "prompt", "target", "before", "after", "changed"]


class ExamplesTable(Callback):
    def __init__(self, n_edits: int = 8, n_locality: int = 4, max_new_tokens: int = 8, name: str = "examples"):
        self.n_edits = n_edits
        self.n_locality = n_locality
        self.max_new_tokens = max_new_tokens
        self.name = name
        self.rows: list[dict[str, Any]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.rows:
            return
        editor = pl_module.editor
        if editor.ledger:
            rank_zero_warn("ExamplesTable: the editor has edits already; no 'before' generations to show")
            return
        rows = []
        records = stream_records(trainer)[: self.n_edits]
        for i, record in enumerate(records):
            rows.append({"kind": "edit", "edit": i, "prompt": record.prompt, "target": record.target_new})
            if record.rephrase_prompts:
                rows.append({"kind": "paraphrase", "edit": i, "prompt": record.rephrase_prompts[0],
                             "target": record.target_new})
        pairs = [(i, p) for i, r in enumerate(records) for p in r.locality][: self.n_locality]
        rows += [{"kind": "locality", "edit": i, "prompt": p.prompt, "target": p.answer or ""} for i, p in pairs]
        with editor.edited() as model:
            for row in rows:
                row["before"] = self._generate(model, editor.tokenizer, row["prompt"])
        self.rows = rows

    def _generate(self, model, tokenizer, prompt: str) -> str:
        return greedy_complete(model, tokenizer, prompt, self.max_new_tokens).strip()

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.rows:
            return
        t = edit_count(pl_module)
        editor = pl_module.editor
        with editor.edited() as model:
            for row in self.rows:
                row["after"] = self._generate(model, editor.tokenizer, row["prompt"])
                row["applied"] = row["edit"] < t
                row["changed"] = row["after"] != row["before"]
        self.save(trainer, t)

    def save(self, trainer, t: int) -> None:
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / f"{self.name}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({c: row.get(c) for c in COLUMNS} for row in self.rows)
        lines = [f"Generations before the first edit and after T={t} edits", "",
                 "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
        for row in self.rows:
            cells = [str(row.get(c, "")).replace("|", "\\|").replace("\n", " ") for c in COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        (folder / f"{self.name}.md").write_text("\n".join(lines) + "\n")
        data = [[row.get(c) for c in COLUMNS] for row in self.rows]
        for logger in wandb_loggers(trainer):
            logger.log_table(key=self.name, columns=COLUMNS, data=data, step=t)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state_dict.get("rows", [])]
