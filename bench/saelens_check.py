"""Load checkpoints written by SAELens itself and compare reconstructions (needs `pip install sae-lens`).

The unit tests (`tests/sparse/test_saelens.py`) check our loader against SAELens 6's forward written
out from its source, so they need no SAELens install. This script closes the loop where SAELens is
installed: its own `TopKTrainingSAE`, saved as a training checkpoint (unfolded, rescale flag on) and
as its inference export (folded), must load here and reconstruct as SAELens does.

    python bench/saelens_check.py            # prints one table; exit 1 on a mismatch
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from lightning_edit.sparse import load_sparse_coder

D, N, K = 12, 48, 5


def main() -> int:
    try:
        import sae_lens
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    except ImportError:
        print("sae-lens is not installed: pip install sae-lens", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=N, k=K))
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.05, 3.0, N).unsqueeze(1))
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(1)) * 1.5
    with torch.no_grad():
        expected = sae.decode(sae.encode(x))
    failed = False
    print(f"| SAELens {sae_lens.__version__} export | rescale flag | max abs diff | ok |\n|---|---|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_model(Path(tmp) / "checkpoint")
        sae.save_inference_model(Path(tmp) / "inference")
        for folder in ("checkpoint", "inference"):
            cfg = json.loads((Path(tmp) / folder / "cfg.json").read_text())
            got = load_sparse_coder(Path(tmp) / folder).reconstruct(x)
            diff = (got - expected).abs().max().item()
            ok = torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
            failed |= not ok
            print(f"| {folder} | {cfg.get('rescale_acts_by_decoder_norm')} | {diff:.2e} | {'yes' if ok else 'NO'} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
