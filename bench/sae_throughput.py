"""SAE training throughput and memory: TopKSparseCoder against sparsify and the dense-matmul bound.

One step = forward (top-k, AuxK on a fixed dead mask) + backward + gradient projection + fused
Adam step + decoder renorm (+ dead-latent bookkeeping for ours). The bound is the encoder matmul
alone, ``x @ W_enc^T`` forward and backward to both inputs (3 dense [N, d] x [d, n] products): what
a coder with a dense encoder backward pays before any top-k, decoding or optimizer work. Ours runs
the forward product only and a sparse backward (N k d), so its ratio to the bound can exceed 1.

Each implementation runs in its own process, one after the other, on the same synthetic dictionary
data (every token a sparse combination of ground-truth atoms, so FVU falls and can be compared), so
its peak memory is its own: RSS on CPU (peak, and above the process's RSS before the coder was
built), CUDA peak allocated on a GPU. An implementation whose estimated memory exceeds what the
machine has free is reported as skipped, not run. sparsify (pip: eai-sparsify, the `bench` extra)
is reported as not installed when it cannot be imported.

    python bench/sae_throughput.py                                  # d_in 512, 16,384 latents
    python bench/sae_throughput.py --d-in 4096 --num-latents 65536  # batch and steps sized to the CPU
    python bench/sae_throughput.py --d-in 4096 --num-latents 32768,65536,131072 --device cuda

The table (markdown) is printed and written to bench/results/sae_throughput_<d_in>.md (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IMPLS = ("bound", "ours", "sparsify")
NAMES = {
    "bound": "dense-matmul bound (x @ W_enc^T fwd + bwd)",
    "ours": "lightning-edit TopKSparseCoder",
    "sparsify": "sparsify SparseCoder",
}
REFERENCE_WORK = 4096 * 512 * 16384  # tokens x d_in x latents of a step at the d_in 512 default
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--num-latents", default="16384", help="one width, or several: 32768,65536,131072")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=None,
                   help="tokens per step; default: 4096 at d_in 512 x 16k latents, scaled down with "
                        "d_in x latents (at least 64) so that a step costs about the same")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (after --warmup); default 20, or 3 above 2**24 weights per matrix")
    p.add_argument("--warmup", type=int, default=None, help="default 2, or 1 above 2**24 weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="bfloat16: autocast over float32 weights, as in training")
    p.add_argument("--dead-fraction", type=float, default=0.1,
                   help="fraction of latents marked dead, so that AuxK runs every step")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"which of {','.join(IMPLS)} to run")
    p.add_argument("--memory-fraction", type=float, default=0.8,
                   help="skip an implementation whose estimate exceeds this share of free memory")
    p.add_argument("--out", default=None, help="markdown file for the table; default "
                   "bench/results/sae_throughput_<d_in>.md; 'none' writes nothing")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the implementations this many times in turn and keep each one's fastest "
                        "round (load from other processes on shared cores then falls on all alike)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one implementation
    p.add_argument("--worker-latents", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # handed on to the worker processes
    args.widths = [int(w) for w in str(args.num_latents).split(",")]
    return args


def sized(args, num_latents: int) -> tuple[int, int, int]:
    """(batch, steps, warmup) for one width: explicit flags, else sized to the matrix."""
    weights = args.d_in * num_latents
    batch = args.batch or int(min(4096, max(64, 2 ** round(math.log2(REFERENCE_WORK / weights)))))
    large = weights > 2**24
    steps = args.steps or (3 if large else 20)
    warmup = args.warmup if args.warmup is not None else (1 if large else 2)
    return batch, steps, warmup


# --- one implementation, in its own process ------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype):
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def dictionary_batches(n_batches: int, batch: int, d_in: int, seed: int, device) -> list[torch.Tensor]:
    """Tokens that are sparse non-negative combinations (8 of 4096 atoms) of a random unit dictionary,
    plus 1% noise and an offset: data a sparse coder can fit, identical for every implementation."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(4096, d_in, generator=g), dim=1)
    offset = torch.randn(d_in, generator=g)
    out = []
    for _ in range(n_batches):
        idx = torch.randint(0, 4096, (batch, 8), generator=g)
        coef = torch.rand(batch, 8, generator=g) * 3
        x = torch.einsum("bk,bkd->bd", coef, atoms[idx]) + offset + 0.01 * torch.randn(batch, d_in, generator=g)
        out.append(x.to(device))
    return out


