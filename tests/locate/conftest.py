"""Fixtures of the locate tests: a tokenizer, tiny Llama / GPT-2 models (random and trained on a few
facts), and an isolated statistics cache and working directory."""

from __future__ import annotations

import pytest
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from tests.locate.helpers import make_gpt2, make_llama, make_tokenizer, train_on_facts


@pytest.fixture(scope="package")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="package", params=["llama", "gpt2"])
def arch_model(request, tok):
    build = make_llama if request.param == "llama" else make_gpt2
    return request.param, build(len(tok))


@pytest.fixture(scope="package")
def llama(tok) -> LlamaForCausalLM:
    return make_llama(len(tok))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Cache under tmp_path/cache and an empty cwd that must stay empty."""
    monkeypatch.setenv("LIGHTNING_EDIT_CACHE", str(tmp_path / "cache"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert not list(cwd.iterdir()), f"files written to the working directory: {list(cwd.iterdir())}"


@pytest.fixture(scope="package")
def trained(arch_model, tok):
    arch, _ = arch_model
    return train_on_facts((make_llama if arch == "llama" else make_gpt2)(len(tok), seed=3), tok)
