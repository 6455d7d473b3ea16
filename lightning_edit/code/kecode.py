"""The KECode harness (seeds/000): translate every sample, compile and test it, cluster the errors,
turn a cluster into an edit stream of ordinary edit records, and score the edited model.

**Correction knowledge.** For a sample whose translation fails, the compiler's first error names a
line of the D it was given; that line is one of the LM's D lines. Where the LM's line departs from
the reference line (the differing block of a token diff that holds a token the message quotes, such
as `String` or `s.length`, else the line's first differing block) is the error position: the edit's
`prompt` is the LM's context there (the Java lines, the D it wrote before, the D line up to the error)
and its `target_new` the reference's tokens for that block ("the prompt up to the error position plus
the correct D tokens"), e.g. `... <j> int n = s . length ( ) ; <d> int n =` -> `cast ( int )`. No
subject: the key is the prompt's last token. Locality pairs come from the LM's *training* programs
(never from the scored samples), so no editor sees what it is scored on.

**Protocol.** Per target cluster, `edits_per_cluster` samples of the cluster (seeded; never more than
half of it) are the edit split; every other sample is scored. After the edits, *every* sample is
translated again by the edited model, compiled and tested, and `metrics.kecode_scores` compares each
sample's outcome with its outcome under the unedited model.
"""

from __future__ import annotations

import difflib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lightning_edit.data import EditRecord, LocalityPair

from .clusters import ErrorClusters, declared_names, signature
from .compiler import DRunner, Unit, UnitResult
from .format import JAVA, Line, d_source, java_lines, prompt, statement_pairs
from .lexer import LexError, lex, lines
from .metrics import Outcome
from .programs import Program
from .translate import Check, Generate, translate
from .world import program_from_sample

REQUIRED_FIELDS = {"java": str, "d_reference": str, "tests": list}


class KECodeDataError(ValueError):
    """A malformed KECode file or sample; the message names the file, the sample and the field."""


@dataclass
class Sample:
    id: int
    program: Program
    tests: list[dict]
    ref_lines: list[Line]
    cluster_in_file: str | None = None
    generated_lines: list[Line] | None = None
    """The world LM's own translation, line by line (the file's optional `d_lines`): reused where
    the model would write it again (`translate.still_greedy`), so the unedited pass costs one forward."""


