"""Training-step throughput of TopKSparseCoder against the dense-matmul bound.

One step = forward (top-k, AuxK on a fixed dead mask) + backward + gradient projection + fused
Adam step + decoder renorm + dead-latent bookkeeping. The bound is the encoder matmul alone,
``x @ W_enc^T`` forward and backward to both inputs (3 dense [N, d] x [d, n] products): what a
coder with a dense encoder backward pays before any top-k, decoding or optimizer work. Ours runs
the forward product only and a sparse backward (N k d), so the ratio can exceed 1.
The steps take turns, so load from other processes on shared cores falls on all of them alike.

    python bench/sae_throughput.py --d-in 512 --num-latents 16384 --k 32 --batch 4096 --steps 20

If ``sparsify`` (pip: eai-sparsify) is importable, its SparseCoder is timed in the same run.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from lightning_edit.sparse import SparseCoderConfig, TopKSparseCoder, default_lr

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--num-latents", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="bfloat16: autocast over float32 weights, as in training")
    p.add_argument("--dead-fraction", type=float, default=0.1,
                   help="fraction of latents marked dead, so that AuxK runs every step")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(steps: dict, n_steps: int, warmup: int, device: torch.device) -> dict:
    """Median seconds per call of each step, the steps taking turns so that load from other
    processes on shared cores falls on all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(n_steps):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def adam(params, lr: float, device: torch.device) -> torch.optim.Adam:
    """Fused Adam (CPU and CUDA in torch >= 2.4): one kernel over each tensor, not ~10."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def dense_bound_step(args, device, dtype):
    """x @ W_enc^T forward and backward to both x and W_enc, at the benchmark's shape."""
    x = torch.randn(args.batch, args.d_in, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(args.num_latents, args.d_in, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(args.batch, args.num_latents, device=device, dtype=dtype)

    def step():
        pre = x @ w.mT
        pre.backward(grad)
        x.grad = w.grad = None

    return step


def training_step(coder, opt, x, dead_mask, device, dtype, tracker=None):
    """One step of either library's coder: forward (autocast), FVU + AuxK backward, decoder-norm
    constraint around the Adam step, the dead-latent tracker updated when given."""

    def step():
        with autocast(device, dtype):
            out = coder(x, dead_mask=dead_mask)
        (out.fvu + out.auxk_loss).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        coder.set_decoder_norm_to_unit_norm()
        if tracker is not None:
            tracker.update(out.latent_indices, out.latent_acts)

    return step


def ours_step(args, device, dtype, x, dead_mask):
    cfg = SparseCoderConfig(d_in=args.d_in, num_latents=args.num_latents, k=args.k)
    coder = TopKSparseCoder(cfg, device=device)
    coder.initialize(x)
    tracker = coder.new_dead_latent_tracker()
    opt = adam(coder.parameters(), default_lr(coder.num_latents), device)

    return training_step(coder, opt, x, dead_mask, device, dtype, tracker)


def sparsify_step(args, device, dtype, x, dead_mask):
    """The same step with EleutherAI's SparseCoder, or None if sparsify is not installed."""
    try:
        from sparsify import SparseCoder
        from sparsify import SparseCoderConfig as SparsifyConfig
    except ImportError:
        return None
    coder = SparseCoder(args.d_in, SparsifyConfig(num_latents=args.num_latents, k=args.k),
                        device=device)
    with torch.no_grad():
        coder.b_dec.copy_(x.mean(0))
    opt = adam(coder.parameters(), default_lr(args.num_latents), device)

    return training_step(coder, opt, x, dead_mask, device, dtype)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    x = torch.randn(args.batch, args.d_in, device=device)
    dead_mask = torch.rand(args.num_latents, device=device) < args.dead_fraction

    steps = {
        "dense-matmul bound (x @ W_enc^T fwd + bwd)": dense_bound_step(args, device, dtype),
        "lightning-edit TopKSparseCoder step": ours_step(args, device, dtype, x, dead_mask),
    }
    theirs = sparsify_step(args, device, dtype, x, dead_mask)
    if theirs is not None:
        steps["sparsify SparseCoder step"] = theirs
    rows = list(time_round_robin(steps, args.steps, args.warmup, device).items())

    bound = rows[0][1]
    print(f"\nd_in={args.d_in} num_latents={args.num_latents} k={args.k} batch={args.batch} "
          f"steps={args.steps} device={args.device} dtype={args.dtype} "
          f"dead_fraction={args.dead_fraction} threads={torch.get_num_threads()}\n")
    print("| what | ms / step | tokens / s | vs bound |")
    print("|---|---:|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1e3:.1f} | {args.batch / seconds:,.0f} | "
              f"{bound / seconds:.2f} |")
    if theirs is None:
        print("\n(sparsify not importable: not timed)")


if __name__ == "__main__":
    main()
