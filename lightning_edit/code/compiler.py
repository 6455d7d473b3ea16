"""Compiling D translations with LDC and running their unit tests, in the sandbox, in batches, cached.

`DRunner.evaluate(units)` takes translations (D source) with their tests and returns, per unit,
whether it compiled (and the compiler's error lines), and per test whether it passed. The work is
batched so that 600 programs cost seconds, not minutes, and stays exact:

1. **check**: `ldc2 -o- -verrors=0` over the batch's modules (each translation `prog_<i>.d` and its
   test module `test_<i>.d`). Errors name their file, so they are attributed to their unit. Since a
   parse error in one module can stop the semantic analysis of others, the units without errors are
   checked again until a pass reports no error at all: a unit counts as compiling only after a
   clean pass.
2. **run**: the compiling units are linked into one executable whose `main` runs each unit's tests
   in turn, printing markers (`@@unit i`, `@@case j`, `@@pass|@@fail|@@error`, flushed). If the
   process dies (a crash, a timeout, an endless loop, too much output), the markers say which unit
   was running: it is recorded as crashed or timed out with the tests it finished, and the units after
   it run again in a new batch.

Results are cached on disk by (compiler version, source, tests), so re-evaluating after an edit only
compiles the translations that changed. Nothing runs in-process; see `sandbox.py` for the limits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from .lexer import pretty
from .programs import d_test_module
from .sandbox import Limits, Sandbox

INSTALL_HINT = "install LDC, the LLVM D compiler (Debian/Ubuntu: apt-get install -y ldc; other systems: " \
               "https://github.com/ldc-developers/ldc/releases) so that ldc2 is on PATH"


class CompilerMissing(RuntimeError):
    """No `ldc2` on PATH."""


def find_ldc2(path: str | None = None) -> str:
    """The ldc2 executable (`path`, else $LDC2, else the one on PATH), or CompilerMissing with how to
    install it."""
    candidate = path or os.environ.get("LDC2") or shutil.which("ldc2")
    if not candidate or not shutil.which(candidate):
        raise CompilerMissing(f"no D compiler: ldc2 is not on PATH; {INSTALL_HINT}")
    return shutil.which(candidate)


def compiler_version(ldc2: str) -> str:
    out = subprocess.run([ldc2, "--version"], capture_output=True, text=True, timeout=60).stdout
    return out.splitlines()[0].strip() if out else "ldc2 (unknown version)"


@dataclass
class Unit:
    """One translation to compile and test."""

    name: str
    source: str
    """D source (token text or formatted); `module` line added by the runner."""
    tests: list[dict]
    """`TestCase.to_json` dicts: call, expected (a D literal, None for void), stdout (lines)."""


@dataclass
class UnitResult:
    compiled: bool
    errors: list[str] = field(default_factory=list)
    """The compiler's `Error:` lines for this unit (first = primary), file prefix kept as `<file>(<line>)`."""
    tests: list[bool] = field(default_factory=list)
    """Per test: passed (missing entries after a crash count as failed)."""
    stdout: list[list[str]] = field(default_factory=list)
    """Per test finished, the lines the function printed."""
    status: str = "ok"
    """ok | compile_error | crash | timeout."""
    n_tests: int = 0

    @property
    def passed(self) -> bool:
        return self.compiled and self.status == "ok" and self.n_tests > 0 and sum(self.tests) == self.n_tests

    @property
    def pass_rate(self) -> float:
        return sum(self.tests) / self.n_tests if self.n_tests else 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "UnitResult":
        return cls(**data)


_ERROR_LINE = re.compile(r"^(?P<file>[^\s()]+\.d)\((?P<line>\d+)(?:,\d+)?\): (?P<kind>Error|Deprecation|Warning): (?P<msg>.*)$")
_UNIT_FILE = re.compile(r"^(?:prog|test)_(\d+)\.d$")


