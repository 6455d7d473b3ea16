"""Readers that map the public editing datasets onto `EditRecord`, and a writer for our own files.

Formats (METHODS.md section 3), by the fields each record carries:

- ``zsre``: the MEND/ROME/MEMIT zsRE json (`zsre_mend_eval.json`, EasyEdit's `zsre_mend_edit.json`):
  `src` -> prompt, `alt` -> target_new, `answers[0]` -> ground_truth, `rephrase` (str or list) ->
  rephrase_prompts, `subject`, and one locality pair `loc` / `loc_ans` (`loc` kept verbatim,
  "nq question: " prefix included).
- ``counterfact``: ROME's CounterFact: `requested_rewrite.prompt` (a template with "{}") formatted
  with `requested_rewrite.subject` -> prompt, `target_new.str`, `target_true.str` -> ground_truth,
  `paraphrase_prompts`, `neighborhood_prompts` -> locality with answer `target_true.str` (the
  dataset's meaning: the neighbours keep the true object), or the item's own answer where a
  neighbourhood item is an object `{"prompt", "target" | "answer" | "ground_truth"}`.
- ``easyedit``: EasyEdit's flat json and KnowEdit (ZsRE, wiki_recent, wiki_counterfact): `prompt`,
  `target_new`, `ground_truth` (str or alias list), `subject`, `rephrase_prompt` (str or list),
  `locality_prompt` / `locality_ground_truth` (str or parallel lists), and KnowEdit's nested
  `locality: {category: [{"prompt", "ground_truth"}]}`; `portability` is kept in `extra`. Our own
  `write_edits` files are this format (plus `kind`, `case_id`, `extra`).
- ``selfcheckgpt``: WikiBio hallucination edits (SelfCheckGPT data as used by GRACE, WISE, MicroEdit,
  EasyEdit): `prompt` or `text` -> prompt, `target_new` or `labels` (the corrected sentence) ->
  target_new, `subject` or `concept`, locality as in ``easyedit``; kind "hallucination".

Training paraphrases: every format reads an optional top-level `training_paraphrases` (str or list),
the only field a record marks for training; it fills `EditRecord.training_paraphrases`, the one
paraphrase field an editor sees (`EditRequest`). ZsRE's `rephrase`, CounterFact's
`paraphrase_prompts` and EasyEdit's `rephrase_prompt` are the prompts Gen is scored on and never
reach an editor; neither do locality or neighbourhood prompts.

Files are `.json` (an array of records) or `.jsonl` (one record per line). The whole file is
validated when read, so a malformed record stops a run before its first edit; every error names
the file, the record (and line, for jsonl), the field, and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from lightning_edit.errors import UserError

from .records import KINDS, EditRecord, LocalityPair

FORMATS = ("zsre", "counterfact", "easyedit", "selfcheckgpt")

# SelfCheckGPT passages were generated from this prompt; EasyEdit/WISE's hallucination files keep
# it at the start of `prompt`, which is what tells them apart from a plain EasyEdit file.
_WIKIBIO_PROMPT_PREFIX = "This is a Wikipedia passage about"

_NONEMPTY = "a non-empty string"
_TEXTS = "a non-empty string or a list of non-empty strings"
_ANSWER = "a non-empty string, a list of alias strings, or null"


class EditDataError(UserError):
    """A malformed edit file or record; the message says where and what was expected."""


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class _Fields:
    """Typed access to one raw record's fields; every failure raises an `EditDataError` that names
    the file, the record and the (dotted) field."""

    def __init__(self, raw: dict[str, Any], where: str):
        self.raw = raw
        self.where = where
        self.used: set[str] = set()

    def error(self, name: str, problem: str, expected: str) -> EditDataError:
        return EditDataError(f"{self.where}: field '{name}' {problem} (expected {expected})")

    def has(self, name: str) -> bool:
        return self.lookup(name, "any value")[0]

    def lookup(self, name: str, expected: str) -> tuple[bool, Any]:
        """(present, value) for a dotted name; null counts as absent."""
        node: Any = self.raw
        parts = name.split(".")
        self.used.add(parts[0])
        for depth, part in enumerate(parts):
            if not isinstance(node, dict):
                parent = ".".join(parts[:depth])
                raise self.error(parent, f"has type {_json_type(node)}", "an object")
            if part not in node or node[part] is None:
                return False, None
            node = node[part]
        return True, node

    def text(self, name: str, required: bool = True) -> str | None:
        present, value = self.lookup(name, _NONEMPTY)
        if not present:
            if required:
                raise self.error(name, "is missing", _NONEMPTY)
            return None
        return self._check_text(name, value, _NONEMPTY)

    def _check_text(self, name: str, value: Any, expected: str) -> str:
        if not isinstance(value, str):
            raise self.error(name, f"has type {_json_type(value)}", expected)
        if not value.strip():
            raise self.error(name, "is an empty string", expected)
        return value

    def texts(self, name: str) -> list[str]:
        """A string or a list of strings, as a list; absent gives []."""
        present, value = self.lookup(name, _TEXTS)
        if not present:
            return []
        return self._check_texts(name, value)

    def _check_texts(self, name: str, value: Any) -> list[str]:
        if isinstance(value, str):
            return [self._check_text(name, value, _TEXTS)]
        if not isinstance(value, list):
            raise self.error(name, f"has type {_json_type(value)}", _TEXTS)
        return [self._check_text(f"{name}[{i}]", v, _NONEMPTY) for i, v in enumerate(value)]

    def answer(self, name: str, value: Any) -> str | None:
        """An answer given as a string or (KnowEdit) a list of aliases, possibly nested: the first."""
        if value is None:
            return None
        if isinstance(value, list):
            if not value:
                raise self.error(name, "is an empty array", _ANSWER)
            return self.answer(f"{name}[0]", value[0])
        return self._check_text(name, value, _ANSWER)

    def first_of(self, names: Sequence[str], required: bool = True) -> str | None:
        """The first present of several alternative names for one field."""
        for name in names:
            if self.has(name):
                return self.text(name)
        if required:
            alternatives = " or ".join(f"'{n}'" for n in names[1:])
            raise self.error(names[0], "is missing", f"{_NONEMPTY}; also accepted as {alternatives}")
        return None

    def case_id(self, index: int) -> str | int:
        present, value = self.lookup("case_id", "a string or an integer")
        if not present:
            return index
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self.error("case_id", f"has type {_json_type(value)}", "a string or an integer")
        return value

    def extra(self, **known: Any) -> dict[str, Any]:
        """Fields no reader mapped, plus a record's own `extra` object, plus `known` entries."""
        out = {k: v for k, v in self.raw.items() if k not in self.used and k != "extra"}
        present, own = self.lookup("extra", "an object")
        if present:
            if not isinstance(own, dict):
                raise self.error("extra", f"has type {_json_type(own)}", "an object")
            out.update(own)
        out.update({k: v for k, v in known.items() if v is not None})
        return out

    # Locality in the two EasyEdit spellings ---------------------------------------------------

    def flat_locality(self) -> list[LocalityPair]:
        """`locality_prompt` / `locality_ground_truth`: a str each, or parallel lists."""
        present, prompts = self.lookup("locality_prompt", _TEXTS)
        has_answers, answers = self.lookup("locality_ground_truth", _ANSWER)
        if not present:
            if has_answers:
                raise self.error("locality_prompt", "is missing", f"{_TEXTS}, since 'locality_ground_truth' is given")
            return []
        if isinstance(prompts, str):
            return [LocalityPair(self._check_text("locality_prompt", prompts, _TEXTS),
                                 self.answer("locality_ground_truth", answers))]
        prompts = self._check_texts("locality_prompt", prompts)
        if not has_answers:
            return [LocalityPair(p, None) for p in prompts]
        expected = f"an array of {len(prompts)} answers, one per locality prompt"
        if not isinstance(answers, list):
            raise self.error("locality_ground_truth", f"has type {_json_type(answers)}", expected)
        if len(answers) != len(prompts):
            raise self.error("locality_ground_truth", f"has {len(answers)} entries", expected)
        return [LocalityPair(p, self.answer(f"locality_ground_truth[{i}]", a))
                for i, (p, a) in enumerate(zip(prompts, answers))]

    def nested_locality(self) -> list[LocalityPair]:
        """KnowEdit's `locality: {category: [{"prompt": str | list, "ground_truth": ...}]}`."""
        present, groups = self.lookup("locality", "an object")
        if not present:
            return []
        if not isinstance(groups, dict):
            raise self.error("locality", f"has type {_json_type(groups)}", "an object of locality categories")
        pairs: list[LocalityPair] = []
        for category, items in groups.items():
            base = f"locality.{category}"
            if items is None:
                continue
            if not isinstance(items, list):
                raise self.error(base, f"has type {_json_type(items)}", "an array of {prompt, ground_truth} objects")
            for i, item in enumerate(items):
                name = f"{base}[{i}]"
                if not isinstance(item, dict):
                    raise self.error(name, f"has type {_json_type(item)}",
                                     "an object with 'prompt' and 'ground_truth'")
                if "prompt" not in item:
                    raise self.error(f"{name}.prompt", "is missing", _TEXTS)
                prompt, answer = item["prompt"], item.get("ground_truth")
                if isinstance(prompt, list):
                    # Some KnowEdit entries hold several prompts with a parallel answer list.
                    prompts = self._check_texts(f"{name}.prompt", prompt)
                    if isinstance(answer, list) and len(answer) == len(prompts) and len(prompts) > 1:
                        pairs += [LocalityPair(p, self.answer(f"{name}.ground_truth[{j}]", a))
                                  for j, (p, a) in enumerate(zip(prompts, answer))]
                    else:
                        first = self.answer(f"{name}.ground_truth", answer)
                        pairs += [LocalityPair(p, first) for p in prompts]
                else:
                    pairs.append(LocalityPair(self._check_text(f"{name}.prompt", prompt, _TEXTS),
                                              self.answer(f"{name}.ground_truth", answer)))
        return pairs


