"""Everything about an edit run's inputs that can be checked before the first edit, checked then.

`validate_records(records, tokenizer, context)` tokenises every record of the stream the way the
scorer and the editors do (`tokens.target_positions`) and:

- rejects a prompt, subject or target holding the tokenizer's unknown token (`<unk>`): an edit
  towards `<unk>` "succeeds" on a token that is not the answer;
- rejects a prompt + target (and every paraphrase or locality prompt with its answer) longer than
  the model's context, or, with `truncate`, keeps the last tokens of the prompt that fit and
  counts it (reported in the results);
- counts duplicate records (same prompt, target and subject as an earlier one) and conflicting
  ones (a prompt an earlier record edits to another target), and subjects absent from their
  prompt (the methods then fall back to the prompt's last token): warnings with counts, or an
  error under `strict`.

`check_checkpoints` refuses eval.checkpoints outside 1..T (and callback `at` lists outside 0..T).
Every error is a `UserError` naming the record by its place in the file.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from lightning_edit.errors import UserError, describe
from lightning_edit.tokens import encode, join_prompt_target, target_positions

NONFINITE_CHOICES = ("stop", "skip")
"""`on_nonfinite`: what the stream does after refusing an edit that wrote NaN or Inf."""


@dataclass
class ValidationReport:
    """What the validation of a stream found (the results' `meta.validation`)."""

    records: int = 0
    duplicates: int = 0
    conflicts: int = 0
    subject_absent: int = 0
    truncated: int = 0
    examples: dict[str, str] = field(default_factory=dict)
    """The first record of each finding, by its place in the file."""

    def warnings(self) -> list[str]:
        out = []
        if self.duplicates:
            out.append(f"{self.duplicates} of {self.records} records repeat an earlier record (prompt, target and "
                       f"subject), first {self.examples['duplicates']}; each is applied again")
        if self.conflicts:
            out.append(f"{self.conflicts} of {self.records} records ask for another target for a prompt an "
                       f"earlier record edits, first {self.examples['conflicts']}; the later edit competes "
                       "with the earlier one")
        if self.subject_absent:
            out.append(f"{self.subject_absent} of {self.records} records name a subject that is not in their "
                       f"prompt, first {self.examples['subject_absent']}; methods that edit at the subject's "
                       "last token use the prompt's last token instead")
        if self.truncated:
            out.append(f"{self.truncated} of {self.records} records were cut to the model's context "
                       f"(data.truncate=true), first {self.examples['truncated']}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def record_place(record: Any, index: int | None = None) -> str:
    """A record as errors name it: its file and index there (and line), else its stream position."""
    if getattr(record, "location", None):
        return record.location
    source = getattr(record, "source", None) or "the edit stream"
    return f"{source}: case_id {record.case_id!r}" + (f" (stream position {index})" if index is not None else "")


def _unknown(tokenizer: Any) -> int | None:
    unk = getattr(tokenizer, "unk_token_id", None)
    return int(unk) if isinstance(unk, int) else None


def _refuse(record: Any, index: int, field_name: str, problem: str, expected: str) -> UserError:
    return UserError(f"{record_place(record, index)}: field '{field_name}' {problem} (expected {expected})")


def _fit(tokenizer: Any, record: Any, index: int, name: str, prompt: str, answer: str | None,
         context: int | None, truncate: bool) -> tuple[str, bool]:
    """`prompt` as it fits the context with `answer` after it: itself, or (truncate) its last tokens."""
    if context is None:
        return prompt, False
    ids = encode(tokenizer, join_prompt_target(prompt, answer) if answer else prompt)
    if len(ids) <= context:
        return prompt, False
    if not truncate:
        raise _refuse(record, index, name, f"with its answer is {len(ids)} tokens, longer than the model's context "
                      f"of {context}", f"at most {context} tokens, or data.truncate=true to keep the prompt's last "
                      "tokens that fit")
    prompt_ids = encode(tokenizer, prompt)
    answer_len = len(ids) - len(prompt_ids)
    keep = context - answer_len - 1
    if keep < 1:
        raise _refuse(record, index, name, f"has an answer of {answer_len} tokens", f"an answer shorter than the "
                      f"model's context of {context} tokens")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    kept = [t for t in prompt_ids[-keep:] if t not in special]
    return tokenizer.decode(kept).strip(), True


def validate_records(records: Sequence[Any], tokenizer: Any, context: int | None, *, strict: bool = False,
                     truncate: bool = False) -> ValidationReport:
    """Check (and, with `truncate`, cut) every record; a UserError on the first bad one.
    Warnings (duplicates, conflicts, absent subjects) are counted, or errors under `strict`."""
    report = ValidationReport(records=len(records))
    unk = _unknown(tokenizer)
    seen: dict[tuple, str] = {}
    targets: dict[str, tuple[str, str]] = {}

    def note(kind: str, place: str) -> None:
        setattr(report, kind, getattr(report, kind) + 1)
        report.examples.setdefault(kind, place)

    for index, record in enumerate(records):
        place = record_place(record, index)
        cut = False
        record.prompt, c = _fit(tokenizer, record, index, "prompt", record.prompt, record.target_new, context, truncate)
        cut |= c
        try:
            full, start = target_positions(tokenizer, record.prompt, record.target_new)
        except ValueError as exc:
            raise _refuse(record, index, "target_new", f"cannot be scored: {describe(exc)}",
                          "a prompt with tokens and a target adding tokens after it") from exc
        if unk is not None:
            if unk in full[start:]:
                raise _refuse(record, index, "target_new", f"{record.target_new!r} tokenizes to the unknown token "
                              f"{tokenizer.unk_token!r}", "a target the model's tokenizer can spell")
            if unk in full[:start]:
                raise _refuse(record, index, "prompt", f"{record.prompt[:60]!r} tokenizes to the unknown token "
                              f"{tokenizer.unk_token!r}", "a prompt the model's tokenizer can spell")
            if record.subject and unk in encode(tokenizer, record.subject):
                raise _refuse(record, index, "subject", f"{record.subject!r} tokenizes to the unknown token "
                              f"{tokenizer.unk_token!r}", "a subject the model's tokenizer can spell")
        fitted = []
        for j, text in enumerate(record.rephrase_prompts):
            text, c = _fit(tokenizer, record, index, f"rephrase_prompts[{j}]", text, record.target_new, context,
                           truncate)
            fitted.append(text)
            cut |= c
        record.rephrase_prompts = fitted
        for j, pair in enumerate(record.locality):
            pair.prompt, c = _fit(tokenizer, record, index, f"locality[{j}].prompt", pair.prompt, pair.answer,
                                  context, truncate)
            cut |= c
        if cut:
            note("truncated", place)
        if record.subject and record.subject not in record.prompt:
            note("subject_absent", place)
        key = (record.prompt, record.target_new, record.subject)
        if key in seen:
            note("duplicates", f"{place} (same as {seen[key]})")
        elif record.prompt in targets and targets[record.prompt][0] != record.target_new:
            note("conflicts", f"{place} ({record.target_new!r}; {targets[record.prompt][1]} asks for "
                              f"{targets[record.prompt][0]!r})")
        seen.setdefault(key, place)
        targets.setdefault(record.prompt, (record.target_new, place))
    if strict:
        found = [w for w in report.warnings() if "data.truncate" not in w]
        if found:
            raise UserError(f"data.strict=true: {found[0]}")
    return report


def say_warnings(report: ValidationReport) -> None:
    for line in report.warnings():
        print(f"warning: {line}", file=sys.stderr, flush=True)


def check_checkpoints(checkpoints: Sequence[int], stream_length: int, key: str = "eval.checkpoints",
                      lowest: int = 1) -> list[int]:
    """`checkpoints` sorted; a UserError naming `key` for a value below `lowest` or above T."""
    values = sorted({int(t) for t in checkpoints})
    bad = [t for t in values if t < lowest or t > stream_length]
    if bad:
        raise UserError(f"{key}: {', '.join(map(str, bad))} outside {lowest}..{stream_length} (expected edit counts "
                        f"T from {lowest} to the stream's length {stream_length}; the stream's end is always scored)")
    return values


def default_checkpoints(stream_length: int) -> list[int]:
    """1, 10, 100, ... below T, and T."""
    out, t = [], 1
    while t < stream_length:
        out.append(t)
        t *= 10
    return out + [stream_length]
