"""Helpers several test packages share: a tiny word-level tokenizer and Llama, a stand-in editor,
the MicroEdit editor of the MicroEdit, gate and calibrate tests, and small model utilities."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lightning_edit.editors.base import Editor, EditorContext, LedgerEntry
from lightning_edit.editors.microedit import MicroEdit
from lightning_edit.editors.pnke import PNKE
from lightning_edit.editors.tcpe import TCPE
from lightning_edit.editors.state import save_edit_state
from lightning_edit.jobs.edit_run import load_edited, new_editor
from lightning_edit.metrics import teacher_forced
from lightning_edit.models import ModelAdapter, load_model
from lightning_edit.sparse import load_sparse_coder
from lightning_edit.tokens import join_prompt_target


WORDS = ("the capital of france is paris rome berlin madrid who wrote hamlet shakespeare a b c d e "
         "x y z city river mountain plays sings music lives in london tokyo language speaks english "
         "french german sky blue green red color what was born").split()


def make_tokenizer(eos_at_end: bool = False) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = "<bos> $A <eos>" if eos_at_end else "<bos> $A"
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config)


class InvertingEditor(Editor):
    """A stand-in editor whose edits live in a hook: once anything is edited, `edited()` negates
    the logits (every preference flips), so an edit visibly changes answers and only code that
    evaluates inside `edited()` sees it."""

    name = "invert"

    @contextlib.contextmanager
    def edited(self):
        if not self.ledger:
            yield self.model
            return
        handle = self.model.lm_head.register_forward_hook(lambda module, args, out: -out)
        try:
            yield self.model
        finally:
            handle.remove()

    def apply(self, records):
        entries = [LedgerEntry(len(self.ledger) + i, r.case_id, r.prompt, r.target_new) for i, r in enumerate(records)]
        self.ledger.extend(entries)
        return entries

    def state_dict(self):
        return {"ledger": self.ledger_state()}

    def load_state_dict(self, state):
        self.load_ledger(state["ledger"])


# Small budgets, a large step: the test world's facts flip in a few dozen steps.
FAST = dict(mask_tokens="last", lr=5e-3, alpha="auto", tau="calibrate", stage1_max_steps=10,
            stage2_max_steps=150, stop_nll=0.1)


def make_microedit(small_world, small_sae, **overrides) -> MicroEdit:
    folder, hookpoint = small_sae
    model, tokenizer = load_model(str(small_world.model_dir))
    sae = load_sparse_coder(folder)
    editor = MicroEdit(EditorContext(model, tokenizer, ModelAdapter(model), component=sae),
                       {**FAST, "hookpoint": hookpoint, **overrides})
    editor.prepare(small_world.corpus_path.read_text().splitlines()[:300])
    return editor


HOOKPOINT = "layers.0.mlp"


# The small world's LM (2 layers, width 64) reads facts at the prompt's last token; ||h|| ~ 0.5 there.
SOLVER = dict(position="last", v_lr=0.1, v_steps=40, context_templates=["{}"])


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
                          {"path": str(transcoder[0]), "hookpoint": transcoder[1]}, str(small_world.model_dir))
    editor.prepare(corpus)
    return editor


def make_pnke(small_world, corpus, stats_dir, transcoder=None, **overrides) -> PNKE:
    model, tokenizer, adapter = fresh(small_world)
    component = {"path": str(transcoder[0]), "hookpoint": transcoder[1]} if transcoder else {}
    editor = new_editor("pnke", {"layer": 0, "preserve_corpus_samples": 200, "stats_dir": stats_dir, **SOLVER,
                                   **overrides}, model,
                          tokenizer, adapter, component, str(small_world.model_dir))
    editor.prepare(corpus)
    return editor


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def yaml_editor(method: str) -> dict:
    """The `editor:` section of configs/<method>.yaml (or configs/baselines/<method>.yaml)."""
    path = CONFIGS / f"{method}.yaml"
    path = path if path.is_file() else CONFIGS / "baselines" / f"{method}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path).editor)


def editor_for(method: str, params: dict, world, world_model, corpus=None):
    model, tokenizer = world_model
    editor = new_editor(method, params, model, tokenizer, ModelAdapter(model), model_name=str(world.model_dir))
    if corpus is not None:
        editor.prepare(corpus)
    return editor


def logits_of(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def right(model, tokenizer, record) -> bool:
    return teacher_forced(model, tokenizer, [record.prompt], [record.target_new])[0].exact


def sparse_job_overrides(world, out: Path, *extra: str) -> list[str]:
    """A tiny, quick run on the small world (2 layers, hidden 64)."""
    return [
        f"model.name={world.model_dir}",
        f"data.path={world.corpus_path}",
        "data.packing=false",
        "data.batch_size=16",
        "data.val_sequences=32",
        "data.shuffle_buffer=2",
        "coder.expansion_factor=8",
        "coder.k=16",
        "coder.dead_after_tokens=2000",
        "logger=csv",
        "threads=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1",
        f"output_dir={out}",
        *extra,
    ]


def reloaded_state_reproduces(editor, directory: Path, record) -> None:
    """Saving the edit state and rebuilding it on a fresh base model reproduces the edited logits of
    the record's prompt + target, and the edited model's greedy answer is the target."""
    tokenizer = editor.tokenizer
    save_edit_state(editor, directory)
    reloaded, _, _ = load_edited(directory)
    text = join_prompt_target(record.prompt, record.target_new)
    with editor.edited() as m1, reloaded.edited() as m2:
        assert torch.equal(logits_of(m1, tokenizer, text), logits_of(m2, tokenizer, text))
    (continuation,) = reloaded.generate([record.prompt], max_new_tokens=1)
    assert continuation.strip() == record.target_new


DOCS = ["the cat sat on the mat", "a dog ran", "birds fly south in winter", "rain"]
"""The documents every file of `corpus_files` holds."""


def corpus_files(root: Path) -> dict[str, Path]:
    """One small real file of every kind, each holding DOCS (the text under another name in each)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    (root / "lines.txt").write_text("\n".join(DOCS[:2]) + "\n\n" + "\n".join(DOCS[2:]) + "\n")
    (root / "whole.txt").write_text("\n".join(DOCS) + "\n")
    (root / "docs.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    pq.write_table(pa.table({"content": DOCS, "n": list(range(4))}), root / "docs.parquet")
    ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(4))})
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(root / "saved_dict"))
    return {k: root / k for k in ("lines.txt", "whole.txt", "docs.jsonl", "docs.parquet", "saved", "saved_dict")}