# Per-format mapping ---------------------------------------------------------------------------


def _from_zsre(f: _Fields, index: int) -> EditRecord:
    present, answers = f.lookup("answers", "a string or an array of strings")
    aliases = f._check_texts("answers", answers) if present else []
    locality = []
    loc = f.text("loc", required=False)
    loc_ans = f.text("loc_ans", required=False)
    if loc is not None:
        locality.append(LocalityPair(loc, loc_ans))
    elif loc_ans is not None:
        raise f.error("loc", "is missing", f"{_NONEMPTY}, since 'loc_ans' is given")
    return EditRecord(
        prompt=f.text("src"),
        target_new=f.text("alt"),
        subject=f.text("subject", required=False),
        ground_truth=aliases[0] if aliases else None,
        rephrase_prompts=f.texts("rephrase"),
        training_paraphrases=f.texts("training_paraphrases"),
        locality=locality,
        case_id=f.case_id(index),
        extra=f.extra(answers=aliases or None),
    )


def _from_counterfact(f: _Fields, index: int) -> EditRecord:
    present, rewrite = f.lookup("requested_rewrite", "an object")
    if not present:
        raise f.error("requested_rewrite", "is missing", "an object with prompt, subject, target_new, target_true")
    if not isinstance(rewrite, dict):
        raise f.error("requested_rewrite", f"has type {_json_type(rewrite)}", "an object")
    template = f.text("requested_rewrite.prompt")
    if "{}" not in template:
        raise f.error("requested_rewrite.prompt", f"has no '{{}}' placeholder: {template!r}",
                      "a template with '{}' where the subject goes")
    subject = f.text("requested_rewrite.subject")
    true_object = f.text("requested_rewrite.target_true.str")
    locality = []
    present, neighbours = f.lookup("neighborhood_prompts", "an array")
    if present:
        if not isinstance(neighbours, list):
            raise f.error("neighborhood_prompts", f"has type {_json_type(neighbours)}", "an array of prompts")
        for i, item in enumerate(neighbours):
            name = f"neighborhood_prompts[{i}]"
            if isinstance(item, dict):
                if "prompt" not in item:
                    raise f.error(f"{name}.prompt", "is missing", _NONEMPTY)
                answer_key = next((k for k in ("target", "answer", "ground_truth") if k in item), None)
                answer = f.answer(f"{name}.{answer_key}", item[answer_key]) if answer_key else true_object
                locality.append(LocalityPair(f._check_text(f"{name}.prompt", item["prompt"], _NONEMPTY), answer))
            else:
                prompt = f._check_text(name, item, "a non-empty string or a {prompt, target} object")
                locality.append(LocalityPair(prompt, true_object))
    return EditRecord(
        # str.replace, not str.format: prompts may hold other braces.
        prompt=template.replace("{}", subject),
        target_new=f.text("requested_rewrite.target_new.str"),
        subject=subject,
        ground_truth=true_object,
        rephrase_prompts=f.texts("paraphrase_prompts"),
        training_paraphrases=f.texts("training_paraphrases"),
        locality=locality,
        case_id=f.case_id(index),
        extra=f.extra(prompt_template=template, relation_id=rewrite.get("relation_id")),
    )


