"""The exact re-use check of KECode re-translation (`translate.still_greedy`): the model's own greedy
translation passes it, a changed line or a changed model does not."""

import contextlib

import torch

from lightning_edit.code.kecode import load_samples
from lightning_edit.code.translate import model_generate, still_greedy, translate
from lightning_edit.models import ModelAdapter, load_model


def test_still_greedy_keeps_exactly_what_the_model_writes_again(code_world):
    model, tok = load_model(str(code_world.model_dir))
    programs = [s.program for s in load_samples(code_world.kecode_path)[:24]]
    lines = translate(model_generate(model, tok), programs)
    same = lambda: contextlib.nullcontext(model)  # noqa: E731
    assert still_greedy(same, tok, programs, lines, batch_size=8) == [True] * len(programs)

    # one written token changed, one line cut short: the model would not write that again
    changed = [[list(line) for line in ls] for ls in lines]
    k = next(j for j, line in enumerate(changed[0]) if len(line) >= 2)
    changed[0][k][-1] = changed[0][k][0] if changed[0][k][0] != changed[0][k][-1] else "int"
    changed[1] = [line[:-1] if len(line) > 1 else line for line in changed[1]]
    assert still_greedy(same, tok, programs[:3], changed[:3]) == [False, False, True]

    # a model that prefers another token everywhere writes none of them again
    adapter = ModelAdapter(model)
    with torch.no_grad():
        adapter.unembedding_weight[tok.convert_tokens_to_ids("int")] += 100.0
    assert not any(still_greedy(same, tok, programs, lines))
