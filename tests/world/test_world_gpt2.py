"""The second embedded world, `toyworld-gpt2-small`: a tiny GPT-2 (Conv1D weights, learned positions,
GELU MLP, tied unembedding), a byte-level BPE without BOS or pad token, companies with multi-token
objects. It must be a world like `toyworld` for every reader, metric, adapter and editor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_edit.world import SPECS, World, resolve_model_path

SPEC = SPECS["toyworld-gpt2-small"]



@pytest.fixture(scope="module")
def loaded(gpt2_world):
    """(model, tokenizer) through the project's loader, by world name."""
    from lightning_edit.models import load_model

    return load_model("toyworld-gpt2-small")


def fact_rows(world) -> list[tuple[str, str]]:
    return [(p, f.object) for f in world.kb.facts for p in world.kb.prompts(f)]


# ----- what it is ----------------------------------------------------------------------------------
def test_gpt2_architecture(gpt2_world, loaded):
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    model, _ = loaded
    assert isinstance(model, GPT2LMHeadModel)
    assert resolve_model_path("toyworld-gpt2-small") == gpt2_world.model_dir
    cfg, shape = model.config, SPEC.model
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_inner) == (shape.n_embd, shape.n_layer, shape.n_head,
                                                                 shape.n_inner)
    block = model.transformer.h[0]
    assert isinstance(block.mlp.c_fc, Conv1D) and isinstance(block.mlp.c_proj, Conv1D)
    assert block.mlp.c_proj.weight.shape == (shape.n_inner, shape.n_embd)  # stored [in, out]
    assert cfg.activation_function.startswith("gelu")
    assert type(block.ln_1).__name__ == "LayerNorm" and type(model.transformer.ln_f).__name__ == "LayerNorm"
    # learned positions: a trained table, not rotary; moving a prompt by one position changes the logits
    wpe = model.transformer.wpe.weight
    assert wpe.shape == (shape.n_positions, shape.n_embd) and wpe[:8].std(0).mean() > 0.01
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied, as GPT-2
    toy = SPECS["toyworld-small"].model
    assert (shape.n_embd, shape.n_layer, shape.n_inner) != (toy.hidden_size, toy.num_hidden_layers,
                                                            toy.intermediate_size)
    assert gpt2_world.accuracy["architecture"] == "GPT2LMHeadModel"


def test_gpt2_tokenizer_is_gpt2_style(gpt2_world, loaded):
    """Byte-level BPE: one special token as BOS/EOS, nothing added to a text, no pad token saved
    (the loader pads with EOS), a space belongs to the next word's first token."""
    _, tok = loaded
    saved = gpt2_world.load_tokenizer()
    assert saved.pad_token is None and tok.pad_token_id == tok.eos_token_id == tok.bos_token_id
    text = "The founder of " + gpt2_world.kb.subjects[0] + " is"
    assert tok(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]  # no BOS added
    assert tok.decode(tok(text)["input_ids"]) == text
    subject = gpt2_world.kb.subjects[0]
    first = tok.convert_ids_to_tokens(tok(subject)["input_ids"])[0]
    after_space = tok.convert_ids_to_tokens(tok(" " + subject)["input_ids"])[0]
    assert not first.startswith("Ġ") and after_space.startswith("Ġ")


def test_gpt2_targets_are_token_suffixes_and_often_several_tokens(gpt2_world, loaded):
    from lightning_edit.tokens import target_positions

    _, tok = loaded
    lengths = []
    for prompt, obj in fact_rows(gpt2_world)[:300]:
        ids, start = target_positions(tok, prompt, obj)
        assert ids[:start] == tok(prompt)["input_ids"]
        assert ids[start:] == tok(" " + obj, add_special_tokens=False)["input_ids"]
        lengths.append(len(ids) - start)
    assert max(lengths) >= 3 and sum(n > 1 for n in lengths) > 0.3 * len(lengths)
    subjects = [len(tok(" " + s)["input_ids"]) for s in gpt2_world.kb.subjects]
    assert min(subjects) >= 2  # every subject is several tokens
    assert any(not gpt2_world.kb.prompts(f)[1].startswith(f.subject) for f in gpt2_world.kb.facts)


