"""bench/sae_throughput.py runs end to end at a tiny width and sizes itself for real widths (no
timing is asserted: speed targets live in the bench's tables)."""

from __future__ import annotations

from tests.helpers import load_bench


def _bench():
    return load_bench("sae_throughput")


def test_sizes_itself_to_the_matrix():
    bench = _bench()
    big = bench.parse_args(["--d-in", "4096", "--num-latents", "32768,65536,131072"])
    assert big.widths == [32768, 65536, 131072]
    # Same dense work per step as the d_in 512 x 16k default, and a few steps: finishes on 2 cores.
    assert [bench.sized(big, w) for w in big.widths] == [(256, 3, 1), (128, 3, 1), (64, 3, 1)]
    assert bench.sized(bench.parse_args([]), 16384) == (4096, 20, 2)
    assert bench.sized(bench.parse_args(["--batch", "7", "--steps", "2"]), 65536)[:2] == (7, 2)
    # ~8 float32 copies of each matrix (weights, gradients, Adam moments of W_enc and W_dec).
    assert 8 * 2**30 < bench.estimate_bytes("ours", 4096, 65536, 128) < 8.5 * 2**30


def test_tiny_run_prints_and_writes_the_table(tmp_path, capsys, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "sparsify_installed", lambda: False)  # the row says so, nothing runs
    out = tmp_path / "t.md"
    bench.main(["--d-in", "16", "--num-latents", "64", "--k", "4", "--steps", "2", "--warmup", "0",
                "--batch", "256", "--threads", "1", "--impls", "ours,sparsify", "--out", str(out)])
    text = out.read_text()
    command, table = text.split("\n", 1)
    assert command.startswith("`python bench/sae_throughput.py --d-in 16") and table.strip() in capsys.readouterr().out
    (ours,) = [line for line in text.splitlines() if "TopKSparseCoder" in line]
    cells = [c.strip() for c in ours.strip("|").split("|")]
    assert cells[0] == "64" and float(cells[3].replace(",", "")) > 0 and "->" in cells[7]
    assert cells[5] == "n/a"  # no sparsify figure to compare with
    (theirs,) = [line for line in text.splitlines() if "sparsify SparseCoder" in line]
    assert "skipped: not installed (pip install eai-sparsify" in theirs
