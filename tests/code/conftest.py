"""Fixtures of the code-world tests. They need LDC (`ldc2`): CI installs it (the README's test command
starts with `command -v ldc2 || apt-get install -y ldc`); without it these tests fail saying so, they
are never skipped."""

from __future__ import annotations

import shutil

import pytest

NO_LDC = ("these tests compile D with LDC: install it (Debian/Ubuntu: apt-get install -y ldc; the README's test "
          "command does this when ldc2 is missing) so that ldc2 is on PATH")


@pytest.fixture(scope="session")
def ldc2() -> str:
    path = shutil.which("ldc2")
    if path is None:
        pytest.fail(NO_LDC)
    return path


@pytest.fixture(scope="session")
def runner(ldc2, tmp_path_factory):
    """A DRunner with a cache of its own (the test decides what is compiled)."""
    from lightning_edit.code.compiler import DRunner

    return DRunner(ldc2, cache_dir=tmp_path_factory.mktemp("exec_cache"), batch_size=16)


@pytest.fixture(scope="session")
def code_world(ldc2):
    """The embedded test code world `codeworld-small`, built on first use (~1.5 min on 2 cores) into
    $LIGHTNING_EDIT_CACHE (default ~/.cache/lightning_edit) and reused by later runs."""
    from lightning_edit.world import load_world

    return load_world("codeworld-small")