class DRunner:
    """Compiles and tests D units with `ldc2` in a `Sandbox`; results cached under `cache_dir`."""

    def __init__(self, ldc2: str | None = None, sandbox: Sandbox | None = None, cache_dir: str | Path | None = None,
                 batch_size: int = 64, compile_limits: Limits = Limits(),
                 run_limits: Limits = Limits(cpu_seconds=1, wall_seconds=10.0, memory_bytes=2 << 30,
                                             file_bytes=4 << 20),
                 run_cpu_per_unit: float = 0.02, run_wall_per_unit: float = 0.25):
        self.ldc2 = find_ldc2(ldc2)
        self.version = compiler_version(self.ldc2)
        self.sandbox = sandbox or Sandbox()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size = batch_size
        self.compile_limits = compile_limits
        self.run_limits = run_limits
        self.run_cpu_per_unit = run_cpu_per_unit
        self.run_wall_per_unit = run_wall_per_unit
        self.stats = {"compiled": 0, "cached": 0, "compiler_calls": 0, "runs": 0}

    # --- cache ------------------------------------------------------------------------------------

    def _key(self, unit: Unit) -> str:
        payload = json.dumps([self.version, self.sandbox.confines_writes, unit.source, unit.tests])
        return hashlib.sha256(payload.encode()).hexdigest()

    def _cached(self, key: str) -> UnitResult | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / key[:2] / f"{key}.json"
        try:
            return UnitResult.from_json(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def _store(self, key: str, result: UnitResult) -> None:
        if self.cache_dir is None:
            return
        path = self.cache_dir / key[:2] / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(result.to_json()))
        os.replace(tmp, path)

    # --- evaluation -------------------------------------------------------------------------------

    def evaluate(self, units: Sequence[Unit], progress: bool = False) -> list[UnitResult]:
        """Compile and test every unit; results in the units' order."""
        results: list[UnitResult | None] = [None] * len(units)
        todo: dict[str, list[int]] = {}
        for i, unit in enumerate(units):
            key = self._key(unit)
            cached = self._cached(key)
            if cached is not None:
                results[i] = cached
                self.stats["cached"] += 1
            else:
                todo.setdefault(key, []).append(i)  # identical translations are compiled once
        keys = list(todo)
        bar = None
        if progress and keys:
            from tqdm import tqdm
            bar = tqdm(total=len(keys), desc="compile+test (ldc2)", unit="prog", leave=False)
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start:start + self.batch_size]
            batch = [units[todo[k][0]] for k in chunk]
            for key, result in zip(chunk, self._evaluate_batch(batch)):
                self._store(key, result)
                for i in todo[key]:
                    results[i] = result
            self.stats["compiled"] += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return results  # type: ignore[return-value]

    def _evaluate_batch(self, units: list[Unit]) -> list[UnitResult]:
        results = [UnitResult(compiled=False, n_tests=len(u.tests), tests=[False] * len(u.tests)) for u in units]
        with self.sandbox.folder() as folder:
            for i, unit in enumerate(units):
                (folder / f"prog_{i}.d").write_text(f"module prog_{i};\n" + pretty(unit.source))
                (folder / f"test_{i}.d").write_text(d_test_module(f"prog_{i}", f"test_{i}", unit.tests))
            pending = list(range(len(units)))
            while pending:  # check until a pass is clean (a parse error may hide others' errors)
                errors = self._check(folder, pending)
                bad = [i for i in pending if errors.get(i)]
                for i in bad:
                    results[i].errors = errors[i]
                    results[i].status = "compile_error"
                if not bad:
                    break
                pending = [i for i in pending if i not in bad]
            for i in pending:
                results[i].compiled = True
            self._run(folder, pending, units, results)
        for unit, result in zip(units, results):  # a printing function must print exactly what is expected
            for j, test in enumerate(unit.tests):
                if j < len(result.stdout) and result.tests[j] and list(test.get("stdout") or []) != result.stdout[j]:
                    result.tests[j] = False
        return results

    def _check(self, folder: Path, ids: list[int]) -> dict[int, list[str]]:
        files = [f for i in ids for f in (f"prog_{i}.d", f"test_{i}.d")]
        self.stats["compiler_calls"] += 1
        res = self.sandbox.run([self.ldc2, "-o-", "-verrors=0", *files], folder, self.compile_limits)
        errors = _attribute(res.stderr)
        if res.returncode != 0 and not errors:
            # the compiler failed without naming a file (killed, out of memory): blame every unit
            reason = "compiler timed out" if res.timed_out else f"compiler failed: {res.stderr.strip()[:200]}"
            return {i: [f"Error: {reason}"] for i in ids}
        return errors

    def _run(self, folder: Path, ids: list[int], units: list[Unit], results: list[UnitResult]) -> None:
        """Link `ids` into one runner and run it; on a death, record the unit that was running and go on
        with the rest."""
        while ids:
            main = ["module runner_main;", "import std.stdio;"] + [f"import test_{i};" for i in ids]
            main.append("void main() {")
            main += [f'    writeln("@@unit {i}"); stdout.flush(); test_{i}.run();' for i in ids]
            main.append('    writeln("@@done"); stdout.flush();')
            main.append("}")
            (folder / "runner_main.d").write_text("\n".join(main) + "\n")
            files = ["runner_main.d"] + [f for i in ids for f in (f"prog_{i}.d", f"test_{i}.d")]
            exe = folder / "runner"
            self.stats["compiler_calls"] += 1
            build = self.sandbox.run([self.ldc2, "-O0", f"-of={exe.name}", *files], folder, self.compile_limits)
            if build.returncode != 0:
                blamed = _attribute(build.stderr)
                if len(ids) == 1 or not blamed:  # a link error: find the unit by building them one by one
                    if len(ids) == 1:
                        results[ids[0]].compiled = False
                        results[ids[0]].status = "compile_error"
                        results[ids[0]].errors = _error_lines(build.stderr) or ["Error: build failed"]
                        return
                    for i in ids:
                        self._run(folder, [i], units, results)
                    return
                for i, errs in blamed.items():
                    results[i].compiled, results[i].status, results[i].errors = False, "compile_error", errs
                ids = [i for i in ids if i not in blamed]
                continue
            # A batch's CPU budget grows with its size (the programs run in microseconds; an endless loop
            # burns the whole budget); the wall limit is generous, for sleepers on a busy machine.
            base = self.run_limits
            limits = Limits(cpu_seconds=math.ceil(base.cpu_seconds + self.run_cpu_per_unit * len(ids)),
                            wall_seconds=base.wall_seconds + self.run_wall_per_unit * len(ids),
                            memory_bytes=base.memory_bytes, file_bytes=base.file_bytes,
                            process_margin=base.process_margin)
            self.stats["runs"] += 1
            run = self.sandbox.run([f"./{exe.name}"], folder, limits)
            exe.unlink(missing_ok=True)
            finished, current = _parse_run(run.stdout, results)
            if current is None:  # all done (or died between units)
                rest = [i for i in ids if i not in finished]
                if not rest:
                    return
                ids = rest
                continue
            results[current].status = "timeout" if run.timed_out else "crash"
            ids = [i for i in ids[ids.index(current) + 1:]]


