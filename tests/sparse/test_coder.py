"""TopKSparseCoder (lightning_edit.sparse.coder, .config): init rules, constraints, losses, AuxK."""

from __future__ import annotations

import pytest
import torch

from lightning_edit.sparse import DeadLatentTracker, SparseCoderConfig, TopKSparseCoder, default_lr

from tests.sparse.helpers import D_IN, K, N_LATENTS, batch, make_sae, make_transcoder


def test_config_defaults_and_validation():
    cfg = SparseCoderConfig(d_in=8)
    assert cfg.resolved_num_latents == 8 * 32 and cfg.resolved_k_aux == 4
    assert cfg.normalize_decoder is True and cfg.auxk and cfg.k == 32
    assert SparseCoderConfig(d_in=8, mode="transcoder").normalize_decoder is False
    with pytest.raises(ValueError, match="mode"):
        SparseCoderConfig(d_in=8, mode="bogus")
    with pytest.raises(ValueError, match="skip_connection"):
        SparseCoderConfig(d_in=8, skip_connection=True)
    with pytest.raises(ValueError, match="activation"):
        SparseCoderConfig(d_in=8, activation="relu")
    with pytest.raises(ValueError, match="k=99"):
        SparseCoderConfig(d_in=8, num_latents=16, k=99)
    with pytest.raises(ValueError, match="normalize_decoder"):
        SparseCoderConfig(d_in=8, mode="transcoder", normalize_decoder=True)
    assert default_lr(2**14) == pytest.approx(2e-4)
    assert default_lr(2**16) == pytest.approx(1e-4)


def test_sae_init_decoder_unit_norm_parallel_to_encoder_and_b_dec_batch_mean():
    sae = make_sae()
    w_dec, w_enc = sae.W_dec.detach(), sae.encoder.weight.detach()
    torch.testing.assert_close(w_dec.norm(dim=1), torch.ones(N_LATENTS))
    cos = torch.nn.functional.cosine_similarity(w_dec, w_enc, dim=1)
    torch.testing.assert_close(cos, torch.ones(N_LATENTS))
    assert torch.all(sae.encoder.bias == 0)
    x = batch()
    sae.initialize(x)
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0))


def test_transcoder_init_rules():
    tc = make_transcoder(skip_connection=True)
    assert torch.all(tc.W_dec == 0) and tc.W_dec.shape == (N_LATENTS, 12)
    assert torch.all(tc.W_skip == 0) and tc.W_skip.shape == (12, D_IN)
    x, y = batch(), batch(d=12, seed=2)
    tc.initialize(x, y)
    torch.testing.assert_close(tc.b_dec.detach(), y.mean(0))
    torch.testing.assert_close(tc.encoder.bias.detach(), -(x.mean(0) @ tc.encoder.weight.mT))
    # Zero decoder: the first prediction is the mean target.
    torch.testing.assert_close(tc.reconstruct(x), y.mean(0).expand(64, 12))
    with pytest.raises(ValueError, match="target y"):
        tc(x)


def test_renorm_after_optimizer_step_keeps_unit_rows():
    sae = make_sae()
    x = batch()
    sae.initialize(x)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(3):
        sae(x).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        assert sae.set_decoder_norm_to_unit_norm()
        torch.testing.assert_close(sae.W_dec.detach().norm(dim=1), torch.ones(N_LATENTS))


def test_gradient_parallel_to_decoder_rows_removed():
    sae = make_sae()
    sae(batch()).fvu.backward()
    sae.W_dec.grad += 0.5 * sae.W_dec.detach()  # make sure there is a parallel part to remove
    assert sae.remove_gradient_parallel_to_decoder_directions()
    dots = (sae.W_dec.grad * sae.W_dec.detach()).sum(1)
    assert dots.abs().max() < 1e-6


def test_decoder_constraint_is_a_noop_for_transcoders():
    tc = make_transcoder()
    tc(batch(), batch(d=12)).fvu.backward()
    before = tc.W_dec.grad.clone()
    with pytest.warns(UserWarning, match="no norm constraint"):
        assert tc.remove_gradient_parallel_to_decoder_directions() is False
    assert torch.equal(tc.W_dec.grad, before)


