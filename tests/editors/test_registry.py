"""The editor registry (lightning_edit.editors.registry) and the construction every editor goes
through (`Editor.__init__`: config checked, component checked, then `setup`)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lightning_edit.editors import EDITORS, Editor, EditorContext, build_editor, editor_class, editor_config
from lightning_edit.editors.registry import register_editor
from lightning_edit.models import ModelAdapter, load_model
from lightning_edit.sparse import load_sparse_coder


@dataclass
class EchoConfig:
    scale: float = 1.0
    """A hyperparameter with a default."""


class Echo(Editor):
    """A third party's method: records what it was built over."""

    name = "echo"
    config_class = EchoConfig

    def setup(self) -> None:
        self.seen = (self.cfg.scale, self.ctx.model_name)

    def apply(self, records):
        return []

    def state_dict(self):
        return {"ledger": self.ledger_state()}

    def load_state_dict(self, state):
        self.load_ledger(state["ledger"])


@pytest.fixture
def registered():
    register_editor("echo", Echo)
    yield
    del EDITORS["echo"]


def test_a_third_party_method_registers_and_builds(registered):
    assert editor_class("echo") is Echo
    editor = build_editor("echo", {"method": "echo", "scale": 2}, EditorContext(None, None, None, model_name="m"))
    assert editor.seen == (2.0, "m") and editor.ledger == []  # setup ran after the config was merged


def test_a_name_is_registered_once(registered):
    with pytest.raises(ValueError, match="'echo' is already registered.*test_registry"):
        register_editor("echo", Echo)
    with pytest.raises(ValueError, match="'microedit' is already registered.*editors.microedit:MicroEdit"):
        register_editor("microedit", Echo)
    with pytest.raises(TypeError, match="an Editor subclass"):
        register_editor("other", object)
    assert "other" not in EDITORS


def test_unknown_method_and_bad_options_are_named(registered):
    with pytest.raises(KeyError, match="unknown editing method 'nope'; choices: .*echo"):
        editor_class("nope")
    with pytest.raises(ValueError, match=r"editor\.scal\b.*editor 'echo' keys: scale"):
        editor_config("echo", {"scal": 1})
    with pytest.raises(ValueError, match=r"editor\.scale"):
        Echo(EditorContext(None, None, None), {"scale": "big"})
    assert editor_config("microedit", {"method": "microedit", "lr": 0.1}).lr == 0.1  # `method` is the job's key


def test_every_editor_checks_its_component(small_world, small_sae, small_transcoder):
    model, tokenizer = load_model(str(small_world.model_dir))
    adapter = ModelAdapter(model)
    sae, transcoder = load_sparse_coder(small_sae[0]), load_sparse_coder(small_transcoder[0])
    with pytest.raises(ValueError, match=r"MicroEdit needs an SAE \(top-k\) as its component \(got none\)"):
        editor_class("microedit")(EditorContext(model, tokenizer, adapter), {"hookpoint": small_sae[1]})
    with pytest.raises(ValueError, match=r"MicroEdit needs an SAE \(top-k\) as its component \(got a transcoder\)"):
        editor_class("microedit")(EditorContext(model, tokenizer, adapter, component=transcoder), {})
    with pytest.raises(ValueError, match=r"TCPE needs a transcoder \(top-k\) as its component \(got an SAE\)"):
        editor_class("tcpe")(EditorContext(model, tokenizer, adapter, component=sae,
                                           component_cfg={"hookpoint": small_transcoder[1]}), {})
    # PNKE asks for a transcoder only with editor.site=transcoder.
    request = editor_class("pnke").component_request(editor_config("pnke", {"layer": 0}), {}, adapter)
    assert request is None
    request = editor_class("pnke").component_request(editor_config("pnke", {"layer": 0, "site": "transcoder"}), {},
                                                      adapter)
    assert (request.kind, request.hookpoint, request.trains_default) == ("transcoder", "layers.0.mlp", False)
