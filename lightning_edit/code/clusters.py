"""Compiler messages normalised and clustered (KECode, seeds/000: "identify the main clusters of code
errors").

`normalise(line, names)` turns one `ldc2` error line into a signature that is the same for the same
mistake in any program:

- the file path and line/column prefix (`prog_7.d(12,5): Error: `) go;
- string, character and number literals become `<str>`, `<chr>`, `<num>`;
- **program names** become `<id>`: identifiers the program declares (its function, parameters and
  locals, found by `declared_names` in the translation and the reference), wherever they appear in
  the message. Everything else is kept: D keywords and types (`ulong`, `int`), members after a `.`
  (`.length`), and names the program uses without declaring them, which are what such an error is
  about (`String`, `boolean`, `System`);
- the runner's module names (`prog_7`, `test_7`) become `<module>`.

So `prog_3.d(4): Error: cannot implicitly convert expression `text.length` of type `ulong` to `int``
and the same line for `arr.length` in another program both read
"cannot implicitly convert expression `<id>.length` of type `ulong` to `int`".

A program's cluster is its **first** error's signature (later errors often follow from the first,
and a parse error stops the compiler before semantic errors). `ErrorClusters.fit` names the
signatures with at least `min_size` programs `c0, c1, ...` by size; rarer ones share `other`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from .lexer import LexError, lex

OTHER = "other"

D_KEYWORDS = frozenset("""
abstract alias align asm assert auto body bool break byte case cast catch cdouble cent cfloat char class
const continue creal dchar debug default delegate delete deprecated do double else enum export extern false
final finally float for foreach foreach_reverse function goto idouble if ifloat immutable import in inout int
interface invariant ireal is lazy long macro mixin module new nothrow null out override package pragma private
protected public pure real ref return scope shared short static struct super switch synchronized template this
throw true try typeid typeof ubyte ucent uint ulong union unittest ushort version void wchar while with
string wstring dstring size_t ptrdiff_t
""".split())
"""D's keywords and basic types, plus object.d's string and size aliases: never program names."""

_PREFIX = re.compile(r"^\s*(?:\S+?\.d\(\d+(?:,\d+)?\):\s*)?(?:Error|Deprecation|Warning):\s*")
_BACKTICK = re.compile(r"`([^`]*)`")
_IDENT = re.compile(r"(?<![\w<])([A-Za-z_]\w*)")
_MODULE = re.compile(r"\b(?:prog|test)_\d+\b")
_LITERALS = (
    (re.compile(r'"(?:[^"\\]|\\.)*"'), "<str>"),
    (re.compile(r"'(?:[^'\\]|\\.)'"), "<chr>"),
    (re.compile(r"(?<![\w<])-?\d+(?:\.\d+)?(?:[uUlLfF]{0,2})(?![\w>])"), "<num>"),
)

_NOT_A_TYPE = frozenset({"return", "else", "new", "case", "goto", "throw", "assert", "in", "is", "import", "module",
                         "cast", "typeof", "delete"})


def declared_names(*sources: str) -> set[str]:
    """Identifiers declared by a program: `T name` followed by `=`, `;`, `,`, `)` or `(` (locals,
    parameters, functions), where T is an identifier, keyword type or `]` (array types)."""
    names: set[str] = set()
    for source in sources:
        try:
            tokens = lex(source)
        except LexError:
            tokens = source.split()
        for i in range(1, len(tokens) - 1):
            tok, before, after = tokens[i], tokens[i - 1], tokens[i + 1]
            if not re.fullmatch(r"[A-Za-z_]\w*", tok) or tok in D_KEYWORDS:
                continue
            type_like = before == "]" or (re.fullmatch(r"[A-Za-z_]\w*", before) and before not in _NOT_A_TYPE)
            if type_like and after in ("=", ";", ",", ")", "("):
                names.add(tok)
    return names


def error_text(line: str) -> str:
    """The message of an error line without its `file(line,col): Error:` prefix."""
    return _PREFIX.sub("", line).strip()


def normalise(line: str, names: set[str] = frozenset()) -> str:
    """The signature of one error line (see the module doc)."""
    text = _MODULE.sub("<module>", error_text(line))

    def inside(segment: str) -> str:
        for pattern, token in _LITERALS:
            segment = pattern.sub(token, segment)
        return _IDENT.sub(lambda m: "<id>" if m.group(1) in names else m.group(1), segment)

    parts = []
    last = 0
    for m in _BACKTICK.finditer(text):
        outside = text[last:m.start()]
        for pattern, token in _LITERALS:
            outside = pattern.sub(token, outside)
        parts.append(outside)
        parts.append("`" + inside(m.group(1)) + "`")
        last = m.end()
    tail = text[last:]
    for pattern, token in _LITERALS:
        tail = pattern.sub(token, tail)
    parts.append(tail)
    return re.sub(r"\s+", " ", "".join(parts)).strip()


def signature(errors: list[str], names: set[str] = frozenset()) -> str | None:
    """The normalised first error of a program, or None when it has none."""
    return normalise(errors[0], names) if errors else None


@dataclass
class ErrorClusters:
    """Signature -> cluster id, fitted on the signatures of a set of programs."""

    min_size: int = 3
    ids: dict[str, str] = field(default_factory=dict)
    """Signature -> `c<k>` for the signatures with at least `min_size` programs, largest first."""
    sizes: dict[str, int] = field(default_factory=dict)
    """Cluster id -> programs in it when fitted (`other` included)."""

    def fit(self, signatures: list[str | None]) -> "ErrorClusters":
        counts = Counter(s for s in signatures if s is not None)
        kept = [s for s, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= self.min_size]
        self.ids = {s: f"c{k}" for k, s in enumerate(kept)}
        self.sizes = {self.ids[s]: counts[s] for s in kept}
        rest = sum(n for s, n in counts.items() if s not in self.ids)
        if rest:
            self.sizes[OTHER] = rest
        return self

    def assign(self, sig: str | None) -> str | None:
        """The cluster of a signature: its id, `other` for an unseen or rare one, None for no error."""
        if sig is None:
            return None
        return self.ids.get(sig, OTHER)

    @property
    def signatures(self) -> dict[str, str]:
        """Cluster id -> signature."""
        return {cid: s for s, cid in self.ids.items()}

    def to_json(self) -> dict:
        return {"min_size": self.min_size, "clusters": [{"id": cid, "signature": s, "size": self.sizes[cid]}
                                                        for s, cid in self.ids.items()],
                "other": self.sizes.get(OTHER, 0)}

    @classmethod
    def from_json(cls, data: dict) -> "ErrorClusters":
        out = cls(min_size=data["min_size"])
        out.ids = {c["signature"]: c["id"] for c in data["clusters"]}
        out.sizes = {c["id"]: c["size"] for c in data["clusters"]}
        if data.get("other"):
            out.sizes[OTHER] = data["other"]
        return out


def cluster_counts(labels: list[str | None]) -> Counter:
    return Counter(label for label in labels if label is not None)
