"""Shared fixtures: one torch thread, the test-size world, its corpus, a small SAE and a small transcoder."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models on shared cores: one thread is much faster than two contended ones (FINDINGS.md).
    Session-wide, so module- and session-scoped fixtures (trained models, coders) get it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def back_to_one_thread():
    """A job a test runs may set its own thread count (`threads=`): one again after the test."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_world():
    """The embedded test world `toyworld-small`, built on first use (~30 s on 2 cores) into
    $LIGHTNING_EDIT_CACHE (default ~/.cache/lightning_edit) and reused by later runs."""
    from lightning_edit.world import load_world

    return load_world("toyworld-small")


@pytest.fixture(scope="session")
def gpt2_world():
    """The second embedded test world `toyworld-gpt2-small` (a tiny GPT-2, a byte-level BPE, companies
    with multi-token objects), built on first use and cached like `small_world`."""
    from lightning_edit.world import load_world

    return load_world("toyworld-gpt2-small")


@pytest.fixture(scope="session")
def small_corpus(small_world) -> list[str]:
    """The world corpus's non-empty lines: what the edit job hands to `prepare` (a list's statistics
    are cached under one name)."""
    return [line for line in small_world.corpus_path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    """A statistics cache of the test module's own: the shared one may hold other corpora under these names."""
    return str(tmp_path_factory.mktemp("stats"))


def _train_small_coder(world, hookpoint: str, mode: str, steps: int):
    """A top-k coder (k 16, 512 latents) at `hookpoint` of the small world, trained for a few seconds
    of CPU on the corpus's activations ("sae": the hookpoint's output; "transcoder": its input -> output)."""
    from lightning_edit.models import ModelAdapter, hidden_of, load_model
    from lightning_edit.sparse import SparseCoderConfig, TopKSparseCoder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model, tokenizer = load_model(str(world.model_dir))
        adapter = ModelAdapter(model)
        lines = [line for line in world.corpus_path.read_text().splitlines() if line.strip()]
        seen: dict[str, torch.Tensor] = {}

        def grab(module, args, output):
            seen["x"], seen["y"] = args[0], hidden_of(output)

        xs, ys = [], []
        with torch.no_grad(), adapter.hooks({hookpoint: grab}):
            for i in range(0, len(lines), 512):
                batch = tokenizer(lines[i:i + 512], return_tensors="pt", padding=True)
                model(**batch)
                keep = batch["attention_mask"].bool()
                xs.append(seen["x" if mode == "transcoder" else "y"][keep])
                ys.append(seen["y"][keep])
        x, y = torch.cat(xs), torch.cat(ys)
        coder = TopKSparseCoder(SparseCoderConfig(d_in=x.shape[1], num_latents=512, k=16, mode=mode,
                                                  dead_after_tokens=20_000))
        targets = y if mode == "transcoder" else None
        coder.initialize(x[:4096], None if targets is None else targets[:4096])
        optimizer = torch.optim.Adam(coder.parameters(), lr=2e-3)
        tracker = coder.new_dead_latent_tracker()
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            pick = torch.randint(len(x), (512,), generator=gen)
            out = coder(x[pick], None if targets is None else targets[pick], dead_mask=tracker.dead_mask)
            optimizer.zero_grad()
            (out.fvu + out.auxk_loss / 32).backward()
            if mode == "sae":  # unit-norm decoder rows (transcoders have no such constraint)
                coder.remove_gradient_parallel_to_decoder_directions()
            optimizer.step()
            if mode == "sae":
                coder.set_decoder_norm_to_unit_norm()
            tracker.update(out.latent_indices, out.latent_acts)
    finally:
        torch.set_num_threads(threads)
    return coder


@pytest.fixture(scope="session")
def small_sae(small_world, tmp_path_factory):
    """A top-k SAE on `layers.0` of the small world, in the sparsify layout: (folder, hookpoint).
    Load a fresh copy per test with `load_sparse_coder(folder)`."""
    from lightning_edit.sparse import save_sparsify

    hookpoint = "layers.0"
    sae = _train_small_coder(small_world, hookpoint, "sae", steps=400)
    return save_sparsify(sae, tmp_path_factory.mktemp("small_sae") / hookpoint), hookpoint


@pytest.fixture(scope="session")
def small_transcoder(small_world, tmp_path_factory):
    """A top-k transcoder for the small world's `layers.0.mlp`, in the sparsify layout: (folder, hookpoint)."""
    from lightning_edit.sparse import save_sparsify

    hookpoint = "layers.0.mlp"
    coder = _train_small_coder(small_world, hookpoint, "transcoder", steps=500)
    return save_sparsify(coder, tmp_path_factory.mktemp("small_transcoder") / hookpoint), hookpoint
