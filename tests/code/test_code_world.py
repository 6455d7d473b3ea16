"""The embedded code world (`codeworld-small`): programs, the LM's systematic mistakes as real ldc2
clusters, and the documented exports."""

import json
import random

from lightning_edit.code.format import d_source, sequence, statement_pairs
from lightning_edit.code.lexer import canonical, lex, pretty
from lightning_edit.code.programs import TEMPLATES, generate_programs, make_program, SlotRandom

DESIGNED = {
    "string_type": "undefined identifier `String`, did you mean alias `string`?",
    "println": "identifier or `new` expected following `.`, not `out`",
    "length_int": "cannot implicitly convert expression `<id>.length` of type `ulong` to `int`",
    "bool_type": "undefined identifier `boolean`",
}


def test_every_template_pairs_java_and_d_line_by_line():
    rng = SlotRandom(0, pool=4)
    for tpl in TEMPLATES:
        prog = make_program(tpl, rng)
        pairs = statement_pairs(prog, "d")
        assert d_source([d for _, d in pairs]).split() != []
        assert canonical(pretty(prog.d)) == prog.d  # formatting never changes the tokens
        train = statement_pairs(prog, "dtrain")
        assert [j for j, _ in train] == [j for j, _ in pairs]
        assert (prog.d == prog.dtrain) == (not prog.mistakes)
    text = sequence(statement_pairs(make_program(TEMPLATES[0], rng), "dtrain"))
    assert text.startswith("<j> public class Main { <d> <j> public static")


def test_program_sets_are_seeded_and_disjoint():
    a = generate_programs(50, 0, "train", pool=4)
    assert [p.java for p in a] == [p.java for p in generate_programs(50, 0, "train", pool=4)]
    b = generate_programs(50, 0, "kecode", exclude={p.java for p in a}, pool=4)
    assert not {p.java for p in a} & {p.java for p in b}
    assert lex('x = "ab" ~ \'c\' ; y >>= 2 ;') == ["x", "=", '"ab"', "~", "'c'", ";", "y", ">>=", "2", ";"]


def test_the_lm_reproduces_the_designed_mistakes_as_compiler_clusters(code_world):
    record = code_world.record
    signatures = {c["signature"]: c for c in json.loads(code_world.clusters_path.read_text())["clusters"]}
    for mistake, sig in DESIGNED.items():
        assert sig in signatures, f"{mistake}: no cluster {sig!r} (clusters: {list(signatures)})"
        assert signatures[sig]["size"] >= 3
        assert signatures[sig]["example"]["error"].startswith("prog_")
    assert 0 < record["translation"]["compile_rate"] < 1
    assert record["d_token_accuracy"] >= record["train"]["required_accuracy"]


def test_exports_hold_their_documented_fields(code_world, runner):
    from lightning_edit.code.compiler import Unit
    from lightning_edit.code.kecode import load_samples

    samples = json.loads(code_world.kecode_path.read_text())
    for s in samples:
        assert {"java", "d_reference", "tests", "cluster", "d_generated", "errors", "unittest"} <= set(s)
        assert all({"call", "expected", "stdout"} <= set(t) for t in s["tests"])
        assert (s["cluster"] is None) == (not s["errors"])
    # the references pass their own tests (the build checked all; re-check a few here)
    loaded = load_samples(code_world.kecode_path)
    picked = random.Random(0).sample(loaded, 6)
    results = runner.evaluate([Unit(str(s.id), d_source(s.ref_lines), s.tests) for s in picked])
    assert all(r.passed for r in results), [r.errors for r in results]
    patch = json.loads(code_world.ment_patch_path.read_text())
    errors = [p for p in patch if p["error"]]
    assert errors and all(p["error"]["prompt"].startswith(p["prompt"]) for p in errors)
    assert all(p["ground_truth"].split()[p["error"]["position"]] == p["error"]["target"] for p in errors
               if p["error"]["position"] < len(p["ground_truth"].split()))
    probe = json.loads(code_world.ment_probe_path.read_text())
    n = code_world.record["world"]["probe_prompts"]
    assert len(probe) == 5 * n * 3
    assert {p["subtype"] for p in probe} == {"assign", "assign_multiply", "arithmetic_mod", "bit_logical_and",
                                             "comparison_ge"}


def test_the_lm_loads_by_name(code_world):
    from lightning_edit.models import load_model
    from lightning_edit.world import world_for

    model, tokenizer = load_model("codeworld-small")
    assert world_for(model.config._name_or_path).root == code_world.root
    ids = tokenizer("<j> int n = cast ( int ) s . length ;")["input_ids"]
    assert tokenizer.unk_token_id not in ids and ids[0] == tokenizer.bos_token_id
