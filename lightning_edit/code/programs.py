"""The code world's programs: small Java functions from templates, each with its D translation and
unit tests.

Every template writes one function three ways from the same random slots (names, constants, test
inputs): `java` (the source), `d` (the correct D reference) and `dtrain` (the D the code LM is trained
on). `dtrain` equals `d` except for the **controlled systematic mistakes** (`MISTAKES`), which the
trained LM then reproduces as real D compiler errors:

| mistake | Java | D reference | training D | ldc2 says |
| --- | --- | --- | --- | --- |
| `length_int` | `int n = s.length();` | `int n = cast(int) s.length;` | `int n = s.length;` | cannot implicitly convert ... `ulong` to `int` |
| `string_type` | `String s` (a parameter) | `string s` | `String s` | undefined identifier `String` |
| `println` | `System.out.println(x);` | `writeln(x);` | `System.out.println(x);` | identifier expected following `.`, not `out` |
| `bool_type` | `boolean ok = ...;` (a local) | `bool ok = ...;` | `boolean ok = ...;` | undefined identifier `boolean` |

Each mistake is confined to one syntactic context (a bare length into an `int` local, a parameter's
type, a call with an argument, a local's type), so the same tokens appear correctly elsewhere in
training (`string` return types and locals, `bool` return types, `writeln()`, `cast(int)` in
`int h = cast(int) s.length / 2;`). A world makes each mistake in a share `mistake_rate` of the
programs that have the idiom (0.8: the LM's greedy translation makes it, and it has also seen the
correct form in that very context, so it can go on writing good D after an edit corrects it).

Expected test results come from each template's Python model of the function (`Program.tests`);
the world build checks every exported D reference against them with the real compiler.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

from .lexer import canonical

LANGS = ("java", "d", "dtrain")
MISTAKES = ("length_int", "string_type", "println", "bool_type")
CATEGORIES = ("string", "array", "loop", "arithmetic", "conversion")


@dataclass
class TestCase:
    """One unit test: call the function with `args`; compare its result with `expected` (None for a
    void function) and what it printed with `stdout` (lines)."""

    args: list[Any]
    expected: Any = None
    stdout: list[str] = field(default_factory=list)

    def to_json(self, fn: str) -> dict:
        return {"call": f"{fn}({', '.join(d_literal(a) for a in self.args)})",
                "expected": None if self.expected is None else d_literal(self.expected),
                "stdout": list(self.stdout)}


@dataclass
class Program:
    """One generated program: the same function in Java, correct D, and training D."""

    template: str
    category: str
    fn: str
    java: str
    """Canonical token text (tokens joined by single spaces), a whole `public class Main { ... }`."""
    d: str
    """The correct D translation, canonical token text (imports + the function)."""
    dtrain: str
    """The D the LM is trained on: `d` with this program's systematic mistakes."""
    tests: list[TestCase]
    mistakes: list[str]
    """The systematic mistakes in `dtrain`, in source order."""
    returns: str
    """D return type ("void" for printing functions)."""

    @property
    def key(self) -> str:
        return self.java


def d_literal(value: Any) -> str:
    """`value` as a D (and Java) literal: int, bool, str (no whitespace), one-char str as a char via
    `Char`, list of ints."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Char):
        return f"'{value.c}'"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(d_literal(v) for v in value) + "]"
    raise TypeError(f"no D literal for {value!r}")


@dataclass(frozen=True)
class Char:
    """A character argument (a Python str is a string argument)."""

    c: str


# --- slots ------------------------------------------------------------------------------------------

STR_NAMES = ("s", "str", "text", "word", "line", "name", "msg")
ARR_NAMES = ("a", "arr", "nums", "values", "xs", "data", "items")
INT_NAMES = ("n", "x", "m", "num", "v", "p", "q")
COUNTERS = ("k", "count", "total", "acc", "res", "c", "sum")
LOOPS = ("i", "j", "idx")
LEN_NAMES = ("n", "len", "size", "cnt", "lim")
WORDS = ("apple", "banana", "level", "rotor", "kayak", "hello", "world", "stats", "civic", "radar", "lemon",
         "melon", "data", "noon", "abba", "zebra", "queue", "tree", "moon", "book", "java", "dlang", "mississippi")
LETTERS = "aeilnorstu"
_NAME_POOLS = (STR_NAMES, ARR_NAMES, INT_NAMES, COUNTERS, LOOPS, LEN_NAMES)
"""The pools a world's `pool` size cuts (fewer names: each seen more often by a tiny LM)."""


# --- the idioms, one function per translation rule (lang: "java" | "d" | "dtrain") -------------------


class Lang(str):
    """A language name ("java", "d", "dtrain") carrying which mistakes a training translation makes."""

    def __new__(cls, name: str, mistakes: frozenset[str] = frozenset()):
        out = super().__new__(cls, name)
        out.mistakes = frozenset(mistakes)
        return out


def _mistaken(lang: str, mistake: str) -> bool:
    return lang == "dtrain" and mistake in getattr(lang, "mistakes", MISTAKES)


def str_type(lang: str, pos: str) -> str:
    """Java `String`; D `string`; training D keeps `String` for parameters (mistake string_type)."""
    if lang == "java":
        return "String"
    return "String" if _mistaken(lang, "string_type") and pos == "param" else "string"