def test_topk_gives_exactly_k_nonzeros_per_token():
    sae = make_sae()
    x = batch()
    sae.initialize(x)
    acts, indices = sae.encode(x)
    assert acts.shape == indices.shape == (64, K)
    dense = torch.zeros(64, N_LATENTS).scatter(1, indices, acts)
    assert torch.all((dense != 0).sum(1) == K)
    # And they are the k largest pre-activations.
    pre = torch.nn.functional.linear(x - sae.b_dec, sae.encoder.weight, sae.encoder.bias).relu()
    torch.testing.assert_close(acts.sort(1).values, pre.topk(K).values.sort(1).values)


def test_sparse_gather_decode_equals_dense_decode():
    sae = make_sae()
    with torch.no_grad():
        sae.b_dec.normal_()
    acts, indices = sae.encode(batch())
    torch.testing.assert_close(sae.decode(acts, indices), sae.decode_dense(acts, indices))
    x3 = batch().reshape(4, 16, D_IN)  # leading dims are kept
    assert sae(x3).output.shape == (4, 16, D_IN)


def test_fvu_perfect_reconstruction_is_zero_and_mean_prediction_is_one():
    tc = make_transcoder()
    x, y = batch(), batch(d=12, seed=3)
    tc.initialize(x, y)  # W_dec = 0: the prediction is the mean target
    assert tc(x, y).fvu.item() == pytest.approx(1.0, abs=1e-5)
    sae = make_sae()
    sae.initialize(x)
    perfect = sae.reconstruct(x).detach()  # a target the coder reproduces exactly
    assert sae(x, perfect).fvu.item() == 0.0


def test_multi_topk_fvu_present_only_when_enabled():
    x = batch()
    off = make_sae()
    off.initialize(x)
    assert off(x).multi_topk_fvu.item() == 0.0
    on = make_sae(multi_topk=True)
    on.initialize(x)
    out = on(x)
    pre = torch.nn.functional.linear(x - on.b_dec, on.encoder.weight, on.encoder.bias)
    vals, idx = pre.topk(4 * K)
    x_hat_4k = on.decode_dense(torch.relu(vals), idx)
    expected = (x - x_hat_4k).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert out.multi_topk_fvu.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.multi_topk_fvu.requires_grad


@pytest.mark.parametrize("auxk_dense_factor", [0, 100])  # AuxK by sparse gather / by dense GEMMs
def test_sparse_backward_matches_dense_autograd(monkeypatch, auxk_dense_factor):
    import lightning_edit.sparse.coder as coder_module

    monkeypatch.setattr(coder_module, "AUXK_DENSE_FACTOR", auxk_dense_factor)
    sae = make_sae(multi_topk=True, k_aux=8)
    assert sae._auxk_is_dense(64, 16, 8) == bool(auxk_dense_factor)
    x = batch()
    sae.initialize(x)
    dead = torch.zeros(N_LATENTS, dtype=torch.bool)
    dead[::4] = True  # 16 dead: a quarter of the latents, the dense path's cap
    out = sae(x, dead_mask=dead)
    (out.fvu + out.auxk_loss + out.multi_topk_fvu).backward()
    assert out.auxk_loss > 0

    ref = make_sae(multi_topk=True, k_aux=8)
    ref.load_state_dict(sae.state_dict())
    pre = torch.nn.functional.linear(x - ref.b_dec, ref.encoder.weight, ref.encoder.bias)
    tv = (x - x.mean(0)).pow(2).sum()

    def dense_decode(vals, idx, bias=True):
        code = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals))
        return code @ ref.W_dec + (ref.b_dec if bias else 0)

    v, i = pre.topk(K)
    x_hat = dense_decode(v, i)
    fvu = (x - x_hat).pow(2).sum() / tv
    v4, i4 = pre.topk(4 * K)
    mtk = (x - dense_decode(v4, i4)).pow(2).sum() / tv
    va, ia = pre.masked_fill(~dead, -torch.inf).topk(8)
    aux = (dense_decode(va, ia, bias=False) - (x - x_hat).detach()).pow(2).sum() / tv
    (fvu + aux + mtk).backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[name].grad)


