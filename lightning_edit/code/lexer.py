"""One lexer for the Java and D of the code world: source text <-> the space-joined token stream the
code LM reads and writes, and back to readable source.

The code LM's tokenizer splits on whitespace only (`tokenizer.py`), so a program is stored and
generated as its lexical tokens joined by single spaces: `int n = cast ( int ) s . length ;`. That text
is still valid Java or D (both ignore whitespace between tokens), so a generated translation goes to
the compiler as is; `pretty` re-indents it for people. String and character literals are single tokens
and never contain whitespace (the program templates guarantee it; `lex` refuses otherwise).
"""

from __future__ import annotations

import re

OPERATORS = (
    ">>>=", "<<=", ">>=", ">>>", "...", "..", "==", "!=", "<=", ">=", "&&", "||", "++", "--", "+=", "-=",
    "*=", "/=", "%=", "&=", "|=", "^=", "~=", "<<", ">>", "=>", "->",
)
"""Multi-character operators, longest first (single characters are matched after them)."""

_TOKEN = re.compile(
    r'"(?:[^"\\\n]|\\.)*"'             # string literal
    r"|'(?:[^'\\\n]|\\.)'"             # character literal
    r"|\d+(?:\.\d+)?[LlfFdD]?"         # number (a '.' must be followed by a digit: 0..n is 0 .. n)
    r"|[A-Za-z_]\w*"                   # identifier or keyword
    r"|" + "|".join(re.escape(op) for op in OPERATORS) +
    r"|[{}()\[\];,.=<>+\-*/%!&|^~?:@#$]"  # one-character punctuation
)
_SPACE = re.compile(r"\s+|//[^\n]*|/\*.*?\*/", re.S)


class LexError(ValueError):
    """Text that is not made of the tokens above (or a literal with whitespace in it)."""


def lex(source: str) -> list[str]:
    """The tokens of `source`; comments and whitespace dropped."""
    tokens, pos = [], 0
    while pos < len(source):
        space = _SPACE.match(source, pos)
        if space:
            pos = space.end()
            continue
        match = _TOKEN.match(source, pos)
        if not match:
            raise LexError(f"cannot lex {source[pos:pos + 20]!r} at offset {pos}")
        token = match.group()
        if token[0] in "\"'" and re.search(r"\s", token):
            raise LexError(f"literal {token!r} contains whitespace (the code LM's tokens are split on spaces)")
        tokens.append(token)
        pos = match.end()
    return tokens


def join(tokens: list[str]) -> str:
    """The canonical one-line form: tokens joined by single spaces."""
    return " ".join(tokens)


def canonical(source: str) -> str:
    return join(lex(source))


def lines(code: str | list[str]) -> list[list[str]]:
    """The tokens of each source line: a line ends after `;` (outside parentheses, so not inside
    `for ( ; ; )`), after `{`, and `}` is a line of its own."""
    tokens = code.split() if isinstance(code, str) else list(code)
    out: list[list[str]] = []
    line: list[str] = []
    paren = 0
    for tok in tokens:
        if tok == "}":
            if line:
                out.append(line)
                line = []
            out.append(["}"])
            continue
        line.append(tok)
        if tok == "(":
            paren += 1
        elif tok == ")":
            paren = max(0, paren - 1)
        elif tok == "{" or (tok == ";" and paren == 0):
            out.append(line)
            line = []
    if line:
        out.append(line)
    return out


def pretty(code: str | list[str], indent: str = "    ") -> str:
    """Readable source from token text: one line per `lines()` entry, indented by brace depth, no
    space before `;` `,` `)` `]` `.` or after `(` `[` `.` `!`."""
    text, depth = [], 0
    for line in lines(code):
        if line == ["}"]:
            depth = max(0, depth - 1)
        text.append(indent * depth + _glue(line))
        if line[-1] == "{":
            depth += 1
    return "\n".join(text) + "\n"


_NO_SPACE_BEFORE = {";", ",", ")", "]", ".", "++", "--", "["}
_NO_SPACE_AFTER = {"(", "[", ".", "!"}


def _glue(tokens: list[str]) -> str:
    out = ""
    for i, tok in enumerate(tokens):
        if i and tok not in _NO_SPACE_BEFORE and tokens[i - 1] not in _NO_SPACE_AFTER \
                and not (tok == "(" and re.match(r"[A-Za-z_]\w*$", tokens[i - 1]) and tokens[i - 1] not in
                         ("if", "for", "while", "switch", "return", "foreach")):
            out += " "
        out += tok
    return out