def _attribute(stderr: str) -> dict[int, list[str]]:
    """Compiler error lines grouped by unit (prog_<i>.d / test_<i>.d), translation errors first."""
    prog: dict[int, list[str]] = {}
    test: dict[int, list[str]] = {}
    for line in stderr.splitlines():
        m = _ERROR_LINE.match(line.strip())
        if not m or m.group("kind") != "Error":
            continue
        unit = _UNIT_FILE.match(m.group("file"))
        if unit is None:
            continue
        target = prog if m.group("file").startswith("prog_") else test
        target.setdefault(int(unit.group(1)), []).append(line.strip())
    out = {}
    for i in set(prog) | set(test):
        out[i] = prog.get(i, []) + test.get(i, [])
    return out


def _error_lines(stderr: str) -> list[str]:
    return [line.strip() for line in stderr.splitlines() if "Error" in line]


def _parse_run(stdout: str, results: list[UnitResult]) -> tuple[set[int], int | None]:
    """Fill test results from the runner's markers; returns (units finished, unit running at death or None)."""
    finished: set[int] = set()
    current: int | None = None
    case: int | None = None
    printed: list[str] = []
    for line in stdout.splitlines():
        if line.startswith("@@unit "):
            if current is not None:
                finished.add(current)
            current, case = int(line.split()[1]), None
        elif line == "@@done":
            if current is not None:
                finished.add(current)
            return finished, None
        elif line.startswith("@@case ") and current is not None:
            case, printed = int(line.split()[1]), []
        elif line in ("@@pass", "@@fail", "@@error") and current is not None and case is not None:
            r = results[current]
            while len(r.stdout) < case:
                r.stdout.append([])
            r.stdout.append(list(printed))
            r.tests[case] = line == "@@pass"
            case = None
        elif case is not None:
            printed.append(line)
    if current is not None and case is None and _unit_complete(results[current]):
        finished.add(current)
        return finished, None
    return finished, current


def _unit_complete(result: UnitResult) -> bool:
    return len(result.stdout) == result.n_tests