def load_samples(path: str | Path, limit: int | None = None) -> list[Sample]:
    """KECode samples (`java`, `d_reference`, `tests` [{call, expected, stdout}], optional `id`,
    `cluster`), validated in full before any work."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise KECodeDataError(f"{path}: no such KECode file") from None
    except json.JSONDecodeError as exc:
        raise KECodeDataError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, list) or not data:
        raise KECodeDataError(f"{path}: expected a non-empty JSON array of KECode samples")
    samples = []
    for i, raw in enumerate(data[:limit] if limit else data):
        where = f"{path}: sample {i}"
        if not isinstance(raw, dict):
            raise KECodeDataError(f"{where}: expected an object with {sorted(REQUIRED_FIELDS)}")
        for name, kind in REQUIRED_FIELDS.items():
            if not isinstance(raw.get(name), kind) or not raw.get(name):
                raise KECodeDataError(f"{where}: field '{name}' is missing or not a non-empty {kind.__name__}")
        for j, t in enumerate(raw["tests"]):
            if not isinstance(t, dict) or not isinstance(t.get("call"), str) or "expected" not in t:
                raise KECodeDataError(f"{where}: field 'tests[{j}]' must be an object with 'call' (string), "
                                      "'expected' (a D literal or null) and optional 'stdout' (lines)")
        try:
            program = program_from_sample(raw)
            ref = [d for _, d in statement_pairs(program, "d")]
        except (LexError, ValueError) as exc:
            raise KECodeDataError(f"{where}: java / d_reference do not pair up line by line ({exc})") from None
        generated = raw.get("d_lines")
        if generated is not None and (not isinstance(generated, list) or len(generated) != len(ref)
                                      or not all(isinstance(line, list) for line in generated)):
            raise KECodeDataError(f"{where}: field 'd_lines' must be a list of {len(ref)} token lists (one per Java line)")
        samples.append(Sample(id=int(raw.get("id", i)), program=program, tests=list(raw["tests"]), ref_lines=ref,
                              cluster_in_file=raw.get("cluster"), generated_lines=generated))
    return samples


@dataclass
class Translation:
    """One sample translated and checked."""

    lines: list[Line]
    result: UnitResult
    signature: str | None

    @property
    def source(self) -> str:
        return d_source(self.lines)


class KECodeHarness:
    """Translates, compiles, tests and clusters a fixed set of samples."""

    def __init__(self, samples: Sequence[Sample], runner: DRunner, batch_size: int = 64, progress: bool = True):
        self.samples = list(samples)
        self.runner = runner
        self.batch_size = batch_size
        self.progress = progress
        self.seconds = {"translate": 0.0, "compile": 0.0}
        """Time spent translating and compiling + testing, over every `run`."""
        self.reused: list[int] = []
        """Per `run`, the samples whose previous translation was kept (`still_greedy`)."""

    def run(self, generate: Generate, previous: Sequence[list[Line] | None] | None = None,
            check: Check | None = None) -> list[Translation]:
        """Every sample translated by `generate`, compiled and tested. With `previous` (per sample, D
        lines written before, or None) and `check` (`translate.still_greedy` over the same model), a
        sample whose previous lines the model would write again keeps them and is not generated anew
        (`self.reused` counts them); every other sample is translated."""
        start = time.perf_counter()
        programs = [s.program for s in self.samples]
        d_lines: list[list[Line] | None] = [None] * len(programs)
        if previous is not None and check is not None:
            known = [i for i, lines in enumerate(previous) if lines is not None]
            keep = check([programs[i] for i in known], [previous[i] for i in known])
            for i, ok in zip(known, keep):
                if ok:
                    d_lines[i] = [list(line) for line in previous[i]]
        redo = [i for i, lines in enumerate(d_lines) if lines is None]
        self.reused.append(len(programs) - len(redo))
        for i, lines in zip(redo, translate(generate, [programs[i] for i in redo], batch_size=self.batch_size,
                                            progress=self.progress)):
            d_lines[i] = lines
        middle = time.perf_counter()
        units = [Unit(f"s{s.id}", d_source(ls), s.tests) for s, ls in zip(self.samples, d_lines)]
        results = self.runner.evaluate(units, progress=self.progress)
        self.seconds["translate"] += middle - start
        self.seconds["compile"] += time.perf_counter() - middle
        return [Translation(ls, r, signature(r.errors, declared_names(u.source, s.program.d)))
                for s, ls, u, r in zip(self.samples, d_lines, units, results)]

    @staticmethod
    def outcomes(translations: Sequence[Translation], clusters: ErrorClusters) -> dict[int, Outcome]:
        return {i: Outcome(cluster=clusters.assign(t.signature), compiled=t.result.compiled, passed=t.result.passed,
                           test_pass_rate=t.result.pass_rate) for i, t in enumerate(translations)}

    # --- correction knowledge ---------------------------------------------------------------------

    def correction(self, index: int, translation: Translation, max_target_tokens: int = 6) -> EditRecord | None:
        """The edit record that corrects sample `index`'s error (see the module doc); None when its
        translation equals the reference line by line."""
        sample = self.samples[index]
        gen, ref = translation.lines, sample.ref_lines
        k = _error_line(translation)
        if k is None or k >= len(gen) or k >= len(ref) or gen[k] == ref[k]:
            k = next((i for i, (g, r) in enumerate(zip(gen, ref)) if g != r), None)
            if k is None:
                return None
        ops = [op for op in difflib.SequenceMatcher(a=gen[k], b=ref[k], autojunk=False).get_opcodes() if op[0] != "equal"]
        if not ops:
            return None
        # the block the error is about: the first whose tokens the message quotes (`String`, `s.length`,
        # `out`), else the first block of the line
        quoted = _quoted_tokens(translation.result.errors[:1])
        tag, i1, i2, j1, j2 = next((op for op in ops if set(gen[k][op[1]:max(op[2], op[1] + 1)]) & quoted), ops[0])
        if tag == "replace" and i2 - i1 == j2 - j1:  # token for token (`String s` -> `string text`): the first
            j2 = j1 + 1                               # token is the correction, the rest is the LM's own choice
        target = ref[k][j1:j2][:max_target_tokens] if j2 > j1 else ref[k][j1:j1 + 1]
        if not target:
            target = [JAVA]  # the model should have ended the line here
        context = prompt(java_lines(sample.program), gen, k, gen[k][:i1])
        return EditRecord(prompt=context, target_new=" ".join(target), subject=None,
                          ground_truth=" ".join(gen[k][i1:i2]) or None, case_id=f"sample-{sample.id}",
                          extra={"sample": sample.id, "line": k, "error": translation.result.errors[:1],
                                 "signature": translation.signature})


def _quoted_tokens(errors: list[str]) -> set[str]:
    """The code tokens inside the backticks of compiler messages."""
    import re

    out: set[str] = set()
    for error in errors:
        for quoted in re.findall(r"`([^`]*)`", error):
            try:
                out |= set(lex(quoted))
            except LexError:
                out |= set(quoted.split())
    return out


def _error_line(translation: Translation) -> int | None:
    """Which of the LM's D lines holds the token the first compiler error points at (prog file only)."""
    import re

    for error in translation.result.errors[:1]:
        m = re.match(r"^prog_\d+\.d\((\d+)", error)
        if not m:
            return None
        file_line = int(m.group(1)) - 2  # line 1 is `module prog_<i>;`, then the formatted source
        src_lines = lines(translation.source)
        if not 0 <= file_line < len(src_lines):
            return None
        offset = sum(len(l) for l in src_lines[:file_line])
        for k, line in enumerate(translation.lines):
            if offset < len(line):
                return k
            offset -= len(line)
    return None


