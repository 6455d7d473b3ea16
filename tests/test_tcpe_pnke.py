"""TCPE and PNKE on the test-size world: one edit flips its target, only the method's own decoder rows
or output columns change, PNKE's entropy threshold (Alg. 4), and the saved edit state reloads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_edit.config import load_config
from lightning_edit.data import read_edits
from lightning_edit.editors.pnke import PNKE, entropy_threshold
from lightning_edit.editors.state import save_edit_state
from lightning_edit.jobs.edit_run import load_edited, new_editor
from lightning_edit.editors.tcpe import TCPE
from lightning_edit.jobs import edit as edit_job
from lightning_edit.metrics import teacher_forced
from lightning_edit.models import ModelAdapter, hidden_of, load_model

HOOKPOINT = "layers.0.mlp"
# The small world's LM (2 layers, width 64) reads facts at the prompt's last token; ||h|| ~ 0.5 there.
SOLVER = dict(position="last", v_lr=0.1, v_steps=40, context_templates=["{}"])


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(small_world):
    """The lines the edit job hands to `prepare` (a list's statistics are cached under one name)."""
    return [line for line in small_world.corpus_path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    """A statistics cache of this module's own: the shared one may hold other corpora under these names."""
    return str(tmp_path_factory.mktemp("stats"))


@pytest.fixture(scope="module")
def records(small_world):
    return read_edits(small_world.counterfact_path)[:4]


@pytest.fixture(scope="module")
def transcoder(small_world, tmp_path_factory):
    """A top-k transcoder (k 16, 512 latents) for the small world's `layers.0.mlp`, trained here in a
    few seconds on the corpus's MLP inputs and outputs; a sparsify folder."""
    from lightning_edit.sparse import SparseCoderConfig, TopKSparseCoder, save_sparsify

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model, tokenizer = load_model(str(small_world.model_dir))
        adapter = ModelAdapter(model)
        lines = [line for line in small_world.corpus_path.read_text().splitlines() if line.strip()]
        seen: dict[str, torch.Tensor] = {}

        def grab(module, args, output):
            seen["x"], seen["y"] = args[0], hidden_of(output)

        xs, ys = [], []
        with torch.no_grad(), adapter.hooks({HOOKPOINT: grab}):
            for i in range(0, len(lines), 512):
                batch = tokenizer(lines[i:i + 512], return_tensors="pt", padding=True)
                model(**batch)
                keep = batch["attention_mask"].bool()
                xs.append(seen["x"][keep])
                ys.append(seen["y"][keep])
        x, y = torch.cat(xs), torch.cat(ys)
        coder = TopKSparseCoder(SparseCoderConfig(d_in=x.shape[1], num_latents=512, k=16, mode="transcoder",
                                                  dead_after_tokens=20_000))
        coder.initialize(x[:4096], y[:4096])
        optimizer = torch.optim.Adam(coder.parameters(), lr=2e-3)
        tracker = coder.new_dead_latent_tracker()
        gen = torch.Generator().manual_seed(0)
        for _ in range(500):
            pick = torch.randint(len(x), (512,), generator=gen)
            out = coder(x[pick], y[pick], dead_mask=tracker.dead_mask)
            optimizer.zero_grad()
            (out.fvu + out.auxk_loss / 32).backward()
            optimizer.step()
            tracker.update(out.latent_indices, out.latent_acts)
    finally:
        torch.set_num_threads(threads)
    return save_sparsify(coder, tmp_path_factory.mktemp("small_transcoder") / HOOKPOINT)


def fresh(small_world):
    model, tokenizer = load_model(str(small_world.model_dir))
    return model, tokenizer, ModelAdapter(model)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def flipped(editor, record) -> bool:
    with editor.edited() as model:
        return teacher_forced(model, editor.tokenizer, [record.prompt], [record.target_new])[0].exact


def make_tcpe(small_world, transcoder, corpus, stats_dir, **overrides) -> TCPE:
    model, tokenizer, adapter = fresh(small_world)
    editor = new_editor("tcpe", {**SOLVER, "stats_dir": stats_dir, **overrides}, model, tokenizer, adapter,
                          {"path": str(transcoder), "hookpoint": HOOKPOINT}, str(small_world.model_dir))
    editor.prepare(corpus)
    return editor


def make_pnke(small_world, corpus, stats_dir, transcoder=None, **overrides) -> PNKE:
    model, tokenizer, adapter = fresh(small_world)
    component = {"path": str(transcoder), "hookpoint": HOOKPOINT} if transcoder else {}
    editor = new_editor("pnke", {"layer": 0, "preserve_corpus_samples": 200, "stats_dir": stats_dir, **SOLVER,
                                   **overrides}, model,
                          tokenizer, adapter, component, str(small_world.model_dir))
    editor.prepare(corpus)
    return editor


# --- TCPE ------------------------------------------------------------------------------------------


def test_tcpe_flips_and_changes_only_the_active_decoder_rows(small_world, transcoder, corpus, records, stats_dir):
    editor = make_tcpe(small_world, transcoder, corpus, stats_dir)
    record = records[0]
    assert not flipped(editor, record)
    lm_before, coder_before = snapshot(editor.model), snapshot(editor.coder)
    active = editor.support(editor.key(record.prompt, record.subject)).tolist()  # S_j before the edit
    entry = editor.apply([record])[0]
    assert flipped(editor, record)
    assert entry.changed == {f"{HOOKPOINT}.W_dec": active} and len(active) == editor.coder.cfg.k
    changed = (editor.coder.W_dec != coder_before["W_dec"]).any(dim=1).nonzero().flatten().tolist()
    assert set(changed) <= set(active)
    others = torch.ones(editor.coder.num_latents, dtype=torch.bool)
    others[active] = False
    assert torch.equal(editor.coder.W_dec[others], coder_before["W_dec"][others])  # bit-identical
    for name, tensor in snapshot(editor.coder).items():  # encoder, b_dec: untouched
        if name != "W_dec":
            assert torch.equal(tensor, coder_before[name]), name
    for name, tensor in snapshot(editor.model).items():  # the LM itself is never written
        assert torch.equal(tensor, lm_before[name]), name
    assert editor.adapter.mlp(0) is not editor.splice  # the splice is only in place inside edited()


def test_tcpe_lim_caps_the_support_and_still_flips(small_world, transcoder, corpus, records, stats_dir):
    editor = make_tcpe(small_world, transcoder, corpus, stats_dir, lim=4)
    entry = editor.apply([records[1]])[0]
    assert len(entry.changed[f"{HOOKPOINT}.W_dec"]) == 4
    assert flipped(editor, records[1])


# --- PNKE ------------------------------------------------------------------------------------------


def test_pnke_threshold_follows_alg4_on_a_hand_made_score_vector():
    s = np.array([0.05, 0.1, 0.1, 0.2, 0.3, 0.5, 0.8, 0.9, 1.0, 0.0])
    p = s / s.sum()
    entropy = -sum(x * math.log(x) for x in p if x > 0)
    q = min(100.0, 85.0 + 10.0 * (math.log(len(s)) - entropy))
    tau = np.percentile(s, q)
    mask, got_tau, got_q, got_h = entropy_threshold(torch.tensor(s), q_base=85.0, gamma=10.0)
    assert got_h == pytest.approx(entropy) and got_q == pytest.approx(q) and got_tau == pytest.approx(tau)
    assert mask.tolist() == (s > tau).tolist() and 0 < mask.sum() < len(s)
    # Uniform scores: maximal entropy, q = q_base, and nothing exceeds tau: the top scores are kept.
    mask, _, q, h = entropy_threshold(torch.ones(8))
    assert q == pytest.approx(85.0) and h == pytest.approx(math.log(8)) and mask.all()


def test_pnke_selects_fewer_neurons_as_the_entropy_of_the_scores_falls():
    ranks = torch.arange(60, dtype=torch.float64)
    sizes, entropies = [], []
    for beta in (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 3.0):
        mask, _, _, h = entropy_threshold(torch.exp(-beta * ranks) + 1e-3 * (beta == 0) * ranks)
        sizes.append(int(mask.sum()))
        entropies.append(h)
    assert entropies == sorted(entropies, reverse=True)
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1] >= 1


def test_pnke_flips_and_changes_only_the_critical_columns(small_world, corpus, records, stats_dir):
    editor = make_pnke(small_world, corpus, stats_dir)
    record = records[0]
    assert not flipped(editor, record)
    before = snapshot(editor.model)
    entry = editor.apply([record])[0]
    assert flipped(editor, record)
    critical = entry.changed[editor.param_name]
    assert 1 <= len(critical) == entry.extra["n_critical"] <= entry.extra["n_causal"]
    w_name = editor.adapter.base_model_prefix + "." + editor.param_name
    for name, tensor in snapshot(editor.model).items():
        if name != w_name:
            assert torch.equal(tensor, before[name]), name
    moved = (editor.model.state_dict()[w_name] != before[w_name]).any(dim=0).nonzero().flatten().tolist()
    assert set(moved) <= set(critical) and moved  # columns of [d_model, d_ff]: only critical neurons


def test_pnke_gradient_variant_masks_the_gradient_to_the_critical_columns(small_world, corpus, records, stats_dir):
    editor = make_pnke(small_world, corpus, stats_dir, update="gradient", lr=2e-2, max_steps=30)
    w_name = editor.adapter.base_model_prefix + "." + editor.param_name
    before = snapshot(editor.model)
    entry = editor.apply([records[1]])[0]
    critical = entry.changed[editor.param_name]
    assert entry.steps > 0
    delta = editor.model.state_dict()[w_name] - before[w_name]
    outside = torch.ones(delta.shape[1], dtype=torch.bool)
    outside[critical] = False
    assert torch.equal(delta[:, outside], torch.zeros_like(delta[:, outside]))  # bit-identical
    assert delta[:, critical].abs().sum() > 0


def test_pnke_on_transcoder_latents_changes_only_critical_decoder_rows(small_world, transcoder, corpus, records,
                                                                      stats_dir):
    editor = make_pnke(small_world, corpus, stats_dir, transcoder, site="transcoder")
    before = snapshot(editor.coder)
    lm_before = snapshot(editor.model)
    entry = editor.apply([records[2]])[0]
    assert flipped(editor, records[2])
    critical = entry.changed[f"{HOOKPOINT}.W_dec"]
    moved = (editor.coder.W_dec != before["W_dec"]).any(dim=1).nonzero().flatten().tolist()
    assert moved and set(moved) <= set(critical)
    assert all(torch.equal(t, lm_before[n]) for n, t in snapshot(editor.model).items())


# --- edit state ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tcpe", "pnke"])
def test_saved_edit_state_reproduces_the_edited_predictions(method, small_world, transcoder, corpus, records, stats_dir,
                                                            tmp_path):
    editor = (make_tcpe(small_world, transcoder, corpus, stats_dir) if method == "tcpe"
              else make_pnke(small_world, corpus, stats_dir, edits_weight=1.0))
    for record in records[:2]:
        editor.apply([record])
    probe = [r.prompt for r in records] + [p.prompt for p in records[0].locality]
    tok = editor.tokenizer
    batch = tok(probe, return_tensors="pt", padding=True)
    with torch.no_grad(), editor.edited() as model:
        expected = model(**batch).logits
    save_edit_state(editor, tmp_path / "state")
    again, model, _ = load_edited(tmp_path / "state")
    assert len(again.ledger) == 2
    with torch.no_grad(), again.edited() as m:
        assert torch.equal(m(**batch).logits, expected)
    with torch.no_grad():  # outside edited() the transcoder is not spliced in / the base LM
        base = load_model(str(small_world.model_dir))[0](**batch).logits
        if method == "tcpe":
            assert torch.equal(model(**batch).logits, base)


def test_edit_job_runs_both_methods(small_world, transcoder, stats_dir, tmp_path):
    for method in ("tcpe", "pnke"):
        out = tmp_path / method
        overrides = [f"config={method}.yaml", "model.name=toyworld-small", f"output_dir={out}", "logger=csv",
                     "threads=1", "trainer.enable_progress_bar=false", "data.limit=3", "eval.checkpoints=[3]",
                     f"component.path={transcoder}", f"component.hookpoint={HOOKPOINT}",
                     "editor.v_lr=0.1", f"editor.stats_dir={stats_dir}", "callbacks.locality.enabled=false",
                     "callbacks.examples.enabled=false"]
        if method == "pnke":
            overrides += ["editor.layer=0", "editor.preserve_corpus_samples=200"]
        cfg = load_config(edit_job.SCHEMA, overrides)
        assert edit_job.run(cfg) == 0, method
        assert (out / "results.json").is_file() and (out / "edit_state" / "state.json").is_file()
