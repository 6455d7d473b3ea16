"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (tiny models on shared cores: more threads only contend,
    FINDINGS.md); the previous count is restored after it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
def small_sae(small_world, tmp_path_factory):
    """A top-k SAE (k 16, 512 latents) on `layers.0` of the small world, trained here for a few
    seconds of CPU on the world corpus's activations; saved in the sparsify layout.

    Returns (folder, hookpoint); load a fresh copy per test with `load_sparse_coder(folder)`.
    """
    import torch

    from lightning_edit.models import ModelAdapter, hidden_of, load_model
    from lightning_edit.sparse import SparseCoderConfig, TopKSparseCoder, save_sparsify

    hookpoint = "layers.0"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model, tokenizer = load_model(str(small_world.model_dir))
        adapter = ModelAdapter(model)
        lines = [line for line in small_world.corpus_path.read_text().splitlines() if line.strip()]
        grabbed, chunks = {}, []
        with torch.no_grad(), adapter.hooks({hookpoint: lambda m, a, o: grabbed.__setitem__("z", hidden_of(o))}):
            for i in range(0, len(lines), 512):
                batch = tokenizer(lines[i:i + 512], return_tensors="pt", padding=True)
                model(**batch)
                chunks.append(grabbed["z"][batch["attention_mask"].bool()])
        x = torch.cat(chunks)
        sae = TopKSparseCoder(SparseCoderConfig(d_in=x.shape[1], num_latents=512, k=16, dead_after_tokens=20_000))
        sae.initialize(x[:4096])
        optimizer = torch.optim.Adam(sae.parameters(), lr=2e-3)
        tracker = sae.new_dead_latent_tracker()
        gen = torch.Generator().manual_seed(0)
        for _ in range(400):
            out = sae(x[torch.randint(len(x), (512,), generator=gen)], dead_mask=tracker.dead_mask)
            optimizer.zero_grad()
            (out.fvu + out.auxk_loss / 32).backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            optimizer.step()
            sae.set_decoder_norm_to_unit_norm()
            tracker.update(out.latent_indices, out.latent_acts)
    finally:
        torch.set_num_threads(threads)
    folder = save_sparsify(sae, tmp_path_factory.mktemp("small_sae") / hookpoint)
    return folder, hookpoint