def bool_type(lang: str, pos: str) -> str:
    """Java `boolean`; D `bool`; training D keeps `boolean` for locals (mistake bool_type)."""
    if lang == "java":
        return "boolean"
    return "boolean" if _mistaken(lang, "bool_type") and pos == "local" else "bool"


def len_decl(lang: str, name: str, of: str, string: bool) -> str:
    """`int n = s.length();`: D needs a cast (length is size_t); training D omits it (length_int)."""
    if lang == "java":
        return f"int {name} = {of}.length{'()' if string else ''};"
    if _mistaken(lang, "length_int"):
        return f"int {name} = {of}.length;"
    return f"int {name} = cast(int) {of}.length;"


def println(lang: str, expr: str) -> str:
    """`System.out.println(x);` -> `writeln(x);`; training D copies the Java call (println)."""
    if lang == "java" or (_mistaken(lang, "println") and expr):
        return f"System.out.println({expr});"
    return f"writeln({expr});"


def length(lang: str, of: str, string: bool = True) -> str:
    """A length inside an expression (never a mistake): `s.length()` -> `s.length`."""
    return f"{of}.length{'()' if string and lang == 'java' else ''}"


def char_at(lang: str, s: str, i: str) -> str:
    return f"{s}.charAt({i})" if lang == "java" else f"{s}[{i}]"


def concat(lang: str) -> str:
    """String concatenation: Java `+`, D `~`."""
    return "+" if lang == "java" else "~"


def header(lang: str) -> str:
    return "public static " if lang == "java" else ""


# --- templates ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    name: str
    category: str
    names: tuple[str, ...]
    """Function names (one drawn per program)."""
    imports: tuple[str, ...]
    """D modules the translation imports."""
    build: Callable[[random.Random], tuple[dict, Callable[[str, dict], str], list[TestCase]]]
    """rng -> (slots, body(lang, slots) -> the function's source, tests)."""
    returns: str = "int"


TEMPLATES: list[Template] = []


def template(name: str, category: str, names: tuple[str, ...], imports: tuple[str, ...] = (), returns: str = "int"):
    def register(build):
        TEMPLATES.append(Template(name, category, names, imports, build, returns))
        return build
    return register


class SlotRandom(random.Random):
    """The templates' random source; `pool` names per slot pool are used (all when None)."""

    def __init__(self, seed, pool: int | None = None):
        super().__init__(seed)
        self.pool = pool


def _pick(rng: random.Random, pool, k: int = 1, exclude=()) -> Any:
    size = getattr(rng, "pool", None)
    if size is not None and len(pool) > 0 and isinstance(pool[0], str) and pool in _NAME_POOLS:
        pool = pool[:max(size, k + len(exclude))]
    choices = [p for p in pool if p not in exclude]
    picked = rng.sample(choices, k)
    return picked[0] if k == 1 else picked


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _ints(rng: random.Random, lo: int = -9, hi: int = 20, n: int | None = None) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n or rng.randint(2, 6))]


# String ------------------------------------------------------------------------------------------------

@template("count_char", "string", ("countChar", "occurrences", "charCount"))
def _count_char(rng):
    v = {"s": _pick(rng, STR_NAMES), "c": "c", "n": _pick(rng, LEN_NAMES), "k": _pick(rng, COUNTERS, exclude=("c",)),
         "i": _pick(rng, LOOPS)}

    def body(lang, v):
        return (f"int {{fn}}({str_type(lang, 'param')} {v['s']}, char {v['c']}) {{ {len_decl(lang, v['n'], v['s'], True)} "
                f"int {v['k']} = 0; for (int {v['i']} = 0; {v['i']} < {v['n']}; {v['i']}++) {{ "
                f"if ({char_at(lang, v['s'], v['i'])} == {v['c']}) {{ {v['k']}++; }} }} return {v['k']}; }}")
    tests = []
    for _ in range(3):
        w, c = _word(rng), rng.choice(LETTERS)
        tests.append(TestCase([w, Char(c)], w.count(c)))
    return v, body, tests


@template("reverse", "string", ("reverse", "reversed", "backwards"), returns="string")
def _reverse(rng):
    v = {"s": _pick(rng, STR_NAMES), "r": _pick(rng, ("r", "buf", "rev", "acc")), "i": _pick(rng, LOOPS)}

    def body(lang, v):
        i = v["i"]
        start = length(lang, v["s"]) if lang == "java" else f"cast(int) {v['s']}.length"
        return (f"{str_type(lang, 'return')} {{fn}}({str_type(lang, 'param')} {v['s']}) {{ "
                f"{str_type(lang, 'local')} {v['r']} = \"\"; for (int {i} = {start} - 1; {i} >= 0; {i}--) "
                f"{{ {v['r']} = {v['r']} {concat(lang)} {char_at(lang, v['s'], i)}; }} return {v['r']}; }}")
    return v, body, [TestCase([w], w[::-1]) for w in rng.sample(WORDS, 3)]


