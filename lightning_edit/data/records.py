"""The edit record: one requested change to a model, whatever file it came from.

Every reader in `readers.py` maps its dataset onto `EditRecord`; the edit stream, the metrics and the
callbacks see this type (METHODS.md section 3). An editor sees only its `EditRequest`: what a user
supplies at edit time, never the prompts the edit is scored on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("fact", "hallucination")


@dataclass
class LocalityPair:
    """A prompt the edit must leave alone, with the answer the dataset gives for it."""

    prompt: str
    """Text given to the model as is (ZsRE's `nq question: ...` prefix is kept verbatim)."""
    answer: str | None = None
    """Expected continuation; None when the dataset gives none. Loc compares the edited model with
    the unedited one either way, so the answer only chooses which positions are compared."""


@dataclass
class EditRecord:
    """One edit request, in the shape METHODS.md section 3 defines."""

    prompt: str
    """The full edit prompt, subject filled in (CounterFact's "{}" template is formatted)."""
    target_new: str
    """The answer the edited model should give; teacher forcing feeds `prompt + " " + target_new`."""
    subject: str | None = None
    """The entity whose last token is the edit's key position; None when the dataset has none."""
    ground_truth: str | None = None
    """The answer before the edit, when the dataset gives one (the first alias where it lists several)."""
    rephrase_prompts: list[str] = field(default_factory=list)
    """Paraphrases of `prompt`, scored for Gen with the same target (never shown to an editor)."""
    training_paraphrases: list[str] = field(default_factory=list)
    """Paraphrases of `prompt` an editor may train on: only from fields a dataset marks for training
    (readers.py), never the scored `rephrase_prompts`."""
    locality: list[LocalityPair] = field(default_factory=list)
    """Unrelated prompts scored for Loc (never shown to an editor)."""
    kind: str = "fact"
    """"fact" (Rel = token accuracy) or "hallucination" (Rel = perplexity of `target_new`)."""
    case_id: str | int | None = None
    """The dataset's id for the record, or its 0-based index in the file when it has none."""
    source: str | None = None
    """Path of the file the record was read from."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Dataset fields with no place above (portability probes, templates, aliases), kept verbatim."""
    location: str | None = field(default=None, compare=False)
    """Where the record sits in its file, as errors name it: "<file>: record <i>" (plus the line, for .jsonl)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"EditRecord.kind is {self.kind!r} (expected one of {', '.join(KINDS)})")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of JSON types (the inverse of `from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRecord:
        """Rebuild a record from `to_dict` output; locality pairs may be dicts or `LocalityPair`s."""
        data = dict(data)
        data["locality"] = [
            p if isinstance(p, LocalityPair) else LocalityPair(p["prompt"], p.get("answer"))
            for p in data.get("locality", [])
        ]
        data["rephrase_prompts"] = list(data.get("rephrase_prompts", []))
        data["training_paraphrases"] = list(data.get("training_paraphrases", []))
        data["extra"] = dict(data.get("extra", {}))
        return cls(**data)


@dataclass(frozen=True)
class EditRequest:
    """What `Editor.apply` receives for one edit: what a user supplies at edit time and nothing the
    edit is scored on (no rephrase or locality prompts, no dataset extras). Its attribute names are
    the record's, so an editor reads `request.prompt`, `request.subject`, `request.target_new`."""

    prompt: str
    target_new: str
    subject: str | None = None
    training_paraphrases: tuple[str, ...] = ()
    """Paraphrases of `prompt` to train on (`EditRecord.training_paraphrases`); empty for most datasets."""
    case_id: str | int | None = None
    """The record's id, so the ledger names the edit."""

    @property
    def target(self) -> str:
        return self.target_new

    @classmethod
    def of(cls, record: "EditRecord | EditRequest") -> "EditRequest":
        """The request of `record`: an `EditRecord` or anything with its `prompt` and `target_new` (the
        optional fields read when present); a request is returned as it is."""
        if isinstance(record, EditRequest):
            return record
        return cls(prompt=record.prompt, target_new=record.target_new, subject=getattr(record, "subject", None),
                   training_paraphrases=tuple(getattr(record, "training_paraphrases", ()) or ()),
                   case_id=getattr(record, "case_id", None))


def edit_requests(records) -> list[EditRequest]:
    """`EditRequest.of` each of `records`: what the harness hands an editor."""
    return [EditRequest.of(r) for r in records]
