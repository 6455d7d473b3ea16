"""Fixtures of the downstream tests: the test world's model and tokenizer, loaded once."""

from __future__ import annotations

import pytest

from lightning_edit.models import load_model


@pytest.fixture(scope="package")
def model_and_tokenizer(small_world):
    return load_model(str(small_world.model_dir))