@template("count_vowels", "string", ("countVowels", "vowels", "vowelCount"))
def _count_vowels(rng):
    v = {"s": _pick(rng, STR_NAMES), "k": _pick(rng, COUNTERS, exclude=("c",)), "i": _pick(rng, LOOPS)}

    def body(lang, v):
        i = v["i"]
        cond = " || ".join(f"ch == '{x}'" for x in "aeiou")
        return (f"int {{fn}}({str_type(lang, 'param')} {v['s']}) {{ int {v['k']} = 0; "
                f"for (int {i} = 0; {i} < {length(lang, v['s'])}; {i}++) {{ char ch = {char_at(lang, v['s'], i)}; "
                f"if ({cond}) {{ {v['k']} = {v['k']} + 1; }} }} return {v['k']}; }}")
    return v, body, [TestCase([w], sum(ch in "aeiou" for ch in w)) for w in rng.sample(WORDS, 3)]


@template("is_palindrome", "string", ("isPalindrome", "palindrome", "symmetric"), returns="bool")
def _is_palindrome(rng):
    v = {"s": _pick(rng, STR_NAMES), "n": _pick(rng, LEN_NAMES), "ok": _pick(rng, ("ok", "same", "good", "flag")),
         "i": _pick(rng, LOOPS)}

    def body(lang, v):
        s, n, i = v["s"], v["n"], v["i"]
        return (f"{bool_type(lang, 'return')} {{fn}}({str_type(lang, 'param')} {s}) {{ {len_decl(lang, n, s, True)} "
                f"{bool_type(lang, 'local')} {v['ok']} = true; for (int {i} = 0; {i} < {n} / 2; {i}++) {{ "
                f"if ({char_at(lang, s, i)} != {char_at(lang, s, f'{n} - 1 - {i}')}) {{ {v['ok']} = false; }} }} "
                f"return {v['ok']}; }}")
    return v, body, [TestCase([w], w == w[::-1]) for w in rng.sample(WORDS, 3)]


@template("repeat", "string", ("repeat", "times", "replicate"), returns="string")
def _repeat(rng):
    v = {"s": _pick(rng, STR_NAMES), "k": _pick(rng, ("k", "times", "reps")), "r": _pick(rng, ("r", "buf", "acc")),
         "i": _pick(rng, LOOPS)}

    def body(lang, v):
        op = "+=" if lang == "java" else "~="
        return (f"{str_type(lang, 'return')} {{fn}}({str_type(lang, 'param')} {v['s']}, int {v['k']}) {{ "
                f"{str_type(lang, 'local')} {v['r']} = \"\"; for (int {v['i']} = 0; {v['i']} < {v['k']}; {v['i']}++) "
                f"{{ {v['r']} {op} {v['s']}; }} return {v['r']}; }}")
    tests = []
    for _ in range(3):
        w, k = _word(rng), rng.randint(0, 3)
        tests.append(TestCase([w, k], w * k))
    return v, body, tests


@template("shout", "string", ("shout", "loud", "upper"), imports=("std.string",), returns="string")
def _shout(rng):
    v = {"s": _pick(rng, STR_NAMES), "mark": rng.choice(("!", "?", "!!"))}

    def body(lang, v):
        up = f"{v['s']}.toUpperCase()" if lang == "java" else f"{v['s']}.toUpper()"
        return (f"{str_type(lang, 'return')} {{fn}}({str_type(lang, 'param')} {v['s']}) {{ "
                f"return {up} {concat(lang)} \"{v['mark']}\"; }}")
    return v, body, [TestCase([w], w.upper() + v["mark"]) for w in rng.sample(WORDS, 3)]


@template("first_index", "string", ("firstIndex", "find", "position"), imports=("std.string",))
def _first_index(rng):
    v = {"s": _pick(rng, STR_NAMES), "p": _pick(rng, ("p", "pos", "at", "where"))}

    def body(lang, v):
        call = f"{v['s']}.indexOf(c)"
        rhs = call if lang == "java" else f"cast(int) {call}"
        return (f"int {{fn}}({str_type(lang, 'param')} {v['s']}, char c) {{ int {v['p']} = {rhs}; "
                f"return {v['p']}; }}")
    tests = []
    for _ in range(3):
        w, c = _word(rng), rng.choice(LETTERS)
        tests.append(TestCase([w, Char(c)], w.find(c)))
    return v, body, tests


