"""TCPE on the test-size world: one edit flips its target and changes only the active decoder rows;
the lim cap."""

from __future__ import annotations

import pytest
import torch

from lightning_edit.data import read_edits

from tests.helpers import HOOKPOINT, flipped, make_tcpe, snapshot




@pytest.fixture(scope="module")
def records(small_world):
    return read_edits(small_world.counterfact_path)[:4]


def test_tcpe_flips_and_changes_only_the_active_decoder_rows(small_world, small_transcoder, small_corpus, records,
                                                             stats_dir):
    editor = make_tcpe(small_world, small_transcoder, small_corpus, stats_dir)
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


def test_tcpe_lim_caps_the_support_and_still_flips(small_world, small_transcoder, small_corpus, records, stats_dir):
    editor = make_tcpe(small_world, small_transcoder, small_corpus, stats_dir, lim=4)
    entry = editor.apply([records[1]])[0]
    assert len(entry.changed[f"{HOOKPOINT}.W_dec"]) == 4
    assert flipped(editor, records[1])


def test_paper_preset_keys_on_the_subject_token_and_edits(small_world, small_transcoder, small_corpus, records,
                                                          stats_dir):
    from omegaconf import OmegaConf

    from lightning_edit.config import load_config
    from lightning_edit.editors.tcpe import TCPE
    from lightning_edit.jobs.edit import EditJobConfig
    from lightning_edit.jobs.edit_run import check_edit_config

    cfg = load_config(EditJobConfig, ["config=tcpe_paper.yaml"])
    assert check_edit_config(cfg) is TCPE
    section = OmegaConf.to_container(cfg.editor)
    paper, rome = TCPE.make_config(section), TCPE.make_config({})
    assert paper.position == "subject_last" and paper.lim is None  # "Following ROME"; Eq. 1 over all of S_j
    assert (paper.v_steps, paper.v_lr, paper.context_templates) == (rome.v_steps, rome.v_lr, rome.context_templates)
    # The preset runs: one edit on the test-size world changes exactly the latents active at the subject's
    # last token, which differ from those at the prompt's last token.
    section.pop("method")
    editor = make_tcpe(small_world, small_transcoder, small_corpus, stats_dir, **section)
    record = records[0]
    at_subject = editor.support(editor.key(record.prompt, record.subject)).tolist()
    entry = editor.apply([record])[0]
    assert entry.changed == {f"{HOOKPOINT}.W_dec": at_subject}
    last = make_tcpe(small_world, small_transcoder, small_corpus, stats_dir)  # the helper keys at the last token
    assert set(last.support(last.key(record.prompt, record.subject)).tolist()) != set(at_subject)


def test_tcpe_clamp_retries_grow_the_norm_ball_until_the_edit_lands(small_world, small_transcoder, small_corpus,
                                                                    records, stats_dir):
    """`clamp_retries`: an edit whose target is not the argmax after the update is solved again with a
    norm ball `clamp_growth` times larger; the kept edit is exactly a single solve at the final ball
    (the failed attempts leave nothing behind). A ball of 1/8 ||h|| cannot flip a fact of this world."""
    record = records[0]
    small = make_tcpe(small_world, small_transcoder, small_corpus, stats_dir, clamp_norm_factor=0.125)
    (entry,) = small.apply([record])
    assert not flipped(small, record) and entry.metrics_after["target_argmax"] == 0.0
    assert entry.extra["clamp_norm_factor"] == [0.125]

    grown = make_tcpe(small_world, small_transcoder, small_corpus, stats_dir, clamp_norm_factor=0.125,
                      clamp_retries=6, clamp_growth=2.0)
    (entry,) = grown.apply([record])
    assert flipped(grown, record)
    clamps = entry.extra["clamp_norm_factor"]
    assert 2 <= len(clamps) <= 7 and clamps == [0.125 * 2 ** i for i in range(len(clamps))]
    once = make_tcpe(small_world, small_transcoder, small_corpus, stats_dir, clamp_norm_factor=clamps[-1])
    once.apply([record])
    assert torch.equal(grown.coder.W_dec, once.coder.W_dec)
    if len(clamps) > 2:  # the ball before the last did not land either
        short = make_tcpe(small_world, small_transcoder, small_corpus, stats_dir, clamp_norm_factor=clamps[-2])
        short.apply([record])
        assert not flipped(short, record)


def test_tcpe_clamp_fields_are_checked():
    from lightning_edit.editors.tcpe import TCPEConfig

    for bad in ({"clamp_retries": -1}, {"clamp_growth": 1.0}):
        with pytest.raises(ValueError, match="clamp_retries must be >= 0"):
            TCPEConfig(**bad)