def test_gpt2_knowledge_differs_from_toyworld(gpt2_world, small_world):
    kb, toy = gpt2_world.kb, small_world.kb
    assert not {r.name for r in kb.relations} & {r.name for r in toy.relations}
    assert {len(r.templates) for r in kb.relations} == {3, 5}
    assert any(" " in o for r in kb.relations for o in r.objects)
    assert all(len(r.templates) == len(set(r.templates)) for r in kb.relations)
    assert kb.sentence(kb.facts[0], 0).endswith(kb.facts[0].object + ".")


# ----- it knows its world --------------------------------------------------------------------------
def test_gpt2_world_knows_its_facts_as_the_metrics_score_them(gpt2_world, loaded):
    """The build's accuracy is the metrics' teacher-forced exact match (every object token the
    argmax), recomputed here from the saved folder through `load_model` and `teacher_forced`."""
    from lightning_edit.metrics import teacher_forced

    model, tok = loaded
    rows = fact_rows(gpt2_world)
    scores = teacher_forced(model, tok, [p for p, _ in rows], [o for _, o in rows], batch_size=256)
    exact = sum(s.exact for s in scores) / len(scores)
    assert exact >= 0.95, f"the model knows only {exact:.1%} of its facts"
    assert abs(exact - gpt2_world.accuracy["accuracy"]) < 1e-9
    multi = [s for s in scores if len(s.target_ids) > 1]
    assert len(multi) > 0.3 * len(scores)
    assert sum(s.token_acc for s in multi) / len(multi) > 0.95
    # a wrong object of the same relation is not what the model predicts
    fact = gpt2_world.kb.facts[0]
    wrong = next(o for o in gpt2_world.kb.relation(fact.relation).objects if o != fact.object)
    (right_score,), (wrong_score,) = (teacher_forced(model, tok, [gpt2_world.kb.prompts(fact)[0]], [o])
                                      for o in (fact.object, wrong))
    assert right_score.nll < wrong_score.nll


def test_gpt2_accuracy_record(gpt2_world):
    acc = gpt2_world.accuracy
    assert acc["accuracy"] >= 0.95 and acc["n_prompts"] == len(fact_rows(gpt2_world))
    assert acc["tokenizer"]["kind"] == "ByteLevelBPE"
    assert acc["sizes"]["tokens"]["object"]["multi_token_share"] > 0.3
    assert set(acc["sizes"]["n_templates"].values()) == {3, 5}


# ----- exports -------------------------------------------------------------------------------------
def test_gpt2_exports_parse_with_the_project_readers(gpt2_world):
    from lightning_edit.data import read_edits

    kb = gpt2_world.kb
    for fmt, path in (("zsre", gpt2_world.zsre_path), ("counterfact", gpt2_world.counterfact_path)):
        records = read_edits(path, fmt)
        assert len(records) == len(kb.facts)
        for r in records[:50]:
            assert r.subject in r.prompt and r.target_new != r.ground_truth
            assert r.ground_truth == next(f.object for f in kb.facts if f.subject == r.subject
                                          and r.prompt in kb.prompts(f))
            assert r.rephrase_prompts and r.locality
        assert sum(" " in r.target_new for r in records) > 0.3 * len(records)
    lines = gpt2_world.corpus_path.read_text().splitlines()
    assert len(lines) > len(kb.facts) and all(line.endswith(".") for line in lines)


def test_gpt2_mc_task(gpt2_world):
    """The lm-eval task YAML names this world's JSONL (loading it through lm-eval is tested on
    toyworld-small: the same export code wrote both); every question's answer is the true object."""
    import yaml

    task = yaml.safe_load((gpt2_world.mc_dir / "toyworld_mc.yaml").read_text())
    path = Path(task["dataset_kwargs"]["data_files"]["test"])
    assert task["task"] == "toyworld_mc" and path == (gpt2_world.mc_dir / "toyworld_mc.jsonl").resolve()
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(docs) == len(gpt2_world.kb.facts)
    assert all(d["choices"][d["answer"]] == gpt2_world.kb.object_of(d["subject"], d["relation"]) for d in docs)
    assert all(len(set(d["choices"])) == 4 for d in docs) and any(" " in c for d in docs for c in d["choices"])


