"""The compile-and-test sandbox (lightning_edit/code/sandbox.py, compiler.py): real ldc2, real
processes, limits that really stop a program."""

import sys
import time

import pytest

from lightning_edit.code.compiler import CompilerMissing, Unit, find_ldc2
from lightning_edit.code.sandbox import Limits, Sandbox

GOOD = "int twice ( int x ) { return x * 2 ; }"
TESTS = [{"call": "twice(2)", "expected": "4", "stdout": []}, {"call": "twice(5)", "expected": "11", "stdout": []}]


def test_a_program_that_loops_forever_is_stopped(runner):
    loop = Unit("loop", "int spin ( int x ) { while ( x > 0 ) { x = x + 1 ; if ( x > 10 ) { x = 1 ; } } return x ; }",
                [{"call": "spin(1)", "expected": "1", "stdout": []}])
    start = time.perf_counter()
    good, looping, after = runner.evaluate([Unit("g", GOOD, TESTS), loop, Unit("after", GOOD, TESTS[:1])])
    assert time.perf_counter() - start < 120
    assert looping.compiled and looping.status == "timeout" and looping.tests == [False]
    # the units around it are unaffected: the one before finished, the one after ran in a new batch
    assert good.tests == [True, False] and good.status == "ok"
    assert after.passed


def test_a_program_cannot_write_outside_its_folder(runner, tmp_path):
    target = tmp_path / "escaped.txt"
    writer = Unit("w", f'int leak ( int x ) {{ import std.file ; write ( "{target}" , "x" ) ; return x ; }}',
                  [{"call": "leak(3)", "expected": "3", "stdout": []}])
    inside = Unit("i", 'int keep ( int x ) { import std.file ; write ( "inside.txt" , "x" ) ; return x ; }',
                  [{"call": "keep(3)", "expected": "3", "stdout": []}])
    leak, keep = runner.evaluate([writer, inside])
    assert runner.sandbox.confines_writes, "this kernel has no Landlock: writes outside the folder are not stopped"
    assert not target.exists()
    assert leak.compiled and leak.tests == [False]  # std.file.write threw (EACCES), the test caught it
    assert keep.passed  # writing inside its own folder is allowed


def test_the_sandbox_confines_any_child_and_kills_on_timeout(tmp_path):
    sandbox = Sandbox(filesystem="landlock")
    outside = tmp_path / "outside"
    outside.mkdir()
    with sandbox.folder() as folder:
        res = sandbox.run([sys.executable, "-c", f"open({str(outside / 'f.txt')!r}, 'w').write('x')"], folder)
        assert res.returncode != 0 and "Permission denied" in res.stderr
        assert not (outside / "f.txt").exists()
        res = sandbox.run([sys.executable, "-c", f"import os; os.rmdir({str(outside)!r})"], folder)
        assert res.returncode != 0 and outside.is_dir()
        res = sandbox.run([sys.executable, "-c", "open('ok.txt', 'w').write('x'); print(open('ok.txt').read())"], folder)
        assert res.returncode == 0 and res.stdout.strip() == "x"
        res = sandbox.run(["sleep", "30"], folder, Limits(wall_seconds=1.0))
        assert res.timed_out and res.seconds < 20


def test_compile_errors_are_attributed_to_their_program(runner):
    bad = Unit("b", "int f ( String s ) { return 1 ; }", [{"call": 'f("x")', "expected": "1", "stdout": []}])
    broken_parse = Unit("p", "void g ( int x ) { System . out . println ( x ) ; }",
                        [{"call": "g(1)", "expected": None, "stdout": ["1"]}])
    printer = Unit("q", "void h ( int x ) { import std . stdio ; writeln ( x + 1 ) ; }",
                   [{"call": "h(1)", "expected": None, "stdout": ["2"]}, {"call": "h(1)", "expected": None, "stdout": ["3"]}])
    good, b, p, q = runner.evaluate([Unit("g", GOOD, TESTS), bad, broken_parse, printer])
    assert good.compiled and good.tests == [True, False]
    assert b.status == "compile_error" and "undefined identifier `String`" in b.errors[0]
    assert p.status == "compile_error" and "not `out`" in p.errors[0]
    assert q.passed is False and q.tests == [True, False] and q.stdout == [["2"], ["2"]]


def test_results_are_cached_by_source(runner):
    unit = Unit("c", "int thrice ( int x ) { return x * 3 ; }", [{"call": "thrice(2)", "expected": "6", "stdout": []}])
    first = runner.evaluate([unit])[0]
    calls = runner.stats["compiler_calls"]
    again = runner.evaluate([unit])[0]
    assert again == first and runner.stats["compiler_calls"] == calls


def test_no_compiler_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("LDC2", raising=False)
    with pytest.raises(CompilerMissing, match="apt-get install -y ldc"):
        find_ldc2()