@template("first_half", "string", ("firstHalf", "half", "prefix"), returns="string")
def _first_half(rng):
    v = {"s": _pick(rng, STR_NAMES), "h": _pick(rng, ("h", "mid", "cut"))}

    def body(lang, v):
        s, h = v["s"], v["h"]
        decl = f"int {h} = {length(lang, s)} / 2;" if lang == "java" else f"int {h} = cast(int) {s}.length / 2;"
        sub = f"{s}.substring(0, {h})" if lang == "java" else f"{s}[0 .. {h}]"
        return f"{str_type(lang, 'return')} {{fn}}({str_type(lang, 'param')} {s}) {{ {decl} return {sub}; }}"
    return v, body, [TestCase([w], w[: len(w) // 2]) for w in rng.sample(WORDS, 3)]


@template("same_text", "string", ("sameText", "equal", "matches"), returns="bool")
def _same_text(rng):
    a, b = _pick(rng, STR_NAMES, 2)
    v = {"a": a, "b": b}

    def body(lang, v):
        eq = f"{v['a']}.equals({v['b']})" if lang == "java" else f"{v['a']} == {v['b']}"
        return (f"{bool_type(lang, 'return')} {{fn}}({str_type(lang, 'param')} {v['a']}, "
                f"{str_type(lang, 'param')} {v['b']}) {{ return {eq}; }}")
    tests = []
    for _ in range(3):
        x = _word(rng)
        y = x if rng.random() < 0.5 else _word(rng)
        tests.append(TestCase([x, y], x == y))
    return v, body, tests


# Array --------------------------------------------------------------------------------------------------

@template("sum", "array", ("sum", "total", "addAll"))
def _sum(rng):
    v = {"a": _pick(rng, ARR_NAMES), "t": _pick(rng, COUNTERS), "n": _pick(rng, LEN_NAMES), "i": _pick(rng, LOOPS)}

    def body(lang, v):
        a, i = v["a"], v["i"]
        return (f"int {{fn}}(int[] {a}) {{ {len_decl(lang, v['n'], a, False)} int {v['t']} = 0; "
                f"for (int {i} = 0; {i} < {v['n']}; {i}++) {{ {v['t']} += {a}[{i}]; }} return {v['t']}; }}")
    return v, body, [TestCase([xs], sum(xs)) for xs in (_ints(rng) for _ in range(3))]


@template("max_value", "array", ("maxValue", "largest", "biggest"))
def _max_value(rng):
    v = {"a": _pick(rng, ARR_NAMES), "m": _pick(rng, ("m", "best", "top")), "i": _pick(rng, LOOPS)}

    def body(lang, v):
        a, m, i = v["a"], v["m"], v["i"]
        return (f"int {{fn}}(int[] {a}) {{ int {m} = {a}[0]; for (int {i} = 1; {i} < {length(lang, a, False)}; {i}++) "
                f"{{ if ({a}[{i}] >= {m}) {{ {m} = {a}[{i}]; }} }} return {m}; }}")
    return v, body, [TestCase([xs], max(xs)) for xs in (_ints(rng) for _ in range(3))]


@template("count_even", "array", ("countEven", "evens", "evenCount"))
def _count_even(rng):
    v = {"a": _pick(rng, ARR_NAMES), "k": _pick(rng, COUNTERS), "n": _pick(rng, LEN_NAMES), "i": _pick(rng, LOOPS),
         "d": rng.choice((2, 3, 5))}

    def body(lang, v):
        a, i, k = v["a"], v["i"], v["k"]
        return (f"int {{fn}}(int[] {a}) {{ {len_decl(lang, v['n'], a, False)} int {k} = 0; "
                f"for (int {i} = 0; {i} < {v['n']}; {i}++) {{ if ({a}[{i}] % {v['d']} == 0) {{ {k}++; }} }} "
                f"return {k}; }}")
    tests = []
    for _ in range(3):
        xs = _ints(rng, 0, 30)
        tests.append(TestCase([xs], sum(x % v["d"] == 0 for x in xs)))
    return v, body, tests


@template("contains", "array", ("contains", "hasValue", "includes"), returns="bool")
def _contains(rng):
    v = {"a": _pick(rng, ARR_NAMES), "x": _pick(rng, INT_NAMES, exclude=("n",)), "f": _pick(rng, ("found", "seen", "hit")),
         "n": _pick(rng, LEN_NAMES), "i": _pick(rng, LOOPS)}

    def body(lang, v):
        a, i = v["a"], v["i"]
        return (f"{bool_type(lang, 'return')} {{fn}}(int[] {a}, int {v['x']}) {{ {len_decl(lang, v['n'], a, False)} "
                f"{bool_type(lang, 'local')} {v['f']} = false; for (int {i} = 0; {i} < {v['n']}; {i}++) "
                f"{{ if ({a}[{i}] == {v['x']}) {{ {v['f']} = true; }} }} return {v['f']}; }}")
    tests = []
    for _ in range(3):
        xs = _ints(rng)
        x = rng.choice(xs) if rng.random() < 0.5 else rng.randint(21, 40)
        tests.append(TestCase([xs, x], x in xs))
    return v, body, tests


@template("scale", "array", ("scale", "multiplyAll", "stretch"), returns="int[]")
def _scale(rng):
    v = {"a": _pick(rng, ARR_NAMES), "f": _pick(rng, ("f", "factor", "by")), "r": _pick(rng, ("r", "buf", "res")),
         "n": _pick(rng, LEN_NAMES), "i": _pick(rng, LOOPS)}

    def body(lang, v):
        a, r, i, n = v["a"], v["r"], v["i"], v["n"]
        return (f"int[] {{fn}}(int[] {a}, int {v['f']}) {{ {len_decl(lang, n, a, False)} int[] {r} = new int[{n}]; "
                f"for (int {i} = 0; {i} < {n}; {i}++) {{ {r}[{i}] = {a}[{i}] * {v['f']}; }} return {r}; }}")
    tests = []
    for _ in range(3):
        xs, f = _ints(rng), rng.randint(-3, 4)
        tests.append(TestCase([xs, f], [x * f for x in xs]))
    return v, body, tests


@template("count_at_least", "array", ("countAtLeast", "atLeast", "bigOnes"))
def _count_at_least(rng):
    v = {"a": _pick(rng, ARR_NAMES), "x": _pick(rng, INT_NAMES), "k": _pick(rng, COUNTERS), "i": _pick(rng, LOOPS)}

    def body(lang, v):
        a, i, k = v["a"], v["i"], v["k"]
        return (f"int {{fn}}(int[] {a}, int {v['x']}) {{ int {k} = 0; for (int {i} = 0; {i} < {length(lang, a, False)}; "
                f"{i}++) {{ if ({a}[{i}] >= {v['x']}) {{ {k}++; }} }} return {k}; }}")
    tests = []
    for _ in range(3):
        xs, x = _ints(rng), rng.randint(-5, 15)
        tests.append(TestCase([xs, x], sum(y >= x for y in xs)))
    return v, body, tests


@template("product", "array", ("product", "multiply", "prod"), returns="long")
def _product(rng):
    v = {"a": _pick(rng, ARR_NAMES), "p": _pick(rng, ("p", "prod", "acc")), "i": _pick(rng, LOOPS)}

    def body(lang, v):
        a, i, p = v["a"], v["i"], v["p"]
        return (f"long {{fn}}(int[] {a}) {{ long {p} = 1; for (int {i} = 0; {i} < {length(lang, a, False)}; {i}++) "
                f"{{ {p} *= {a}[{i}]; }} return {p}; }}")
    tests = []
    for _ in range(3):
        xs = _ints(rng, -5, 9)
        prod = 1
        for x in xs:
            prod *= x
        tests.append(TestCase([xs], prod))
    return v, body, tests


@template("all_positive", "array", ("allPositive", "positive", "noneNegative"), returns="bool")
def _all_positive(rng):
    v = {"a": _pick(rng, ARR_NAMES), "ok": _pick(rng, ("ok", "good", "flag")), "i": _pick(rng, LOOPS)}

    def body(lang, v):
        a, i, ok = v["a"], v["i"], v["ok"]
        return (f"{bool_type(lang, 'return')} {{fn}}(int[] {a}) {{ {bool_type(lang, 'local')} {ok} = true; "
                f"for (int {i} = 0; {i} < {length(lang, a, False)}; {i}++) {{ if ({a}[{i}] <= 0) {{ {ok} = false; }} }} "
                f"return {ok}; }}")
    tests = []
    for _ in range(3):
        xs = _ints(rng, -2 if rng.random() < 0.5 else 1, 20)
        tests.append(TestCase([xs], all(x > 0 for x in xs)))
    return v, body, tests


# Loop ---------------------------------------------------------------------------------------------------

@template("factorial", "loop", ("factorial", "fact", "permutations"), returns="long")
def _factorial(rng):
    v = {"n": _pick(rng, INT_NAMES), "f": _pick(rng, ("f", "acc", "r")), "i": _pick(rng, LOOPS)}

    def body(lang, v):
        n, f, i = v["n"], v["f"], v["i"]
        return (f"long {{fn}}(int {n}) {{ long {f} = 1; for (int {i} = 2; {i} <= {n}; {i}++) {{ {f} *= {i}; }} "
                f"return {f}; }}")
    tests = []
    for n in rng.sample(range(0, 15), 3):
        f = 1
        for i in range(2, n + 1):
            f *= i
        tests.append(TestCase([n], f))
    return v, body, tests


@template("sum_squares", "loop", ("sumSquares", "squares", "squareSum"))
def _sum_squares(rng):
    v = {"n": _pick(rng, INT_NAMES), "s": _pick(rng, COUNTERS), "i": _pick(rng, LOOPS)}

    def body(lang, v):
        n, s, i = v["n"], v["s"], v["i"]
        return (f"int {{fn}}(int {n}) {{ int {s} = 0; for (int {i} = 1; {i} <= {n}; {i}++) "
                f"{{ {s} = {s} + {i} * {i}; }} return {s}; }}")
    return v, body, [TestCase([n], sum(i * i for i in range(1, n + 1))) for n in rng.sample(range(0, 30), 3)]


@template("digits", "loop", ("digits", "numDigits", "digitCount"))
def _digits(rng):
    v = {"n": _pick(rng, INT_NAMES), "c": _pick(rng, COUNTERS), "b": rng.choice((10, 2, 8))}

    def body(lang, v):
        n, c = v["n"], v["c"]
        return (f"int {{fn}}(int {n}) {{ int {c} = 0; while ({n} > 0) {{ {n} = {n} / {v['b']}; {c}++; }} "
                f"return {c}; }}")
    tests = []
    for n in rng.sample(range(0, 5000), 3):
        m, c = n, 0
        while m > 0:
            m //= v["b"]
            c += 1
        tests.append(TestCase([n], c))
    return v, body, tests


@template("count_down", "loop", ("countDown", "launch", "descend"), imports=("std.stdio",), returns="void")
def _count_down(rng):
    v = {"n": _pick(rng, INT_NAMES), "i": _pick(rng, LOOPS), "lo": rng.choice((0, 1))}

    def body(lang, v):
        n, i = v["n"], v["i"]
        return (f"void {{fn}}(int {n}) {{ for (int {i} = {n}; {i} >= {v['lo']}; {i}--) {{ {println(lang, i)} }} }}")
    return v, body, [TestCase([n], None, [str(i) for i in range(n, v["lo"] - 1, -1)]) for n in rng.sample(range(0, 6), 3)]


@template("print_multiples", "loop", ("printMultiples", "multiples", "showMultiples"), imports=("std.stdio",),
          returns="void")
def _print_multiples(rng):
    v = {"n": _pick(rng, INT_NAMES), "i": _pick(rng, LOOPS), "d": rng.choice((2, 3, 4))}

    def body(lang, v):
        n, i = v["n"], v["i"]
        return (f"void {{fn}}(int {n}) {{ for (int {i} = 1; {i} <= {n}; {i}++) {{ if ({i} % {v['d']} == 0) "
                f"{{ {println(lang, i)} }} }} }}")
    return v, body, [TestCase([n], None, [str(i) for i in range(1, n + 1) if i % v["d"] == 0])
                     for n in rng.sample(range(0, 12), 3)]


@template("print_word", "loop", ("printWord", "echo", "say"), imports=("std.stdio",), returns="void")
def _print_word(rng):
    v = {"s": _pick(rng, STR_NAMES), "k": _pick(rng, ("k", "times", "reps")), "i": _pick(rng, LOOPS)}

    def body(lang, v):
        return (f"void {{fn}}({str_type(lang, 'param')} {v['s']}, int {v['k']}) {{ for (int {v['i']} = 0; "
                f"{v['i']} < {v['k']}; {v['i']}++) {{ {println(lang, v['s'])} }} {println(lang, '')} }}")
    tests = []
    for _ in range(3):
        w, k = _word(rng), rng.randint(0, 3)
        tests.append(TestCase([w, k], None, [w] * k + [""]))
    return v, body, tests


# Arithmetic ---------------------------------------------------------------------------------------------

@template("gcd", "arithmetic", ("gcd", "commonDivisor", "hcf"))
def _gcd(rng):
    a, b = _pick(rng, INT_NAMES, 2)
    v = {"a": a, "b": b, "t": _pick(rng, ("t", "tmp", "r"))}

    def body(lang, v):
        a, b, t = v["a"], v["b"], v["t"]
        return (f"int {{fn}}(int {a}, int {b}) {{ while ({b} != 0) {{ int {t} = {b}; {b} = {a} % {b}; {a} = {t}; }} "
                f"return {a}; }}")
    import math
    tests = []
    for _ in range(3):
        x, y = rng.randint(1, 200), rng.randint(1, 200)
        tests.append(TestCase([x, y], math.gcd(x, y)))
    return v, body, tests


@template("low_bits", "arithmetic", ("lowBits", "maskBits", "keepLow"))
def _low_bits(rng):
    v = {"x": _pick(rng, INT_NAMES), "k": _pick(rng, ("k", "bits", "w")), "mask": _pick(rng, ("mask", "m2", "lowmask"))}

    def body(lang, v):
        return (f"int {{fn}}(int {v['x']}, int {v['k']}) {{ int {v['mask']} = (1 << {v['k']}) - 1; "
                f"return {v['x']} & {v['mask']}; }}")
    tests = []
    for _ in range(3):
        x, k = rng.randint(0, 1000), rng.randint(1, 8)
        tests.append(TestCase([x, k], x & ((1 << k) - 1)))
    return v, body, tests


@template("is_even", "arithmetic", ("isEven", "even", "evenNumber"), returns="bool")
def _is_even(rng):
    v = {"n": _pick(rng, INT_NAMES)}

    def body(lang, v):
        return f"{bool_type(lang, 'return')} {{fn}}(int {v['n']}) {{ return ({v['n']} & 1) == 0; }}"
    return v, body, [TestCase([n], n % 2 == 0) for n in rng.sample(range(0, 100), 3)]


@template("power", "arithmetic", ("power", "pow", "raise"), returns="long")
def _power(rng):
    b, e = _pick(rng, INT_NAMES, 2)
    v = {"b": b, "e": e, "r": _pick(rng, ("r", "acc", "res")), "i": _pick(rng, LOOPS)}

    def body(lang, v):
        b, e, r, i = v["b"], v["e"], v["r"], v["i"]
        return (f"long {{fn}}(int {b}, int {e}) {{ long {r} = 1; for (int {i} = 0; {i} < {e}; {i}++) {{ {r} *= {b}; }} "
                f"return {r}; }}")
    tests = []
    for _ in range(3):
        x, y = rng.randint(-4, 9), rng.randint(0, 9)
        tests.append(TestCase([x, y], x ** y))
    return v, body, tests


@template("abs_diff", "arithmetic", ("absDiff", "distance", "gap"), imports=("std.math",))
def _abs_diff(rng):
    a, b = _pick(rng, INT_NAMES, 2)
    v = {"a": a, "b": b}

    def body(lang, v):
        f = "Math.abs" if lang == "java" else "abs"
        return f"int {{fn}}(int {v['a']}, int {v['b']}) {{ return {f}({v['a']} - {v['b']}); }}"
    tests = []
    for _ in range(3):
        x, y = rng.randint(-50, 50), rng.randint(-50, 50)
        tests.append(TestCase([x, y], abs(x - y)))
    return v, body, tests


@template("clamp", "arithmetic", ("clamp", "bound", "limit"), imports=("std.algorithm",))
def _clamp(rng):
    v = {"x": _pick(rng, INT_NAMES), "lo": rng.randint(-5, 5), "hi": rng.randint(10, 30)}

    def body(lang, v):
        mx, mn = ("Math.max", "Math.min") if lang == "java" else ("max", "min")
        return f"int {{fn}}(int {v['x']}) {{ return {mx}({v['lo']}, {mn}({v['x']}, {v['hi']})); }}"
    return v, body, [TestCase([x], max(v["lo"], min(x, v["hi"]))) for x in rng.sample(range(-20, 50), 3)]


@template("mix_bits", "arithmetic", ("mixBits", "scramble", "xorMask"))
def _mix_bits(rng):
    a, b = _pick(rng, INT_NAMES, 2)
    v = {"a": a, "b": b, "c": _pick(rng, ("c", "t", "h")), "m": rng.choice((15, 63, 255))}

    def body(lang, v):
        return (f"int {{fn}}(int {v['a']}, int {v['b']}) {{ int {v['c']} = {v['a']} ^ {v['b']}; "
                f"return {v['c']} & {v['m']}; }}")
    tests = []
    for _ in range(3):
        x, y = rng.randint(0, 1000), rng.randint(0, 1000)
        tests.append(TestCase([x, y], (x ^ y) & v["m"]))
    return v, body, tests


@template("mod_sum", "arithmetic", ("modSum", "wrapAdd", "clockAdd"))
def _mod_sum(rng):
    a, b = _pick(rng, INT_NAMES, 2)
    v = {"a": a, "b": b, "m": rng.choice((7, 12, 24, 60))}

    def body(lang, v):
        return f"int {{fn}}(int {v['a']}, int {v['b']}) {{ int r = ({v['a']} + {v['b']}) % {v['m']}; return r; }}"
    tests = []
    for _ in range(3):
        x, y = rng.randint(0, 100), rng.randint(0, 100)
        tests.append(TestCase([x, y], (x + y) % v["m"]))
    return v, body, tests


# Conversion ---------------------------------------------------------------------------------------------

@template("parse_add", "conversion", ("parseAdd", "addParsed", "readPlus"), imports=("std.conv",))
def _parse_add(rng):
    v = {"s": _pick(rng, STR_NAMES), "k": rng.randint(1, 9), "val": _pick(rng, ("val", "num", "parsed"))}

    def body(lang, v):
        parse = f"Integer.parseInt({v['s']})" if lang == "java" else f"to!int({v['s']})"
        return (f"int {{fn}}({str_type(lang, 'param')} {v['s']}) {{ int {v['val']} = {parse}; "
                f"return {v['val']} + {v['k']}; }}")
    return v, body, [TestCase([str(n)], n + v["k"]) for n in rng.sample(range(0, 999), 3)]


@template("num_length", "conversion", ("numLength", "width", "digitsOf"), imports=("std.conv",))
def _num_length(rng):
    v = {"n": _pick(rng, INT_NAMES), "t": _pick(rng, ("t", "txt", "repr"))}

    def body(lang, v):
        n, t = v["n"], v["t"]
        conv = f"String.valueOf({n})" if lang == "java" else f"to!string({n})"
        ret = f"{t}.length()" if lang == "java" else f"cast(int) {t}.length"
        return f"int {{fn}}(int {n}) {{ {str_type(lang, 'local')} {t} = {conv}; return {ret}; }}"
    return v, body, [TestCase([n], len(str(n))) for n in rng.sample(range(-999, 99999), 3)]


@template("scale_half", "conversion", ("scaleHalf", "stretchBy", "growBy"))
def _scale_half(rng):
    v = {"x": _pick(rng, INT_NAMES), "f": rng.choice(("1.5", "2.5", "0.5")), "d": _pick(rng, ("d", "y", "z"))}

    def body(lang, v):
        cast = f"(int) {v['d']}" if lang == "java" else f"cast(int) {v['d']}"
        return f"int {{fn}}(int {v['x']}) {{ double {v['d']} = {v['x']} * {v['f']}; return {cast}; }}"
    return v, body, [TestCase([x], int(x * float(v["f"]))) for x in rng.sample(range(0, 100), 3)]


@template("digit_value", "conversion", ("digitValue", "toDigit", "charValue"))
def _digit_value(rng):
    v = {"c": _pick(rng, ("c", "ch", "d")), "k": rng.randint(0, 20)}

    def body(lang, v):
        return f"int {{fn}}(char {v['c']}) {{ return {v['c']} - '0' + {v['k']}; }}"
    return v, body, [TestCase([Char(c)], int(c) + v["k"]) for c in rng.sample("0123456789", 3)]


@template("print_double", "conversion", ("printDouble", "showTwice", "doubled"), imports=("std.stdio", "std.conv"),
          returns="void")
def _print_double(rng):
    v = {"s": _pick(rng, STR_NAMES), "val": _pick(rng, ("val", "num", "parsed"))}

    def body(lang, v):
        parse = f"Integer.parseInt({v['s']})" if lang == "java" else f"to!int({v['s']})"
        return (f"void {{fn}}({str_type(lang, 'param')} {v['s']}) {{ int {v['val']} = {parse}; "
                f"{println(lang, v['val'] + ' * 2')} }}")
    return v, body, [TestCase([str(n)], None, [str(2 * n)]) for n in rng.sample(range(0, 999), 3)]


@template("is_big_text", "conversion", ("isBigText", "bigText", "sizeWord"), imports=("std.conv",), returns="string")
def _is_big_text(rng):
    v = {"n": _pick(rng, INT_NAMES), "b": _pick(rng, ("big", "large", "over")), "t": rng.randint(5, 50)}

    def body(lang, v):
        conv = f"String.valueOf({v['b']})" if lang == "java" else f"to!string({v['b']})"
        return (f"{str_type(lang, 'return')} {{fn}}(int {v['n']}) {{ {bool_type(lang, 'local')} {v['b']} = "
                f"{v['n']} > {v['t']}; return {conv}; }}")
    return v, body, [TestCase([n], "true" if n > v["t"] else "false") for n in rng.sample(range(0, 100), 3)]


TEMPLATE_NAMES = tuple(t.name for t in TEMPLATES)


# --- making programs ----------------------------------------------------------------------------------


def make_program(tpl: Template, rng: random.Random, mistake_rate: float = 1.0) -> Program:
    """One program of `tpl`; its training D makes each systematic mistake with probability
    `mistake_rate` (all of a kind or none, per program)."""
    slots, body, tests = tpl.build(rng)
    fn = rng.choice(tpl.names)
    active = frozenset(m for m in MISTAKES if rng.random() < mistake_rate)
    java = canonical(f"public class Main {{ {header('java')}{body('java', slots).replace('{fn}', fn)} }}")
    sources = {}
    for lang in (Lang("d"), Lang("dtrain", active)):
        imports = " ".join(f"import {m};" for m in sorted(tpl.imports))
        sources[str(lang)] = canonical(f"{imports} {body(lang, slots).replace('{fn}', fn)}")
    mistakes = _mistakes_in(tpl, slots, body, active)
    return Program(template=tpl.name, category=tpl.category, fn=fn, java=java, d=sources["d"],
                   dtrain=sources["dtrain"], tests=tests, mistakes=mistakes, returns=tpl.returns)


def _mistakes_in(tpl: Template, slots: dict, body, active: frozenset[str]) -> list[str]:
    """Which systematic mistakes the training D carries, in source order."""
    tokens = canonical(body(Lang("dtrain", active), slots)).split()
    first: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        name = {"String": "string_type", "boolean": "bool_type", "System": "println"}.get(tok)
        if name is None and tok == "int" and tokens[i + 2:i + 3] == ["="] and tokens[i + 4:i + 7] == [".", "length", ";"]:
            name = "length_int"
        if name is not None:
            first.setdefault(name, i)
    return sorted(first, key=first.get)


def generate_programs(n: int, seed: int, salt: str, exclude: set[str] | None = None,
                      pool: int | None = None, mistake_rate: float = 1.0) -> list[Program]:
    """`n` distinct programs (by Java text) from `seed` and `salt` (different salts give different
    streams), none whose Java is in `exclude`. Templates take turns; one whose slots are used up
    (50 duplicates in a row) leaves the rotation."""
    rng = SlotRandom(f"programs:{salt}:{seed}", pool)
    seen = set(exclude or ())
    out: list[Program] = []
    active = list(TEMPLATES)
    misses = {t.name: 0 for t in TEMPLATES}
    turn = 0
    while len(out) < n:
        if not active:
            raise RuntimeError(f"the templates hold only {len(out)} distinct programs beyond those excluded; asked {n}")
        tpl = active[turn % len(active)]
        prog = make_program(tpl, rng, mistake_rate)
        if prog.java in seen:
            misses[tpl.name] += 1
            if misses[tpl.name] >= 50:
                active.remove(tpl)
            continue
        misses[tpl.name] = 0
        turn += 1
        seen.add(prog.java)
        out.append(prog)
    return out


def d_test_module(prog_module: str, test_module: str, tests: list[dict]) -> str:
    """A D module that runs `tests` (`TestCase.to_json` dicts: call, expected, stdout) against module
    `prog_module`, printing `@@case <i>`, the function's own output, then `@@pass`, `@@fail` or
    `@@error` per test (exceptions and failed asserts caught, output flushed at every marker)."""
    lines = [f"module {test_module};", "import std.stdio;", f"import {prog_module};", "void run() {"]
    for i, t in enumerate(tests):
        call = t["call"]
        check = "true" if t.get("expected") is None else f"({call} == {t['expected']})"
        stmt = f"{call};" if t.get("expected") is None else ""
        lines.append(f'    writeln("@@case {i}"); stdout.flush();')
        lines.append(f"    try {{ {stmt} bool ok = {check}; stdout.flush(); writeln(ok ? \"@@pass\" : \"@@fail\"); }}")
        lines.append('    catch (Throwable e) { stdout.flush(); writeln("@@error"); }')
        lines.append("    stdout.flush();")
    lines.append("}")
    return "\n".join(lines) + "\n"


def d_unittest(tests: list[dict]) -> str:
    """The tests as a D `unittest` block (return values; printed output is in the JSON `stdout`)."""
    asserts = [f"    assert({t['call']} == {t['expected']});" if t.get("expected") is not None
               else f"    {t['call']};  // prints {t['stdout']!r}" for t in tests]
    return "unittest {\n" + "\n".join(asserts) + "\n}\n"
