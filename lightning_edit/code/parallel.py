"""Parallel data for an edit: prompts from the LM's training programs whose next token is the edit's
target, most similar first (MENT's paper, III-B: "we retrieve semantically similar data from the
corpus, and their ground truth is the same as the current datum", 10 of them, for KN).

Similarity is the token Jaccard overlap of the current line (its Java line and the D written so far)
with the query's. The corpus is the training set, never the scored samples.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from .format import D, JAVA, prompt, statement_pairs
from .programs import Program


class ParallelIndex:
    """Every (training program, D line, position) indexed by the reference token that follows."""

    def __init__(self, programs: Sequence[Program]):
        self.programs = list(programs)
        self._pairs = [statement_pairs(p, "d") for p in self.programs]
        self.by_next: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
        for pi, pairs in enumerate(self._pairs):
            for k, (_, line) in enumerate(pairs):
                for pos in range(len(line) + 1):
                    nxt = line[pos] if pos < len(line) else JAVA
                    self.by_next[nxt].append((pi, k, pos))

    def _text(self, pi: int, k: int, pos: int) -> str:
        pairs = self._pairs[pi]
        java, ref = [j for j, _ in pairs], [d for _, d in pairs]
        return prompt(java, ref, k, ref[k][:pos])

    def similar(self, query: str, target: str, n: int) -> list[str]:
        """Up to `n` training prompts whose next token is `target`'s first token, most similar first."""
        if n <= 0 or not target.split():
            return []
        first = target.split()[0]
        java_part, _, d_part = query.split(JAVA)[-1].partition(D)
        java_q, d_q = set(java_part.split()), set(d_part.split())
        lines: dict[tuple[int, int], float] = {}
        for pi, k, _ in self.by_next.get(first, ()):
            if (pi, k) not in lines:
                lines[(pi, k)] = _jaccard(java_q, set(self._pairs[pi][k][0]))
        # the best Java lines first, then the D written so far on them
        best = sorted(self.by_next.get(first, ()), key=lambda e: -lines[(e[0], e[1])])[: 20 * n]
        best.sort(key=lambda e: (-(lines[(e[0], e[1])] + _jaccard(d_q, set(self._pairs[e[0]][e[1]][1][:e[2]]))), e))
        out, seen = [], set()
        for pi, k, pos in best:
            text = self._text(pi, k, pos)
            if text != query and text not in seen:
                seen.add(text)
                out.append(text)
            if len(out) == n:
                break
        return out


def _jaccard(a: set, b: set) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 0.0