# A short stream of every registered method on the small world (bf16, device map and GPU tests): its
# YAML with what the 2-layer small world needs instead of the default world's layers, short step budgets.
SHORT_STREAM = {
    "microedit": ["editor.stage1_max_steps=5", "editor.stage2_max_steps=30", "editor.gate=none"],
    "ft": ["editor.max_steps=20"],
    "ment": ["editor.layers=[0,1]"],
    "fine": ["editor.max_steps=20"],
    "grace": ["editor.n_iter=20"],
    "wise": ["editor.layer=0", "editor.n_iter=20"],
    "rome": ["editor.v_steps=20"],
    "tcpe": ["editor.v_steps=20", "editor.v_lr=0.1"],
    "pnke": ["editor.layer=0", "editor.v_steps=20", "editor.preserve_corpus_samples=100"],
    "memit": ["editor.layers=[0,1]", "editor.v_steps=20"],
    "alphaedit": ["editor.layers=[0,1]", "editor.v_steps=20"],
    "kn": [],
}


def method_config(method: str) -> Path:
    """configs/<method>.yaml or configs/baselines/<method>.yaml."""
    root = Path(__file__).resolve().parents[1] / "configs"
    return next(p for p in (root / f"{method}.yaml", root / "baselines" / f"{method}.yaml") if p.is_file())