def test_bfloat16_autocast_forward_backward():
    sae = make_sae()
    x = batch()
    sae.initialize(x)
    for dead in (torch.ones(N_LATENTS, dtype=torch.bool), torch.arange(N_LATENTS) < 8):  # sparse / dense AuxK
        assert sae._auxk_is_dense(64, int(dead.sum()), sae.k_aux) == (int(dead.sum()) == 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae(x, dead_mask=dead)
        (out.fvu + out.auxk_loss).backward()
        assert out.output.dtype == torch.float32 and torch.isfinite(out.fvu) and out.auxk_loss > 0
        assert all(p.grad.layout == torch.strided and torch.isfinite(p.grad).all() for p in sae.parameters())
        sae.zero_grad(set_to_none=True)
    bf16 = make_sae().to(torch.bfloat16)
    assert bf16(x.bfloat16()).output.dtype == torch.bfloat16


def test_relu_transcoder_with_skip_trains():
    tc = make_transcoder(activation="relu", skip_connection=True, k_aux=4)
    x, y = batch(), batch(d=12, seed=2)
    tc.initialize(x, y)
    tc.W_dec.data.normal_()
    dead = torch.zeros(N_LATENTS, dtype=torch.bool)
    dead[:8] = True
    out = tc(x, y, dead_mask=dead)
    assert out.latent_acts.shape == (64, N_LATENTS) and out.output.shape == (64, 12)
    torch.testing.assert_close(out.output, tc.reconstruct(x))
    torch.testing.assert_close(out.output, tc.decode_dense(out.latent_acts, out.latent_indices)
                               + x @ tc.W_skip.mT)
    (out.fvu + out.auxk_loss).backward()
    assert tc.W_skip.grad.abs().sum() > 0 and tc.encoder.weight.grad.abs().sum() > 0


def test_dead_latent_tracker():
    tracker = DeadLatentTracker(8, dead_after_tokens=10)
    idx = torch.tensor([[0, 1], [1, 2]])
    tracker.update(idx, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))  # latent 2 selected but zero
    assert tracker.num_tokens_since_fired.tolist() == [0, 0, 2, 2, 2, 2, 2, 2]
    tracker.update(idx, num_tokens=8)
    assert tracker.dead_mask.tolist() == [False, False, False] + [True] * 5
    assert tracker.dead_fraction == pytest.approx(5 / 8)


def _train_with_dead_latents(auxk: bool, steps: int = 300) -> tuple[int, int]:
    """Train on a sparse dictionary with 32 latents made dead; (most dead, dead at the end)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead on shared cores
    try:
        return _train_with_dead_latents_impl(auxk, steps)
    finally:
        torch.set_num_threads(threads)


def _train_with_dead_latents_impl(auxk: bool, steps: int) -> tuple[int, int]:
    torch.manual_seed(0)
    d, n_atoms, n, k, n_dead = 32, 128, 128, 4, 32
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d), dim=1)

    def sample(tokens):
        code = torch.zeros(tokens, n_atoms)
        code.scatter_(1, torch.rand(tokens, n_atoms).topk(k).indices, torch.rand(tokens, k) + 0.5)
        return code @ atoms

    # Dead after 10 batches without firing.
    cfg = SparseCoderConfig(d_in=d, num_latents=n, k=k, auxk=auxk, dead_after_tokens=2560)
    sae = TopKSparseCoder(cfg)
    with torch.no_grad():
        sae.encoder.weight[:n_dead] *= 1e-3  # never in the top k: dead on purpose
    tracker = sae.new_dead_latent_tracker()
    opt = torch.optim.Adam(sae.parameters(), lr=default_lr(n))
    sae.initialize(sample(256))
    most_dead = 0
    for _ in range(steps):
        out = sae(sample(256), dead_mask=tracker.dead_mask)
        (out.fvu + out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        tracker.update(out.latent_indices, out.latent_acts)
        most_dead = max(most_dead, int(tracker.dead_mask.sum()))
    return most_dead, int(tracker.dead_mask.sum())


def test_auxk_revives_dead_latents():
    most_with, end_with = _train_with_dead_latents(auxk=True)
    most_without, end_without = _train_with_dead_latents(auxk=False)
    assert most_with >= 32 and most_without >= 32  # the sabotaged latents did die
    assert end_without >= 0.9 * most_without  # without AuxK nothing brings them back
    assert end_with <= 0.5 * most_with  # with AuxK most fire again
