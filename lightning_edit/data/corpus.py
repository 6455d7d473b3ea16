"""Corpus lines an editor may use as its own unrelated text (preserve samples, probes, contexts):
the reference corpus handed to `Editor.prepare`, never the prompts an edit is scored on."""

from __future__ import annotations

import random
from typing import Iterable, Sequence


class UnrelatedLines:
    """The distinct non-empty lines of a corpus in a seeded order; `draw` walks that order and keeps
    lines that mention none of the given subjects (their facts are what the edits change)."""

    def __init__(self, lines: Iterable[str] | None = None, seed: str = "unrelated"):
        self.lines = list(dict.fromkeys(line.strip() for line in lines or [] if line.strip()))
        random.Random(seed).shuffle(self.lines)

    def __len__(self) -> int:
        return len(self.lines)

    def draw(self, n: int, start: int, exclude: Sequence[str] = ()) -> list[str]:
        """Up to `n` lines that mention none of `exclude`, from line `start` (mod the corpus) on, so
        successive draws (start = edit index times n) give different lines."""
        exclude = [s for s in exclude if s]
        out: list[str] = []
        for k in range(len(self.lines) if n > 0 else 0):
            line = self.lines[(start + k) % len(self.lines)]
            if not any(s in line for s in exclude):
                out.append(line)
                if len(out) == n:
                    break
        return out


def without_scored(lines: Sequence[str] | None, scored: Sequence[str]) -> list[str] | None:
    """`lines` less every line that contains one of `scored` (prompts an evaluation scores), so that an
    editor prepared on the rest never sees them, not even inside a longer line."""
    if lines is None:
        return None
    scored = [p.strip() for p in dict.fromkeys(scored) if p.strip()]
    return [line for line in lines if not any(p in line for p in scored)]
