"""How the code LM reads and writes a translation: statement by statement, interleaved.

A program is its Java source lines, each followed by the D it translates to:

    <j> public class Main { <d>
    <j> public static int countChar ( String s , char c ) { <d> int countChar ( string s , char c ) {
    <j> int n = s . length ( ) ; <d> int n = cast ( int ) s . length ;
    ...
    <j> } <d> import std . string ;

The class header translates to nothing and the class's closing brace to the D imports (D allows
imports anywhere at module scope, and only there has the model read the whole program). Translating
means: feed `<j> <java line> <d>`, let the model write until it emits `<j>` (or `<eos>`), feed the
next Java line, and so on. The D program is the concatenation of what it wrote. A tiny model learns
this local, line-aligned translation in minutes, where whole-program translation (all the Java,
then all the D) needs far longer to learn to copy across a hundred tokens.
"""

from __future__ import annotations

from .lexer import lines
from .programs import Program

JAVA = "<j>"
D = "<d>"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", JAVA, D)
"""In id order; <pad>=0, <bos>=1, <eos>=2, <unk>=3."""

Line = list[str]


class AlignmentError(ValueError):
    """A program whose Java and D lines do not pair up."""


def statement_pairs(program: Program, which: str = "d") -> list[tuple[Line, Line]]:
    """(Java line, D line) pairs of `program` with its reference D (`which="d"`) or training D
    (`"dtrain"`)."""
    java = lines(program.java)
    d_lines = lines(getattr(program, which))
    imports = [line for line in d_lines if line[0] == "import"]
    body = [line for line in d_lines if line[0] != "import"]
    if len(java) != len(body) + 2:
        raise AlignmentError(f"template {program.template}: {len(java)} Java lines for {len(body)} D lines")
    return [(java[0], [])] + list(zip(java[1:-1], body)) + [(java[-1], [tok for line in imports for tok in line])]


def java_lines(program: Program) -> list[Line]:
    return [j for j, _ in statement_pairs(program)]


def sequence(pairs: list[tuple[Line, Line]]) -> str:
    """The training text of a whole program (no <bos>/<eos>; the tokenizer adds <bos>)."""
    return " ".join(" ".join([JAVA, *j, D, *d]) for j, d in pairs)


def prompt(java: list[Line], d_so_far: list[Line], k: int, d_prefix: Line = ()) -> str:
    """The context in which the model writes (the rest of) D line `k`: every earlier Java line with
    the D written for it, then Java line `k`, `<d>` and `d_prefix`."""
    parts = [" ".join([JAVA, *java[i], D, *d_so_far[i]]) for i in range(k)]
    parts.append(" ".join([JAVA, *java[k], D, *d_prefix]))
    return " ".join(parts)


def d_source(d_lines: list[Line]) -> str:
    """The D program (token text) from its lines."""
    return " ".join(tok for line in d_lines for tok in line)
