"""bench/scale.py: the shapes it writes down are the real ones at full width, the slope is the growth
exponent, and a tiny run measures every column for a closed-form and a gradient method (no timing is
asserted: the targets live in the bench's tables)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "scale.py"


def _bench():
    spec = importlib.util.spec_from_file_location("scale_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_shapes_are_the_real_ones_at_full_width_and_scale_below():
    bench = _bench()
    llama = bench.shape_at(bench.ARCHS["llama3-8b"], 4096, 3)
    assert (llama["mlp"], llama["heads"], llama["kv_heads"]) == (14336, 32, 8)
    assert bench.shape_at(bench.ARCHS["gpt2-xl"], 1600, 3)["heads"] == 25
    half = bench.shape_at(bench.ARCHS["llama3-8b"], 2048, 3)
    assert (half["mlp"], half["heads"], half["kv_heads"]) == (7168, 16, 4)  # same head size and ratios
    model = bench.build_model(bench.ARCHS["qwen2.5-7b"], bench.shape_at(bench.ARCHS["qwen2.5-7b"], 256, 2), 50,
                              None, "cpu")
    assert model.config.intermediate_size == 1344 and model.config.num_key_value_heads == 1


def test_slope_is_the_growth_exponent():
    bench = _bench()
    assert math.isclose(bench.slope([512, 1024, 2048], [3.0, 12.0, 48.0]), 2.0)
    assert math.isnan(bench.slope([512], [1.0]))


def test_tiny_run_measures_every_column(tmp_path, capsys):
    import os

    bench = _bench()
    cache = os.environ.get("LIGHTNING_EDIT_CACHE")
    out = tmp_path / "scale.md"
    code = bench.main(["--widths", "128", "--methods", "rome,ft", "--edits", "1", "--steps", "2",
                       "--corpus-lines", "16", "--out", str(out)])
    assert code == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["rome", "ft"]
    for row in rows:
        assert row["edit_s"] > 0 and row["fwd_bwd_s"] > 0 and row["passes"] >= 1 and row["peak_mib"] > 0
        assert math.isclose(row["overhead"], row["edit_s"] / row["fwd_bwd_s"])
    assert rows[0]["stats_s"] > 0 and rows[0]["extra_mib"] > 0  # ROME's second moment
    assert "| rome | 128 |" in out.read_text() and "| ft | 128 |" in capsys.readouterr().out
    assert os.environ.get("LIGHTNING_EDIT_CACHE") == cache  # the worlds' cache is where it was