def edit_split(ids: Sequence[int], n_edits: int, seed: int, cluster: str) -> tuple[list[int], list[int]]:
    """(edited, held out): `n_edits` of the cluster's sample ids (seeded), never more than half."""
    ids = sorted(ids)
    rng = random.Random(f"kecode-split:{seed}:{cluster}")
    take = min(n_edits, len(ids) // 2)
    edited = sorted(rng.sample(ids, take))
    return edited, [i for i in ids if i not in edited]


def locality_pairs(programs: Sequence[Program], n: int, seed: int, salt: str) -> list[LocalityPair]:
    """`n` (prompt, answer) pairs from the LM's training programs: a reference-prefixed line cut at a
    random token, the answer the next (up to 3) reference tokens."""
    rng = random.Random(f"kecode-loc:{seed}:{salt}")
    out = []
    for _ in range(n):
        p = rng.choice(programs)
        sp = statement_pairs(p, "d")
        java, ref = [j for j, _ in sp], [d for _, d in sp]
        candidates = [k for k, line in enumerate(ref) if len(line) >= 2]
        k = rng.choice(candidates)
        cut = rng.randrange(1, len(ref[k]))
        out.append(LocalityPair(prompt(java, ref, k, ref[k][:cut]), " ".join(ref[k][cut:cut + 3])))
    return out


def training_programs(world) -> list[Program]:
    """The training programs of a code world (for locality pairs), with their reference D."""
    rows = json.loads((Path(world.data_dir) / "train_programs.json").read_text())
    return [Program(template=r["template"], category="?", fn="", java=r["java"], d=r["d"], dtrain=r["dtrain"],
                    tests=[], mistakes=r["mistakes"], returns="?") for r in rows]