def build_step(impl: str, args, num_latents: int, device, dtype, x0: torch.Tensor, dead_mask: torch.Tensor):
    """A closure running one training step on a batch, returning its FVU (None for the bound)."""
    from lightning_edit.sparse import SparseCoderConfig, TopKSparseCoder, default_lr

    if impl == "bound":
        w = torch.randn(num_latents, args.d_in, device=device, requires_grad=True)

        def bound(x):
            x = x.detach().requires_grad_(True)
            with autocast(device, dtype):
                pre = x @ w.mT
            pre.backward(torch.ones_like(pre))
            w.grad = None

        return bound
    if impl == "ours":
        coder = TopKSparseCoder(SparseCoderConfig(d_in=args.d_in, num_latents=num_latents, k=args.k), device=device)
        coder.initialize(x0)
        tracker = coder.new_dead_latent_tracker()
    else:
        from sparsify import SparseCoder
        from sparsify import SparseCoderConfig as SparsifyConfig

        coder = SparseCoder(args.d_in, SparsifyConfig(num_latents=num_latents, k=args.k), device=device)
        with torch.no_grad():
            coder.b_dec.copy_(x0.mean(0))
        tracker = None
    # Fused Adam (CPU and CUDA in torch >= 2.4): one kernel over each tensor, not ~10.
    optimizer = torch.optim.Adam(coder.parameters(), lr=default_lr(num_latents), fused=True)

    def step(x):
        with autocast(device, dtype):
            out = coder(x, dead_mask=dead_mask)
        (out.fvu + out.auxk_loss).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        coder.set_decoder_norm_to_unit_norm()
        if tracker is not None:
            tracker.update(out.latent_indices, out.latent_acts)
        return out.fvu

    return step


def worker(args) -> dict:
    impl, num_latents = args.worker, args.worker_latents
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    batch, steps, warmup = sized(args, num_latents)
    data = dictionary_batches(warmup + steps, batch, args.d_in, args.seed, device)
    dead_mask = torch.rand(num_latents, generator=torch.Generator().manual_seed(args.seed)) < args.dead_fraction
    dead_mask = dead_mask.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = rss_bytes()
    step = build_step(impl, args, num_latents, device, dtype, data[0], dead_mask)
    times, fvus = [], []
    for i, x in enumerate(data):
        sync(device)
        start = time.perf_counter()
        fvu = step(x)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            fvus.append(None if fvu is None else float(fvu))
    seconds = sorted(times)[len(times) // 2]
    return {
        "impl": impl, "num_latents": num_latents, "batch": batch, "steps": steps,
        "seconds": seconds, "tokens_per_s": batch / seconds,
        "fvu_first": fvus[0], "fvu_last": fvus[-1],
        "peak_rss": peak_rss_bytes(), "rss_above_baseline": peak_rss_bytes() - baseline,
        "cuda_peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
    }


# --- the driver ----------------------------------------------------------------------------------


def estimate_bytes(impl: str, d_in: int, num_latents: int, batch: int) -> int:
    """Rough peak of one implementation: weights, gradients and Adam's two moments of W_enc and
    W_dec (float32), plus the [batch, latents] pre-activations a few times over."""
    matrix = 4 * d_in * num_latents
    if impl == "bound":
        return 2 * matrix + 3 * 4 * batch * num_latents
    return 8 * matrix + 4 * 4 * batch * num_latents


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def sparsify_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("sparsify") is not None


def run_one(args, impl: str, num_latents: int) -> dict:
    batch, steps, _ = sized(args, num_latents)
    need = estimate_bytes(impl, args.d_in, num_latents, batch)
    free = free_bytes(torch.device(args.device))
    base = {"impl": impl, "num_latents": num_latents, "batch": batch, "steps": steps}
    if impl == "sparsify" and not sparsify_installed():
        return {**base, "skipped": "not installed (pip install eai-sparsify, or the `bench` extra)"}
    if need > args.memory_fraction * free:
        return {**base, "skipped": f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"}
    cmd = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--worker", impl,
           "--worker-latents", str(num_latents)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**base, "skipped": f"failed (exit {result.returncode}): {tail}"}
    return json.loads(lines[-1])


def gib(value) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f}"