def test_gpt2_world_rebuilds_the_same_exports_and_tokenizer(gpt2_world, tmp_path):
    from lightning_edit.world.export import corpus_sentences, export_datasets

    kb = SPEC.world.generate(gpt2_world.accuracy["seed"])
    assert kb == gpt2_world.kb
    export_datasets(kb, tmp_path / "data", kb.seed, final_data_dir=gpt2_world.data_dir)
    for path in sorted((tmp_path / "data").rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (gpt2_world.data_dir / path.relative_to(tmp_path / "data")).read_bytes()
    tok = SPEC.tokenizer.train(kb, corpus_sentences(kb, kb.seed), SPEC.model.max_length)
    assert tok.backend_tokenizer.to_str() == gpt2_world.load_tokenizer().backend_tokenizer.to_str()


# ----- the framework sees it -----------------------------------------------------------------------
def test_model_adapter_resolves_gpt2(loaded):
    from transformers.pytorch_utils import Conv1D

    from lightning_edit.models import ModelAdapter

    model, _ = loaded
    adapter = ModelAdapter(model)
    shape = SPEC.model
    assert adapter.layers_name == "h" and adapter.num_layers == shape.n_layer
    assert adapter.hidden_size == shape.n_embd
    last = shape.n_layer - 1
    assert adapter.mlp_name(last) == f"h.{last}.mlp" and adapter.mlp(last) is model.transformer.h[last].mlp
    assert adapter.down_proj_name(last) == f"h.{last}.mlp.c_proj"
    down = adapter.down_proj(last)
    assert isinstance(down, Conv1D) and adapter.intermediate_size(last) == shape.n_inner
    w = adapter.down_proj_weight(last)
    assert w.shape == (shape.n_embd, shape.n_inner) and w.data_ptr() == down.weight.data_ptr()
    # [d_model, d_ff] view: column j is what neuron j writes into the residual stream
    x = torch.zeros(1, shape.n_inner)
    x[0, 5] = 1.0
    assert torch.allclose(down(x)[0] - down.bias, w[:, 5])
    assert adapter.final_norm is model.transformer.ln_f
    assert adapter.unembedding_weight.data_ptr() == adapter.embeddings.weight.data_ptr()
    assert adapter.resolve_hookpoints("h.*.mlp") == [f"h.{i}.mlp" for i in range(shape.n_layer)]


def test_world_for_finds_the_gpt2_world(gpt2_world, loaded):
    from lightning_edit.world import world_for

    model, _ = loaded
    for name in ("toyworld-gpt2-small", model.config._name_or_path):  # model.name, or the world's model folder
        world = world_for(name)
        assert isinstance(world, World) and world.root == gpt2_world.root and world.kb == gpt2_world.kb


def test_rome_stream_runs_on_the_gpt2_world(gpt2_world, tmp_path):
    """`run edit` with ROME's shipped config, 3 edits, on the GPT-2 world: the edits land in the
    Conv1D down projection (stored transposed) and the stream finishes with results."""
    from safetensors.torch import load_file

    from lightning_edit.config import load_config
    from lightning_edit.jobs import edit as edit_job

    cfg = load_config(edit_job.SCHEMA, [
        "config=baselines/rome.yaml", "model.name=toyworld-gpt2-small", f"output_dir={tmp_path}",
        "logger=csv", "threads=1", "trainer.enable_progress_bar=false", "data.limit=3", "eval.checkpoints=[1,3]",
    ])
    assert edit_job.run(cfg) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [row["T"] for row in rows] == [1, 3]
    assert rows[0]["final-state"]["rel"] == 1.0  # the first edit lands
    ledger = json.loads((tmp_path / "edit_state" / "ledger.json").read_text())
    assert len(ledger) == 3
    assert {name for entry in ledger for name in entry["changed"]} == {"h.0.mlp.c_proj.weight"}
    saved = load_file(str(tmp_path / "edit_state" / "tensors.safetensors"))
    assert saved["tensors/h.0.mlp.c_proj.weight"].shape == (SPEC.model.n_inner, SPEC.model.n_embd)  # Conv1D [in, out]
