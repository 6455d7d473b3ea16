"""The embedded default world: knowledge base, tokenizer, trained model, exports, cache."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from lightning_edit.world import (
    SPECS,
    WORLD_NAMES,
    KnowledgeBase,
    World,
    resolve_model_path,
    world_dir,
)
from lightning_edit.world.export import corpus_sentences, export_datasets
from lightning_edit.world.spec import (MLP_WIDTHS, ByteLevelBPE, CompanyShape, GPT2Shape, ModelShape, TrainRecipe,
                                       WordLevelTokenizer, WorldShape, mlp_variant)
from lightning_edit.world.tokenizer import train_tokenizer

SMALL = SPECS["toyworld-small"]


def small_kb(seed: int = 0) -> KnowledgeBase:
    return KnowledgeBase.generate(seed, **asdict(SMALL.world))


# ----- knowledge base ------------------------------------------------------------------------------
def test_kb_deterministic_per_seed():
    assert small_kb(0).to_json() == small_kb(0).to_json()
    assert small_kb(0).to_json() != small_kb(1).to_json()
    assert KnowledgeBase.from_json(small_kb(0).to_json()) == small_kb(0)


@pytest.mark.parametrize("name", list(SPECS))  # the fact worlds (code worlds: tests/code)
def test_kb_shape(name):
    spec = SPECS[name]
    kb = spec.world.generate(0)
    assert kb == spec.world.generate(0) and kb.to_json() != spec.world.generate(1).to_json()
    assert len(kb.relations) >= 4 and len(set(kb.subjects)) == len(kb.subjects) == spec.world.n_subjects
    assert len(kb.facts) == len(kb.subjects) * len(kb.relations)
    objects = [o for r in kb.relations for o in r.objects]
    assert len(objects) == len(set(objects)), "an object belongs to two relations"
    words = [w for s in kb.subjects for w in s.split()]
    assert not set(words) & {w for o in objects for w in o.split()}, "a subject's word is also an object's"
    for rel in kb.relations:
        assert len(rel.templates) >= 3 and all(t.count("{subject}") == 1 for t in rel.templates)
        assert "{subject}" in rel.essence
        if isinstance(spec.tokenizer, WordLevelTokenizer):  # one token per object: one word
            assert all(" " not in o for o in rel.objects)
    for fact in kb.facts:
        assert fact.object in kb.relation(fact.relation).objects
        assert kb.train_templates[(fact.subject, fact.relation)], "a fact with no trained template"
    held_out = sum(len(kb.relation(f.relation).templates) - len(kb.train_templates[(f.subject, f.relation)])
                   for f in kb.facts)
    assert held_out > 0  # some paraphrases are held out of training


def test_built_kb_is_the_generated_one(small_world):
    assert small_world.kb == small_kb(small_world.accuracy["seed"])


# ----- tokenizer -----------------------------------------------------------------------------------
def test_tokenizer_target_is_token_suffix(small_world):
    tok = small_world.load_tokenizer()
    for fact in small_world.kb.facts[:50]:
        for prompt in small_world.kb.prompts(fact):
            prompt_ids = tok(prompt)["input_ids"]
            full = tok(prompt + " " + fact.object)["input_ids"]
            target = tok(fact.object, add_special_tokens=False)["input_ids"]
            assert full[0] == tok.bos_token_id and prompt_ids[0] == tok.bos_token_id
            assert full == prompt_ids + target and len(target) == 1
            assert tok.unk_token_id not in full
            assert tok.decode(full, skip_special_tokens=True) == prompt + " " + fact.object


def test_tokenizer_deterministic(small_world):
    kb = small_world.kb
    texts = corpus_sentences(kb, kb.seed) + kb.vocabulary_words()
    a, b = train_tokenizer(texts, 256), train_tokenizer(texts, 256)
    assert a.get_vocab() == b.get_vocab() == small_world.load_tokenizer().get_vocab()


# ----- the model knows its world -------------------------------------------------------------------
def test_model_knows_its_world(small_world):
    """Teacher-forced object accuracy over all facts and templates, from the saved HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(small_world.model_dir).eval()
    tok = AutoTokenizer.from_pretrained(small_world.model_dir)
    rows = [(p, f.object) for f in small_world.kb.facts for p in small_world.kb.prompts(f)]
    enc = tok([p + " " + o for p, o in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    pos = torch.tensor([len(tok(p)["input_ids"]) for p, _ in rows])  # the object's position
    gold = enc["input_ids"][torch.arange(len(rows)), pos]
    assert (gold == torch.tensor([tok.convert_tokens_to_ids(o) for _, o in rows])).all()
    acc = (logits[torch.arange(len(rows)), pos - 1].argmax(-1) == gold).float().mean().item()
    assert acc >= 0.95, f"the model knows only {acc:.1%} of its facts"
    assert abs(acc - small_world.accuracy["accuracy"]) < 0.01


def test_accuracy_record(small_world):
    acc = small_world.accuracy
    assert acc["accuracy"] >= 0.95
    assert set(acc["per_relation"]) == {r.name for r in small_world.kb.relations}
    assert acc["n_prompts"] == sum(len(small_world.kb.prompts(f)) for f in small_world.kb.facts)
    for key in ("build_seconds", "held_out_pairs", "trained_pairs", "sizes", "model"):
        assert key in acc


# ----- exports -------------------------------------------------------------------------------------
def test_zsre_export(small_world):
    records = json.loads(small_world.zsre_path.read_text())
    assert len(records) == len(small_world.kb.facts)
    kb = small_world.kb
    for r in records[:100]:
        assert {"subject", "src", "rephrase", "alt", "answers", "loc", "loc_ans"} <= set(r)
        true = kb.object_of(r["subject"], r["relation_id"])
        assert r["answers"] == [true] and r["alt"] != true
        assert r["alt"] in kb.relation(r["relation_id"]).objects
        assert r["subject"] in r["src"] and r["subject"] in r["rephrase"] and r["src"] != r["rephrase"]
        assert r["subject"] not in r["loc"] and isinstance(r["loc_ans"], str)


def test_counterfact_export(small_world):
    records = json.loads(small_world.counterfact_path.read_text())
    kb = small_world.kb
    assert len(records) == len(kb.facts)
    for r in records[:100]:
        rw = r["requested_rewrite"]
        assert "{}" in rw["prompt"] and "{subject}" not in rw["prompt"]
        true, new = rw["target_true"]["str"], rw["target_new"]["str"]
        assert true == kb.object_of(rw["subject"], rw["relation_id"]) and new != true
        assert new in kb.relation(rw["relation_id"]).objects
        assert r["paraphrase_prompts"] and all(rw["subject"] in p for p in r["paraphrase_prompts"])
        assert len(r["neighborhood_prompts"]) == len(r["neighborhood_answers"])
        assert all(a == true for a in r["neighborhood_answers"])
        assert all(rw["subject"] not in p for p in r["neighborhood_prompts"])
        assert len(r["attribute_prompts"]) == len(r["attribute_answers"])
        assert all(a == new for a in r["attribute_answers"])
        assert r["generation_prompts"] == [] and isinstance(r["case_id"], int)
    assert sum(bool(r["neighborhood_prompts"]) for r in records) > 0.9 * len(records)


def test_corpus(small_world):
    lines = small_world.corpus_path.read_text().splitlines()
    assert len(lines) > len(small_world.kb.facts) and all(lines)
    tok = small_world.load_tokenizer()
    assert tok.unk_token_id not in tok(lines[:200], add_special_tokens=False)["input_ids"][0]


def test_mc_task(small_world):
    path = small_world.mc_dir / "toyworld_mc.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(small_world.kb.facts)
    for row in rows:
        assert {"question", "choices", "answer"} <= set(row)
        assert len(set(row["choices"])) == len(row["choices"]) == 4
        assert row["choices"][row["answer"]] == small_world.kb.object_of(row["subject"], row["relation"])
    yaml_text = (small_world.mc_dir / "toyworld_mc.yaml").read_text()
    assert "task: toyworld_mc" in yaml_text and str(path.resolve()) in yaml_text


def test_mc_task_loads_in_lm_eval(small_world):
    from lm_eval import tasks  # the [eval] extra, installed by the README's test command

    manager = tasks.TaskManager(include_path=str(small_world.mc_dir))
    task = manager.load(["toyworld_mc"])["tasks"]["toyworld_mc"]
    assert len(list(task.test_docs())) == len(small_world.kb.facts)


def test_exports_deterministic(small_world, tmp_path):
    """Rebuilding the exports from the same seed gives the built world's files byte for byte."""
    kb = small_kb(small_world.accuracy["seed"])
    export_datasets(kb, tmp_path / "data", kb.seed, final_data_dir=small_world.data_dir)
    for path in sorted((tmp_path / "data").rglob("*")):
        if path.is_file():
            built = small_world.data_dir / path.relative_to(tmp_path / "data")
            assert path.read_bytes() == built.read_bytes(), f"{built} differs from a rebuild"


# ----- training determinism ------------------------------------------------------------------------
TINY = {
    "llama": (WorldShape(n_subjects=20, n_relations=2, n_objects=6), WordLevelTokenizer(),
              ModelShape(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64), TrainRecipe(batch_size=16, warmup_steps=2)),
    "gpt2": (CompanyShape(n_subjects=20, n_relations=2, n_objects=6), ByteLevelBPE(vocab_size=400),
             GPT2Shape(n_embd=32, n_layer=1, n_head=2, n_inner=64, n_positions=64),
             TrainRecipe(batch_size=16, warmup_steps=2, length_buckets=2)),
}
"""A few-second world of each kind: (knowledge, tokenizer, model, recipe)."""


@pytest.mark.parametrize("kind", sorted(TINY))
def test_training_steps_deterministic(kind):
    """Model weights: a few Lightning steps from the same seed give identical weights (a full
    second training run is too slow for the suite)."""
    from lightning_edit.world.train import train_world_model

    world, tokenizer, shape, recipe = TINY[kind]
    kb = world.generate(0)
    tok = tokenizer.train(kb, corpus_sentences(kb, 0), 64)

    def weights(seed):
        result = train_world_model(kb, tok, shape, recipe, seed, max_steps=3, progress=False)
        assert result.steps == 3
        return result.model.state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_length_buckets_cover_every_row_once_and_trim_padding():
    from lightning_edit.world.train import LengthBuckets, trim_padding

    lengths = [3, 9, 4, 7, 2, 8, 5, 6, 1, 9, 3]
    sampler = LengthBuckets(lengths, batch_size=3, chunk_batches=2, generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4 and sorted(i for b in batches for i in b) == list(range(11))
    assert list(sampler) != batches  # a new order every epoch
    rows = [(torch.arange(9), (torch.arange(9) < n).long(), torch.zeros(9, dtype=torch.bool)) for n in (2, 5)]
    ids, mask, obj = trim_padding(rows)
    assert ids.shape == mask.shape == obj.shape == (2, 5) and mask.sum().item() == 7


# ----- cache and resolution ------------------------------------------------------------------------
def test_world_dir(tmp_path, monkeypatch):
    assert world_dir("toyworld", 3, tmp_path).parent == tmp_path / "worlds"
    assert world_dir("toyworld", 3, tmp_path).name.startswith("toyworld-seed3-v")
    monkeypatch.setenv("LIGHTNING_EDIT_CACHE", str(tmp_path / "env"))
    assert world_dir("toyworld-small").parent == tmp_path / "env" / "worlds"
    with pytest.raises(ValueError, match="toyworld-small"):
        world_dir("toyworld-large")


@pytest.mark.parametrize("width", MLP_WIDTHS)
def test_mlp_width_variant_is_toyworld_with_a_wider_mlp(width, tmp_path):
    """`toyworld-mlp<N>` (the width study): toyworld's facts, tokenizer, depth and hidden size, MLP N
    wide, in its own cache folder. Only the spec and an untrained model are built here."""
    from dataclasses import replace

    name, base = f"toyworld-mlp{width}", SPECS["toyworld"]
    spec = SPECS[name]
    assert name in WORLD_NAMES and spec.model.intermediate_size == width != base.model.intermediate_size
    assert replace(spec, model=base.model) == base  # nothing else differs
    assert world_dir(name, 0, tmp_path) != world_dir("toyworld", 0, tmp_path)
    tokenizer = train_tokenizer(small_kb().vocabulary_words(), 32)
    model = spec.model.build(tokenizer)
    hidden = base.model.hidden_size
    assert len(model.model.layers) == base.model.num_hidden_layers
    for layer in model.model.layers:
        assert layer.mlp.up_proj.weight.shape == layer.mlp.gate_proj.weight.shape == (width, hidden)
        assert layer.mlp.down_proj.weight.shape == (hidden, width)
    assert mlp_variant(spec, 512) == base
    with pytest.raises(TypeError, match="GPT2Shape"):
        mlp_variant(SPECS["toyworld-gpt2"], width)


def test_resolve_model_path(small_world):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    path = resolve_model_path("toyworld-small")
    assert path == small_world.model_dir and (path / "config.json").is_file()
    assert isinstance(AutoModelForCausalLM.from_pretrained(path), LlamaForCausalLM)
    assert resolve_model_path("gpt2") is None
    assert resolve_model_path("meta-llama/Meta-Llama-3-8B") is None
    assert World.open(small_world.root).kb == small_world.kb


def test_large_gpt2_world_is_toyworld_gpt2_with_more_companies(tmp_path):
    """`toyworld-gpt2-large` (issue 15's T = 1000 stream on the GPT-2 world): toyworld-gpt2's model,
    tokenizer kind and recipe, more companies, enough facts for 1,000 edits with neighbours left over."""
    from dataclasses import replace

    name, base = "toyworld-gpt2-large", SPECS["toyworld-gpt2"]
    spec = SPECS[name]
    assert name in WORLD_NAMES and replace(spec, world=base.world) == base
    kb, kb_base = spec.world.generate(0), base.world.generate(0)
    assert len(kb.facts) >= 1100 > len(kb_base.facts) and len(kb.subjects) == len(set(kb.subjects))
    assert world_dir(name, 0, tmp_path) != world_dir("toyworld-gpt2", 0, tmp_path)
