"""The world's knowledge written in the formats real data comes in: ZsRE and CounterFact edit files,
a text corpus, and a multiple-choice task with its lm-evaluation-harness YAML.

Every edit is a counterfactual rewrite of one fact to another object of the same relation, chosen by
seed; both edit files hold the same rewrites in the same (seeded) order, one per fact.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from lightning_edit.constants import WORLD_CORPUS, WORLD_COUNTERFACT, WORLD_MC_DIR, WORLD_ZSRE

from .knowledge import Fact, KnowledgeBase

MC_TASK = "toyworld_mc"
N_NEIGHBOURS = 10
"""CounterFact neighbourhood / attribute prompts per case (the real dataset has 10)."""
N_CHOICES = 4


@dataclass(frozen=True)
class Rewrite:
    """One counterfactual edit of `fact`: its prompt template, a rephrase template, the new object."""

    fact: Fact
    template: int
    rephrase_template: int
    target_new: str


def plan_rewrites(kb: KnowledgeBase, seed: int) -> list[Rewrite]:
    """One rewrite per fact, in a seeded order (so the first T edits mix subjects and relations)."""
    rng = random.Random(f"rewrites:{seed}")
    rewrites = []
    for fact in kb.facts:
        rel = kb.relation(fact.relation)
        template = rng.randrange(len(rel.templates))
        rephrase = rng.choice([t for t in range(len(rel.templates)) if t != template] or [template])
        new = rng.choice([o for o in rel.objects if o != fact.object])
        rewrites.append(Rewrite(fact, template, rephrase, new))
    rng.shuffle(rewrites)
    return rewrites


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def zsre_records(kb: KnowledgeBase, rewrites: list[Rewrite], seed: int) -> list[dict]:
    """EasyEdit/MEMIT ZsRE: src, alt (new target), answers (true), rephrase, loc/loc_ans (an unrelated fact)."""
    rng = random.Random(f"zsre-loc:{seed}")
    records = []
    for i, rw in enumerate(rewrites):
        prompts = kb.prompts(rw.fact)
        loc = rng.choice(kb.facts)
        while loc.subject == rw.fact.subject or loc.relation == rw.fact.relation:  # another subject and relation
            loc = rng.choice(kb.facts)
        records.append({
            "case_id": i,
            "subject": rw.fact.subject,
            "src": prompts[rw.template],
            "rephrase": prompts[rw.rephrase_template],
            "alt": rw.target_new,
            "answers": [rw.fact.object],
            "loc": rng.choice(kb.prompts(loc)),
            "loc_ans": loc.object,
            "relation_id": rw.fact.relation,
        })
    return records


def counterfact_records(kb: KnowledgeBase, rewrites: list[Rewrite], seed: int) -> list[dict]:
    """CounterFact: the rewrite, paraphrases (other templates), neighbourhood prompts (other subjects
    whose true answer is target_true, same relation) and attribute prompts (answer target_new), with
    their answers in extra fields since this world knows them."""
    rng = random.Random(f"counterfact:{seed}")
    records = []
    for i, rw in enumerate(rewrites):
        rel = kb.relation(rw.fact.relation)
        prompts = kb.prompts(rw.fact)
        others = [f for f in kb.facts_of(rel.name) if f.subject != rw.fact.subject]
        neighbours = rng.sample([f for f in others if f.object == rw.fact.object],
                                k=min(N_NEIGHBOURS, sum(f.object == rw.fact.object for f in others)))
        attributes = rng.sample([f for f in others if f.object == rw.target_new],
                                k=min(N_NEIGHBOURS, sum(f.object == rw.target_new for f in others)))
        neighbour_prompts = [rng.choice(kb.prompts(f)) for f in neighbours]
        attribute_prompts = [rng.choice(kb.prompts(f)) for f in attributes]
        records.append({
            "case_id": i,
            "requested_rewrite": {
                "prompt": rel.templates[rw.template].replace("{subject}", "{}"),
                "subject": rw.fact.subject,
                "target_new": {"str": rw.target_new},
                "target_true": {"str": rw.fact.object},
                "relation_id": rel.name,
            },
            "paraphrase_prompts": [p for t, p in enumerate(prompts) if t != rw.template],
            "neighborhood_prompts": neighbour_prompts,
            "neighborhood_answers": [f.object for f in neighbours],
            "attribute_prompts": attribute_prompts,
            "attribute_answers": [f.object for f in attributes],
            "generation_prompts": [],
        })
    return records


def corpus_sentences(kb: KnowledgeBase, seed: int) -> list[str]:
    """Every fact in every template plus the filler sentences, in a seeded order."""
    lines = [kb.sentence(f, t) for f in kb.facts for t in range(len(kb.relation(f.relation).templates))]
    lines += kb.filler
    random.Random(f"corpus:{seed}").shuffle(lines)
    return lines


def mc_records(kb: KnowledgeBase, seed: int) -> list[dict]:
    """One question per fact: a prompt, the true object among N_CHOICES objects of its relation."""
    rng = random.Random(f"mc:{seed}")
    records = []
    for fact in kb.facts:
        rel = kb.relation(fact.relation)
        choices = rng.sample([o for o in rel.objects if o != fact.object], N_CHOICES - 1)
        answer = rng.randrange(N_CHOICES)
        choices.insert(answer, fact.object)
        records.append({"question": rng.choice(kb.prompts(fact)), "choices": choices, "answer": answer,
                        "subject": fact.subject, "relation": fact.relation})
    return records


def mc_task_yaml(jsonl_path: Path) -> str:
    """lm-evaluation-harness task: log-likelihood of " choice" after the prompt, accuracy."""
    return (
        f"task: {MC_TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(jsonl_path))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


def export_datasets(kb: KnowledgeBase, data_dir: Path, seed: int, final_data_dir: Path | None = None) -> None:
    """Write zsre.json, counterfact.json, corpus.txt/.jsonl and mc/ under `data_dir`.

    final_data_dir: where `data_dir` will live once the build is moved into place; the MC YAML names
    its JSONL by that absolute path (lm-eval resolves data files from the working directory).
    """
    data_dir = Path(data_dir)
    (data_dir / WORLD_MC_DIR).mkdir(parents=True, exist_ok=True)
    rewrites = plan_rewrites(kb, seed)
    _write_json(data_dir / WORLD_ZSRE, zsre_records(kb, rewrites, seed))
    _write_json(data_dir / WORLD_COUNTERFACT, counterfact_records(kb, rewrites, seed))
    lines = corpus_sentences(kb, seed)
    (data_dir / WORLD_CORPUS).write_text("\n".join(lines) + "\n")
    (data_dir / "corpus.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in lines))
    mc = mc_records(kb, seed)
    (data_dir / WORLD_MC_DIR / f"{MC_TASK}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    jsonl = Path(final_data_dir or data_dir).resolve() / WORLD_MC_DIR / f"{MC_TASK}.jsonl"
    (data_dir / WORLD_MC_DIR / f"{MC_TASK}.yaml").write_text(mc_task_yaml(jsonl))