def short_stream(method: str, model, tokenizer, records, corpus, sae, transcoder, stats_dir) -> tuple:
    """Build `method` over `model` from its YAML (SHORT_STREAM's overrides; the small world's SAE and
    transcoder folders `sae`, `transcoder`), prepare it on `corpus`, apply `records` one by one:
    (editor, mean target NLL before, after). MENT declines some single records (its neuron quota), so
    callers pass two or more and judge the mean."""
    from lightning_edit.config import load_config
    from lightning_edit.jobs.edit import SCHEMA
    from lightning_edit.jobs.edit_run import _container

    cfg = load_config(SCHEMA, [f"config={method_config(method)}", *SHORT_STREAM[method]])
    params = _container(cfg.editor)
    if method in ("tcpe", "pnke"):
        params["stats_dir"] = stats_dir
    component = {"microedit": {"path": sae[0], "hookpoint": sae[1]},
                 "tcpe": {"path": transcoder[0], "hookpoint": HOOKPOINT}}.get(method, {})
    editor = new_editor(method, params, model, tokenizer, ModelAdapter(model), component, "toyworld-small")
    editor.prepare(corpus)
    prompts, targets = [r.prompt for r in records], [r.target_new for r in records]
    before = teacher_forced(model, tokenizer, prompts, targets)
    entries = [e for r in records for e in editor.apply([r])]
    assert entries and all(torch.isfinite(torch.tensor(e.delta_norm)) for e in entries), method
    with editor.edited() as edited:
        after = teacher_forced(edited, tokenizer, prompts, targets)
        ids = tokenizer(prompts, return_tensors="pt", padding=True).to(editor.device)
        assert torch.isfinite(edited(**ids).logits.float()).all(), method
    mean = lambda scores: sum(s.nll for s in scores) / len(scores)  # noqa: E731
    return editor, mean(before), mean(after)


# Each method's YAML `editor:` section with what the 2-layer, 64-wide test world needs changed (layers
# that exist, the value solver's step for ||h|| ~ 0.5, WISE's shards within a short stream).
SMALL_WORLD_EDITORS: dict[str, dict] = {
    "microedit": {**FAST, "hookpoint": "layers.0"},
    "tcpe": {**SOLVER},
    "pnke": {"layer": 0, "preserve_corpus_samples": 200, **SOLVER},
    "ment": {"patch_scale": 80.0},
    "fine": {},
    "ft": {},
    "rome": {**SOLVER},
    "memit": {"layers": [0, 1], **SOLVER},
    "alphaedit": {"layers": [0, 1], **SOLVER},
    "grace": {},
    "wise": {"layer": 0, "n_iter": 20, "save_freq": 2, "merge_freq": 4},
    "kn": {},
}


def small_world_editor(method: str, small_world, corpus, stats_dir, components) -> Editor:
    """`method` over a fresh copy of the test world's model, prepared on `corpus`: its YAML section
    with `SMALL_WORLD_EDITORS[method]` over it; `components` = {"sae": (folder, hookpoint),
    "transcoder": (folder, hookpoint)} for the methods that need one."""
    from lightning_edit.editors import editor_class

    cls = editor_class(method)
    params = {**yaml_editor(method), **SMALL_WORLD_EDITORS[method]}
    if "stats_dir" in {f.name for f in dataclasses.fields(cls.config_class)}:
        params["stats_dir"] = stats_dir
    component = {}
    if cls.component_kind is not None:
        folder, hookpoint = components[cls.component_kind]
        component = {"path": str(folder), "hookpoint": hookpoint}
    model, tokenizer, adapter = fresh(small_world)
    editor = new_editor(method, params, model, tokenizer, adapter, component, str(small_world.model_dir))
    editor.prepare(corpus)
    return editor


BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    """bench/<name>.py as a module (the bench scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
