"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_world():
    """The embedded test world `toyworld-small`, built on first use (~30 s on 2 cores) into
    $LIGHTNING_EDIT_CACHE (default ~/.cache/lightning_edit) and reused by later runs."""
    from lightning_edit.world import load_world

    return load_world("toyworld-small")
