"""Edit-file readers: each real format, autodetection, jsonl, round trip, and malformed records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_edit.data import EditDataError, EditRecord, LocalityPair, detect_format, read_edits, write_edits

# Records shaped like the public files (zsre_mend_eval.json, counterfact.json, KnowEdit,
# EasyEdit/WISE hallucination-edit.json).
ZSRE = {
    "subject": "Watts Humphrey",
    "src": "What university did Watts Humphrey attend?",
    "pred": "Trinity College",
    "rephrase": "What university did Watts Humphrey take part in?",
    "alt": "University of Michigan",
    "answers": ["Illinois Institute of Technology"],
    "loc": "nq question: who played desmond doss father in hacksaw ridge",
    "loc_ans": "Hugo Weaving",
    "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?",
}

COUNTERFACT = {
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": [
        "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
        "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language",
    ],
    "neighborhood_prompts": [
        "The mother tongue of L\u00e9on Blum is",
        "The native language of Montesquieu is",
    ],
    "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}

KNOWEDIT_ZSRE = {
    "subject": "Epaspidoceras",
    "target_new": "Noctuidae",
    "prompt": "Which family does Epaspidoceras belong to?",
    "ground_truth": ["Aspidoceratidae"],
    "rephrase_prompt": "What family are Epaspidoceras?",
    "cond": "Geometridae >> Noctuidae || Which family does Epaspidoceras belong to?",
    "locality": {
        "Relation_Specificity": [
            {"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]},
            {"prompt": "Epaspidoceras taxon rank", "ground_truth": ["genus"]},
        ]
    },
    "portability": {
        "Reasoning": [
            {"prompt": "What is the common name for the family Epaspidoceras belongs to?",
             "ground_truth": "Owlet moths"}
        ]
    },
}

KNOWEDIT_COUNTERFACT = {
    "subject": "Frederic Piesch",
    "prompt": "The name of the position held by Frederic Piesch is",
    "target_new": "Archbishop of Le\u00f3n, Mexico",
    "ground_truth": "mayor of Vienna",
    "portability": {"Subject_Aliasing": [
        {"prompt": "The name of the position held by Frederic of Pieschen is",
         "ground_truth": "Archbishop of Le\u00f3n, Mexico"}]},
    "locality": {
        "Relation_Specificity": [{"prompt": "The gender of Frederic Piesch is", "ground_truth": "male"}],
        "Forgetfulness": [{
            "prompt": "The name of the position held by Frederic Piesch, which is not Archbishop of Le\u00f3n, Mexico, is",
            "ground_truth": "mayor of Vienna"}],
    },
}

EASYEDIT_FLAT = {
    "prompt": "Ray Charles, the",
    "target_new": "violin",
    "ground_truth": "piano",
    "subject": "Ray Charles",
    "rephrase_prompt": ["Ray Charles plays the", "The instrument of Ray Charles is the"],
    "locality_prompt": ["Joseph Fischhof, the", "Larry Bird is a professional"],
    "locality_ground_truth": ["piano", ["basketball", "basketball player"]],
}

WISE_HALLUCINATION = {
    "prompt": "This is a Wikipedia passage about heinz christian pander. Heinz Christian Pander "
              "(1794 - 1865) was a German anatomist and embryologist who was born in Riga, Latvia.",
    "target_new": "He studied medicine at the University of Dorpat and later at the University of Berlin.",
    "subject": "heinz christian pander",
    "locality_prompt": "Tired and restlessly, drifting in and out of sleep.",
    "locality_ground_truth": "Hearing crashing and banging, thinking the roof will cave in.",
}

KNOWEDIT_WIKIBIO = {
    "text": "This is a Wikipedia passage about john russell reynolds. Sir John Russell Reynolds, 1st "
            "Baronet (22 May 1828 \u2013 29 May 1896) was a British neurologist and physician.",
    "labels": "He received general education from his father, and was educated in his profession at "
              "University College, London.",
    "concept": "john russell reynolds",
    "locality": {"Relation_Specificity": [
        {"prompt": "The field of work of john russell reynolds is", "ground_truth": ["medicine"]}]},
}


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_zsre(tmp_path):
    second = dict(ZSRE, alt="Harvard University", rephrase=["Which school did Watts Humphrey go to?"])
    path = write_json(tmp_path / "zsre.json", [ZSRE, second])
    records = read_edits(path)
    r = records[0]
    assert r.prompt == ZSRE["src"] and r.target_new == "University of Michigan"
    assert r.subject == "Watts Humphrey" and r.ground_truth == "Illinois Institute of Technology"
    assert r.rephrase_prompts == [ZSRE["rephrase"]]
    # The "nq question: " prefix is kept verbatim.
    assert r.locality == [LocalityPair("nq question: who played desmond doss father in hacksaw ridge", "Hugo Weaving")]
    assert r.kind == "fact" and r.case_id == 0 and r.source == str(path)
    assert r.extra["pred"] == "Trinity College" and "cond" in r.extra
    assert records[1].case_id == 1 and records[1].rephrase_prompts == ["Which school did Watts Humphrey go to?"]


def test_counterfact(tmp_path):
    with_answers = json.loads(json.dumps(COUNTERFACT))
    with_answers["case_id"] = 7
    with_answers["neighborhood_prompts"] = [{"prompt": "The native language of Montesquieu is", "target": "French"},
                                            {"prompt": "Albert Camus spoke", "answer": "Arabic"}]
    records = read_edits(write_json(tmp_path / "counterfact.json", [COUNTERFACT, with_answers]))
    r = records[0]
    assert r.prompt == "The mother tongue of Danielle Darrieux is"
    assert (r.target_new, r.ground_truth, r.subject) == ("English", "French", "Danielle Darrieux")
    assert r.rephrase_prompts == COUNTERFACT["paraphrase_prompts"]
    # Neighbours keep the true object: that is their answer.
    assert r.locality == [LocalityPair(p, "French") for p in COUNTERFACT["neighborhood_prompts"]]
    assert r.extra["prompt_template"] == "The mother tongue of {} is" and r.extra["relation_id"] == "P103"
    assert r.extra["attribute_prompts"] == COUNTERFACT["attribute_prompts"] and r.extra["pararel_idx"] == 2796
    assert records[1].case_id == 7
    assert [p.answer for p in records[1].locality] == ["French", "Arabic"]


def test_knowedit_nested_locality_and_portability(tmp_path):
    records = read_edits(write_json(tmp_path / "ZsRE-test-all.json", [KNOWEDIT_ZSRE, KNOWEDIT_COUNTERFACT]))
    zsre, cf = records
    assert zsre.ground_truth == "Aspidoceratidae" and zsre.rephrase_prompts == ["What family are Epaspidoceras?"]
    assert zsre.locality == [LocalityPair("The taxon rank of Epaspidoceras is", "genus"),
                             LocalityPair("Epaspidoceras taxon rank", "genus")]
    assert zsre.extra["portability"] == KNOWEDIT_ZSRE["portability"]
    assert zsre.extra["ground_truth_aliases"] == ["Aspidoceratidae"]
    assert cf.target_new == "Archbishop of Le\u00f3n, Mexico" and cf.ground_truth == "mayor of Vienna"
    assert [p.answer for p in cf.locality] == ["male", "mayor of Vienna"]
    assert "portability" in cf.extra and "locality" not in cf.extra


def test_easyedit_flat_jsonl(tmp_path):
    second = dict(EASYEDIT_FLAT, rephrase_prompt="Ray Charles is known for the",
                  locality_prompt="Joseph Fischhof, the", locality_ground_truth="piano")
    path = write_jsonl(tmp_path / "edits.jsonl", [EASYEDIT_FLAT, second])
    first, other = read_edits(path)
    assert first.rephrase_prompts == EASYEDIT_FLAT["rephrase_prompt"]
    # An alias list answers with its first alias.
    assert first.locality == [LocalityPair("Joseph Fischhof, the", "piano"),
                              LocalityPair("Larry Bird is a professional", "basketball")]
    assert other.rephrase_prompts == ["Ray Charles is known for the"]
    assert other.locality == [LocalityPair("Joseph Fischhof, the", "piano")]


def test_locality_without_answers(tmp_path):
    record = dict(EASYEDIT_FLAT)
    del record["locality_ground_truth"]
    (r,) = read_edits(write_json(tmp_path / "e.json", [record]))
    assert [p.answer for p in r.locality] == [None, None]


@pytest.mark.parametrize("raw", [WISE_HALLUCINATION, KNOWEDIT_WIKIBIO])
def test_selfcheckgpt(tmp_path, raw):
    (r,) = read_edits(write_json(tmp_path / "hallucination-edit.json", [raw]))
    assert r.kind == "hallucination"
    assert r.prompt == raw.get("prompt", raw.get("text"))
    assert r.target_new == raw.get("target_new", raw.get("labels"))
    assert r.subject in ("heinz christian pander", "john russell reynolds")
    assert len(r.locality) == 1 and r.locality[0].answer


@pytest.mark.parametrize("raw, expected", [
    (ZSRE, "zsre"), (COUNTERFACT, "counterfact"), (KNOWEDIT_ZSRE, "easyedit"), (EASYEDIT_FLAT, "easyedit"),
    (WISE_HALLUCINATION, "selfcheckgpt"), (KNOWEDIT_WIKIBIO, "selfcheckgpt"),
])
def test_detect_format(raw, expected):
    assert detect_format(raw) == expected


def test_undecidable_format_lists_formats_and_keys(tmp_path):
    path = write_json(tmp_path / "odd.json", [{"question": "q?", "answer": "a"}])
    with pytest.raises(EditDataError) as err:
        read_edits(path)
    message = str(err.value)
    assert "odd.json" in message and "['answer', 'question']" in message
    for name in ("zsre", "counterfact", "easyedit", "selfcheckgpt"):
        assert name in message


def test_explicit_format_and_unknown_format(tmp_path):
    path = write_json(tmp_path / "h.json", [dict(EASYEDIT_FLAT)])
    assert read_edits(path, format="selfcheckgpt")[0].kind == "hallucination"
    with pytest.raises(EditDataError, match="field 'src' is missing"):
        read_edits(path, format="zsre")
    with pytest.raises(ValueError, match="unknown edit format"):
        read_edits(path, format="mquake")


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_write_read_round_trip(tmp_path, suffix):
    records = (read_edits(write_json(tmp_path / "a.json", [ZSRE])) + read_edits(write_json(tmp_path / "b.json", [COUNTERFACT]))
               + read_edits(write_json(tmp_path / "c.json", [KNOWEDIT_ZSRE])) + read_edits(write_json(tmp_path / "d.json", [WISE_HALLUCINATION])))
    records[2].locality.append(LocalityPair("An answerless prompt", None))
    path = write_edits(records, tmp_path / f"out/all{suffix}")
    back = read_edits(path)
    for before, after in zip(records, back, strict=True):
        assert after.source == str(path)
        after.source = before.source
        assert after == before
    assert EditRecord.from_dict(json.loads(json.dumps(records[1].to_dict()))) == records[1]


@pytest.mark.parametrize("raw", [ZSRE, COUNTERFACT, KNOWEDIT_ZSRE, WISE_HALLUCINATION],
                         ids=["zsre", "counterfact", "knowedit", "selfcheckgpt"])
def test_training_paraphrases_come_only_from_the_field_marked_for_training(tmp_path, raw):
    (plain,) = read_edits(write_json(tmp_path / "plain.json", [raw]))
    assert plain.training_paraphrases == []  # the rephrases a dataset ships are scored, never trained on
    marked = dict(raw, training_paraphrases=["A paraphrase to train on", "Another one"])
    (record,) = read_edits(write_json(tmp_path / "marked.json", [marked]))
    assert record.training_paraphrases == ["A paraphrase to train on", "Another one"]
    assert record.rephrase_prompts == plain.rephrase_prompts and "training_paraphrases" not in record.extra
    (back,) = read_edits(write_edits([record], tmp_path / "back.json"))
    assert back.training_paraphrases == record.training_paraphrases
    with pytest.raises(EditDataError, match=r"field 'training_paraphrases\[0\]' has type number"):
        read_edits(write_json(tmp_path / "bad.json", [dict(raw, training_paraphrases=[3])]))


# Malformed records: each names the file, the record, the field and what was expected.

def _bad(raw: dict, **changes) -> dict:
    out = json.loads(json.dumps(raw))
    for key, value in changes.items():
        if value is ...:
            del out[key]
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("records, fragments", [
    ([ZSRE, ZSRE, ZSRE, _bad(ZSRE, alt=...)],
     ["zsre.json: record 3: field 'alt' is missing (expected a non-empty string)"]),
    ([ZSRE, _bad(ZSRE, alt=["Harvard"])], ["record 1", "field 'alt' has type array", "expected a non-empty string"]),
    ([ZSRE, _bad(ZSRE, rephrase=[3])], ["record 1", "field 'rephrase[0]' has type number"]),
    ([EASYEDIT_FLAT, _bad(EASYEDIT_FLAT, target_new="  ")], ["record 1", "field 'target_new' is an empty string"]),
    ([EASYEDIT_FLAT, _bad(EASYEDIT_FLAT, locality_ground_truth=["piano"])],
     ["record 1", "field 'locality_ground_truth' has 1 entries", "expected an array of 2 answers"]),
    ([KNOWEDIT_ZSRE, _bad(KNOWEDIT_ZSRE, locality={"Relation_Specificity": [{"ground_truth": ["genus"]}]})],
     ["record 1", "field 'locality.Relation_Specificity[0].prompt' is missing"]),
    ([COUNTERFACT, _bad(COUNTERFACT, requested_rewrite=dict(COUNTERFACT["requested_rewrite"], prompt="The mother tongue of X is"))],
     ["record 1", "field 'requested_rewrite.prompt' has no '{}' placeholder", "expected a template with '{}'"]),
    ([_bad(COUNTERFACT, requested_rewrite=dict(COUNTERFACT["requested_rewrite"], target_new={"id": "Q1"}))],
     ["record 0", "field 'requested_rewrite.target_new.str' is missing"]),
    ([_bad(COUNTERFACT, case_id=[1])], ["record 0", "field 'case_id' has type array", "a string or an integer"]),
    ([ZSRE, ["not", "a", "record"]], ["record 1", "has type array (expected an object)"]),
])
def test_malformed_json_records(tmp_path, records, fragments):
    name = "zsre.json" if "src" in records[0] else "edits.json"
    path = write_json(tmp_path / name, records)
    with pytest.raises(EditDataError) as err:
        read_edits(path)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert name in str(err.value)


def test_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "edits.jsonl"
    bad = _bad(ZSRE, src=...)
    path.write_text(json.dumps(ZSRE) + "\n\n" + json.dumps(ZSRE) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(EditDataError, match=r"edits\.jsonl: record 2 \(line 4\): field 'src' is missing"):
        read_edits(path)


def test_invalid_json_line(tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps(ZSRE) + "\n" + '{"src": "What university", "alt": \n', encoding="utf-8")
    with pytest.raises(EditDataError, match=r"edits\.jsonl: record 1 \(line 2\): invalid JSON at column"):
        read_edits(path)


def test_invalid_json_file_and_other_file_errors(tmp_path):
    path = tmp_path / "zsre.json"
    path.write_text('[\n  {"src": "a", "alt": "b"},\n  {"src": "c" "alt": "d"}\n]', encoding="utf-8")
    with pytest.raises(EditDataError, match=r"zsre\.json: invalid JSON at line 3"):
        read_edits(path)
    path.write_text(json.dumps(ZSRE) + "\n" + json.dumps(ZSRE) + "\n", encoding="utf-8")
    with pytest.raises(EditDataError, match="name the file .jsonl"):
        read_edits(path)
    path.write_text(json.dumps({"data": [ZSRE]}), encoding="utf-8")
    with pytest.raises(EditDataError, match="top level has type object"):
        read_edits(path)
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(EditDataError, match="no records"):
        read_edits(path)
    with pytest.raises(EditDataError, match="expected .json or .jsonl"):
        read_edits(write_json(tmp_path / "zsre.txt", [ZSRE]))


def test_bad_kind_rejected():
    with pytest.raises(ValueError, match="kind"):
        EditRecord(prompt="p", target_new="t", kind="rumour")