def _from_easyedit(f: _Fields, index: int) -> EditRecord:
    present, truth = f.lookup("ground_truth", _ANSWER)
    kind = f.text("kind", required=False) or "fact"
    if kind not in KINDS:
        raise f.error("kind", f"is {kind!r}", f"one of {', '.join(KINDS)}")
    rephrase_name = "rephrase_prompts" if f.has("rephrase_prompts") else "rephrase_prompt"
    return EditRecord(
        prompt=f.text("prompt"),
        target_new=f.text("target_new"),
        subject=f.text("subject", required=False),
        ground_truth=f.answer("ground_truth", truth) if present else None,
        rephrase_prompts=f.texts(rephrase_name),
        training_paraphrases=f.texts("training_paraphrases"),
        locality=f.flat_locality() + f.nested_locality(),
        kind=kind,
        case_id=f.case_id(index),
        extra=f.extra(ground_truth_aliases=truth if isinstance(truth, list) else None),
    )


def _from_selfcheckgpt(f: _Fields, index: int) -> EditRecord:
    return EditRecord(
        prompt=f.first_of(("prompt", "text")),
        target_new=f.first_of(("target_new", "labels")),
        subject=f.first_of(("subject", "concept"), required=False),
        ground_truth=f.text("ground_truth", required=False),
        rephrase_prompts=f.texts("rephrase_prompt"),
        training_paraphrases=f.texts("training_paraphrases"),
        locality=f.flat_locality() + f.nested_locality(),
        kind="hallucination",
        case_id=f.case_id(index),
        extra=f.extra(),
    )