def table(args, rows: list[dict]) -> str:
    device = torch.device(args.device)
    mem = "CUDA peak GiB" if device.type == "cuda" else "peak RSS GiB (above start)"
    lines = [
        f"d_in={args.d_in} k={args.k} device={args.device} dtype={args.dtype} "
        f"dead_fraction={args.dead_fraction} threads={next((r['threads'] for r in rows if 'threads' in r), 'n/a')}; "
        "synthetic dictionary data (8 of 4096 atoms per token); median step time (fastest of "
        f"{args.rounds} round(s)); each implementation in its own process",
        "",
        f"| latents | batch | what | ms / step | tokens / s | vs sparsify | vs bound | FVU first -> last step | {mem} | memory vs sparsify |",
        "|---:|---:|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for width in args.widths:
        group = {r["impl"]: r for r in rows if r["num_latents"] == width}
        theirs, bound = group.get("sparsify", {}), group.get("bound", {})

        def memory(r):
            if r.get("cuda_peak") is not None:
                return r["cuda_peak"]
            return r.get("rss_above_baseline")

        for impl in (i for i in IMPLS if i in group):
            r = group[impl]
            if "skipped" in r:
                lines.append(f"| {width:,} | {r['batch']} | {NAMES[impl]} | skipped: {r['skipped']} | | | | | | |")
                continue
            speed_vs = (f"{r['tokens_per_s'] / theirs['tokens_per_s']:.2f}" if "tokens_per_s" in theirs else "n/a")
            bound_vs = (f"{r['tokens_per_s'] / bound['tokens_per_s']:.2f}" if "tokens_per_s" in bound else "n/a")
            fvu = "" if r["fvu_first"] is None else f"{r['fvu_first']:.3f} -> {r['fvu_last']:.3f}"
            mine, ref = memory(r), memory(theirs) if "tokens_per_s" in theirs else None
            mem_vs = f"{mine / ref:.2f}" if (mine and ref and impl != "bound") else "n/a"
            used = gib(r["cuda_peak"]) if r.get("cuda_peak") is not None else \
                f"{gib(r['peak_rss'])} ({gib(r['rss_above_baseline'])})"
            lines.append(f"| {width:,} | {r['batch']} | {NAMES[impl]} | {r['seconds'] * 1e3:,.0f} | "
                         f"{r['tokens_per_s']:,.0f} | {speed_vs} | {bound_vs} | {fvu} | {used} | {mem_vs} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        sys.exit(f"error: --impls {unknown[0]!r} is not one of {', '.join(IMPLS)}")
    rows = []
    for width in args.widths:
        best: dict[str, dict] = {}
        for round_ in range(args.rounds):
            for impl in impls:
                print(f"[sae_throughput] {NAMES[impl]} at {width:,} latents (round {round_ + 1}) ...",
                      file=sys.stderr, flush=True)
                r = run_one(args, impl, width)
                if impl not in best or r.get("seconds", math.inf) < best[impl].get("seconds", math.inf):
                    best[impl] = r
        rows += best.values()
    text = table(args, rows)
    print("\n" + text)
    if args.out != "none":
        out = Path(args.out) if args.out else RESULTS / f"sae_throughput_{args.d_in}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"`python bench/sae_throughput.py {' '.join(args.argv)}`\n\n{text}\n")
        print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
