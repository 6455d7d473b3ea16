"""Running untrusted programs (the LM's translations, their compiler) in a subprocess, never in-process.

Every command runs in its own temporary folder (the cwd, also HOME and TMPDIR) with

- resource limits set in the child before exec (`resource.setrlimit`): CPU seconds, address space,
  the largest file it may write (stdout and stderr go to files in the folder, so an endless printer
  is stopped by the same limit), core dumps off, and the number of processes (this user's current
  count plus a margin; not enforced by the kernel for root);
- a wall-clock timeout after which the whole process group is killed;
- a minimal environment (PATH, HOME, TMPDIR, LANG=C);
- **writes confined to the folder** by Landlock (`landlock.py`, Linux >= 5.13, no privileges
  needed): creating, writing, truncating, renaming or removing anything outside it fails with
  EACCES, for the program and everything it starts; TCP is off where the kernel's Landlock has
  network rules (ABI >= 4). Reading is not restricted.

`filesystem="auto"` uses Landlock when the kernel has it and otherwise says once on stderr that
writes outside the folder are *not* prevented (rlimits and the timeout still apply);
`filesystem="landlock"` refuses to run without it; `"none"` turns it off.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import landlock

FILESYSTEM_MODES = ("auto", "landlock", "none")


@dataclass(frozen=True)
class Limits:
    """What one command may use."""

    cpu_seconds: int = 20
    wall_seconds: float = 60.0
    memory_bytes: int = 4 << 30
    """Address space (RLIMIT_AS). LDC maps ~1 GiB of address space for itself."""
    file_bytes: int = 64 << 20
    """Largest file the command may write (RLIMIT_FSIZE), its captured stdout/stderr included."""
    process_margin: int = 64
    """RLIMIT_NPROC = this user's processes now + this margin (a fork bomb stops there)."""


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None


class SandboxError(RuntimeError):
    """The sandbox cannot give the guarantee it was asked for."""


def _user_processes() -> int:
    uid = os.getuid()
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


class Sandbox:
    """Runs commands confined to a folder; one object per policy (see the module doc)."""

    def __init__(self, filesystem: str = "auto"):
        if filesystem not in FILESYSTEM_MODES:
            raise ValueError(f"sandbox filesystem is {filesystem!r}; expected one of {FILESYSTEM_MODES}")
        self.abi = landlock.abi_version() if filesystem != "none" else 0
        if filesystem == "landlock" and self.abi == 0:
            raise SandboxError("sandbox.filesystem=landlock but this kernel has no Landlock (Linux >= 5.13 with "
                               "CONFIG_SECURITY_LANDLOCK and 'landlock' in the lsm= boot list); use "
                               "sandbox.filesystem=auto to run without confining writes")
        if filesystem == "auto" and self.abi == 0:
            print("[lightning-edit code] this kernel has no Landlock: programs run with rlimits and a timeout, but "
                  "writes outside their temp folder are NOT prevented", file=sys.stderr, flush=True)
        self.filesystem = filesystem

    @property
    def confines_writes(self) -> bool:
        return self.abi > 0

    def run(self, argv: list[str], cwd: str | Path, limits: Limits = Limits(), stdin: str | None = None) -> RunResult:
        """Run `argv` in folder `cwd` (which must exist) under `limits`; stdout/stderr are read back
        from files in `cwd`."""
        cwd = Path(cwd).resolve()
        out_path, err_path = cwd / ".stdout", cwd / ".stderr"
        nproc = _user_processes() + limits.process_margin
        abi = self.abi
        writable = [str(cwd)]

        def child_setup() -> None:  # runs in the child after fork, before exec
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
            if abi:
                landlock.restrict_writes(writable, abi)

        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd), "TMPDIR": str(cwd), "LANG": "C"}
        start = time.perf_counter()
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err,
                                    stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                    preexec_fn=child_setup, start_new_session=True)
            try:
                proc.communicate(stdin.encode() if stdin is not None else None, timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                proc.wait()
            finally:
                if proc.poll() is None:
                    _kill_group(proc)
                    proc.wait()
        seconds = time.perf_counter() - start
        # the CPU limit ends a busy loop with SIGXCPU (or SIGKILL past the hard limit): a timeout too
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not timed_out:
            timed_out = True
        return RunResult(proc.returncode, _read(out_path, limits.file_bytes), _read(err_path, limits.file_bytes),
                         timed_out, seconds)

    def folder(self, prefix: str = "lightning-edit-code-") -> "TempFolder":
        return TempFolder(prefix)


class TempFolder:
    """A fresh temporary folder, removed on exit."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.path: Path | None = None

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix=self.prefix))
        return self.path

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
