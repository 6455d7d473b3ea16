"""One cluster edit on `codeworld-small`: the correction knowledge of a compiler-error cluster, edited
in through an ordinary editor, makes translations of *other* samples of that cluster compile."""

import torch

from lightning_edit.code.clusters import ErrorClusters
from lightning_edit.code.kecode import KECodeHarness, edit_split, load_samples, locality_pairs, training_programs
from lightning_edit.code.metrics import kecode_scores
from lightning_edit.code.translate import editor_generate, model_generate

STRING = "undefined identifier `String`, did you mean alias `string`?"


def test_one_cluster_edit_raises_the_clusters_compile_rate(code_world):
    from lightning_edit.code.compiler import DRunner
    from lightning_edit.code.world import exec_cache_dir
    from lightning_edit.jobs.edit_run import new_editor
    from lightning_edit.models import ModelAdapter, load_model

    torch.set_num_threads(1)
    samples = load_samples(code_world.kecode_path)
    harness = KECodeHarness(samples, DRunner(cache_dir=exec_cache_dir()), progress=False)
    model, tokenizer = load_model(str(code_world.model_dir))
    before = harness.run(model_generate(model, tokenizer))
    clusters = ErrorClusters(min_size=3).fit([t.signature for t in before])
    target = clusters.ids[STRING]
    outcomes_before = harness.outcomes(before, clusters)
    members = [i for i, o in outcomes_before.items() if o.cluster == target]
    edited, held = edit_split(members, 3, seed=0, cluster=target)
    records = [harness.correction(i, before[i]) for i in edited]
    assert all(r is not None and r.target_new == "string" for r in records), [r and r.target_new for r in records]
    programs = training_programs(code_world)
    for r in records:
        r.locality = locality_pairs(programs, 3, 0, str(r.case_id))
        assert all(p.prompt not in {s.program.java for s in samples} for p in r.locality)

    editor = new_editor("rome", {"layer": 0, "position": "last", "context_templates": ["{}"]},
                        model, tokenizer, ModelAdapter(model), {}, "codeworld-small", world=code_world)
    editor.prepare(code_world.corpus_path.read_text().splitlines())
    for record in records:
        editor.apply([record])
    after = harness.run(editor_generate(editor))
    outcomes_after = harness.outcomes(after, clusters)

    held_compiled = sum(outcomes_after[i].compiled for i in held) / len(held)
    assert sum(outcomes_before[i].compiled for i in held) == 0  # a cluster is made of failures
    assert held_compiled >= 0.1, held_compiled  # before the edit: 0 by definition
    scores = kecode_scores(target, outcomes_before, outcomes_after,
                           heldout=[i for i in range(len(samples)) if i not in edited])
    assert scores["compile_rate"] == held_compiled and scores["generalization"] >= 0.5
    assert scores["specificity"] >= 0.8