_READERS: dict[str, Callable[[_Fields, int], EditRecord]] = {
    "zsre": _from_zsre,
    "counterfact": _from_counterfact,
    "easyedit": _from_easyedit,
    "selfcheckgpt": _from_selfcheckgpt,
}


def detect_format(raw: dict[str, Any]) -> str | None:
    """The format a raw record's keys identify, or None when they match none."""
    keys = set(raw)
    if "requested_rewrite" in keys:
        return "counterfact"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"text", "labels"} <= keys:
        return "selfcheckgpt"
    if {"prompt", "target_new"} <= keys:
        prompt = raw.get("prompt")
        if (raw.get("kind") is None and isinstance(prompt, str)
                and prompt.startswith(_WIKIBIO_PROMPT_PREFIX)):
            return "selfcheckgpt"
        return "easyedit"
    return None


# Files ---------------------------------------------------------------------------------------


def _load_raw(path: Path) -> list[tuple[Any, str]]:
    """(raw record, location label) for every record of a .json or .jsonl file."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EditDataError(f"{name}: not UTF-8 text ({e})") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{name}: record {len(out)} (line {line_no})"
            try:
                out.append((json.loads(line), where))
            except json.JSONDecodeError as e:
                raise EditDataError(f"{where}: invalid JSON at column {e.colno}: {e.msg}") from None
        return out
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            hint = " (one record per line? name the file .jsonl)" if e.msg == "Extra data" else ""
            raise EditDataError(f"{name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}{hint}") from None
        if not isinstance(data, list):
            raise EditDataError(f"{name}: top level has type {_json_type(data)} (expected an array of records)")
        return [(raw, f"{name}: record {i}") for i, raw in enumerate(data)]
    raise EditDataError(f"{name}: unknown file type {path.suffix!r} (expected .json or .jsonl)")


def read_edits(path: str | Path, format: str = "auto") -> list[EditRecord]:
    """Read and validate every record of an edit file.

    `format` is one of "auto", "zsre", "counterfact", "easyedit", "selfcheckgpt"; "auto" decides
    from the first record's keys (see `detect_format`). Raises `EditDataError` on the first
    malformed record, naming the file, record index (and line for jsonl) and field.
    """
    if format != "auto" and format not in _READERS:
        raise EditDataError(f"data.format: unknown edit format {format!r} (expected 'auto' or one of {', '.join(FORMATS)})")
    path = Path(path)
    raws = _load_raw(path)
    if not raws:
        raise EditDataError(f"{path}: the file holds no records (expected at least one edit)")
    for raw, where in raws:
        if not isinstance(raw, dict):
            raise EditDataError(f"{where}: has type {_json_type(raw)} (expected an object)")
    if format == "auto":
        first, where = raws[0]
        format = detect_format(first)
        if format is None:
            raise EditDataError(
                f"{where}: cannot tell the format from the keys {sorted(first)} (expected one of: "
                "zsre (src, alt, ...), counterfact (requested_rewrite, ...), "
                "easyedit (prompt, target_new, ...), selfcheckgpt (text, labels, ... or a prompt "
                f"starting {_WIKIBIO_PROMPT_PREFIX!r}); or pass format= explicitly)")
    reader = _READERS[format]
    records = []
    for index, (raw, where) in enumerate(raws):
        record = reader(_Fields(raw, where), index)
        record.source = str(path)
        record.location = where
        records.append(record)
    return records


def _to_easyedit(record: EditRecord) -> dict[str, Any]:
    return {
        "case_id": record.case_id,
        "kind": record.kind,
        "prompt": record.prompt,
        "target_new": record.target_new,
        "ground_truth": record.ground_truth,
        "subject": record.subject,
        "rephrase_prompt": list(record.rephrase_prompts),
        "training_paraphrases": list(record.training_paraphrases),
        "locality_prompt": [p.prompt for p in record.locality],
        "locality_ground_truth": [p.answer for p in record.locality],
        "extra": record.extra,
    }


def write_edits(records: Iterable[EditRecord], path: str | Path) -> Path:
    """Write records in the EasyEdit layout (plus `kind`, `case_id`, `extra`) as .json or .jsonl;
    `read_edits` reads them back unchanged (apart from `source`)."""
    path = Path(path)
    rows = [_to_easyedit(r) for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    elif path.suffix.lower() == ".json":
        text = json.dumps(rows, ensure_ascii=False, indent=2) + "\n"
    else:
        raise ValueError(f"{path}: unknown file type {path.suffix!r} (expected .json or .jsonl)")
    path.write_text(text, encoding="utf-8")
    return path
