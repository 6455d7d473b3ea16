"""Does an edit leak onto its subject's other facts? A locality check CounterFact does not make.

CounterFact's neighbourhood prompts are about *other* subjects with the same relation. A gate keyed
on the subject (MicroEdit's `subject_gate`) could instead leak onto the edited subject's other facts:
"Where is X based?" edited, "Who founded X?" should keep its answer. This reads a finished edit run
(`lightning run edit ...` or `bench/compare_methods.py`: its folder with `config.yaml` and
`edit_state/`), takes every prompt of every unedited fact of the edited subjects from the embedded
world's knowledge base, and reports the share whose answer tokens (teacher forced, argmax) are the
unedited model's:

    python bench/other_facts.py --run runs/compare/microedit
    python bench/other_facts.py --run runs/compare/microedit --set subject_key=latents --set gate_sticky=false

`--set FIELD=VALUE` rescores the same edit state with an editor setting changed (a scope gate's
switch; the edits are not re-made). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="an edit run's folder (config.yaml, edit_state/)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                   help="an editor setting to rescore under (repeatable)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def _value(text: str):
    import yaml

    return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run)
    for needed in (run_dir / "config.yaml", run_dir / "edit_state"):
        if not needed.exists():
            print(f"error: {needed} not found; expected an edit run's folder (config.yaml, edit_state/)", file=sys.stderr)
            return 2
    import torch

    from lightning_edit.config import load_config
    from lightning_edit.editors.state import load_edit_state
    from lightning_edit.jobs.edit import SCHEMA
    from lightning_edit.jobs.edit_run import build_edit_run
    from lightning_edit.metrics.edit_metrics import teacher_forced
    from lightning_edit.world import WORLD_NAMES, load_world

    torch.set_num_threads(args.threads)
    run = build_edit_run(load_config(SCHEMA, [f"config={run_dir / 'config.yaml'}"]))
    if run.cfg.model.name not in WORLD_NAMES:
        print(f"error: model.name {run.cfg.model.name!r} is not an embedded world; this check needs a world's "
              f"knowledge base (one of {', '.join(WORLD_NAMES)})", file=sys.stderr)
        return 2
    editor = run.new_editor(copy.deepcopy(run.model))
    load_edit_state(editor, run_dir / "edit_state")
    for item in args.settings:
        field, sep, text = item.partition("=")
        if not sep or not hasattr(editor.cfg, field):
            print(f"error: --set {item!r}: expected FIELD=VALUE with FIELD a setting of {editor.name}", file=sys.stderr)
            return 2
        setattr(editor.cfg, field, _value(text))
    if args.settings:
        try:
            editor.cfg.validate()
        except ValueError as err:
            print(f"error: --set: {err}", file=sys.stderr)
            return 2
        editor._eval_cache.clear()

    kb = load_world(run.cfg.model.name).kb
    edited = {entry.prompt for entry in editor.ledger}
    subject_of = {r.prompt: getattr(r, "subject", None) for r in run.stream.records}  # the edit requests' subjects
    subjects = {subject_of.get(entry.prompt) for entry in editor.ledger} - {None}
    prompts, answers = [], []
    for fact in kb.facts:
        if fact.subject not in subjects:
            continue
        fact_prompts = kb.prompts(fact)
        if any(p in edited for p in fact_prompts):  # an edited fact: not this check's business
            continue
        prompts += fact_prompts
        answers += [fact.object] * len(fact_prompts)
    if not prompts:
        print(f"error: {run_dir}: no unedited fact of an edited subject (no subject in the ledger?)", file=sys.stderr)
        return 2
    with torch.no_grad():
        base = teacher_forced(run.model, run.tokenizer, prompts, answers)
        with editor.edited() as model:
            after = teacher_forced(model, run.tokenizer, prompts, answers)
    kept = sum(a.argmax_ids == b.argmax_ids for a, b in zip(base, after)) / len(prompts)
    print(json.dumps({"run": str(run_dir), "settings": args.settings, "edits": len(editor.ledger),
                      "subjects": len(subjects), "prompts": len(prompts), "kept": round(kept, 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
