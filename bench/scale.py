"""How every editor's cost grows with model width, on random-init models with real models' shapes.

Nothing is downloaded: the widths of the named configs are written below (`ARCHS`), the layer count
is cut to `--layers` (3 by default: every method's YAML addresses layers 0-2), and the tokenizer,
edit records and corpus are an embedded world's (`toyworld` for Llama / Qwen, `toyworld-gpt2` for
GPT-J / GPT-2). A width below the real one scales d_model, d_ff and the head count together at the
real head size and d_ff / d_model ratio, so the top width of a sweep is the real layer shape.

    python bench/scale.py --quick                      # every method, llama3-8b shape at widths 256, 512
    nice python bench/scale.py --widths 512,1024,2048,4096 --out bench/results/scale_llama3-8b.md
    python bench/scale.py --arch gpt-j-6b --methods rome,memit --widths 1024,4096 --dtype bfloat16 --device cuda
    python bench/scale.py --widths 1024,4096 --device cuda --dtype bfloat16 --sae 32768,65536,131072

Per method and width (one model per width, one editor per method, built from the method's YAML with
its step budgets capped at `--steps` so that a random model, which never reaches an edit's stopping
test, costs the same steps as a real one that needs them all):
- stats s: `editor.prepare(corpus)` (second moments, calibration) over `--corpus-lines` lines of the
  world's corpus, computed afresh (`$LIGHTNING_EDIT_CACHE` and `editor.stats_dir` point at a scratch
  folder of the cell's own);
- s/edit: median wall time of `editor.apply([record])` over `--edits` records, and the steps it took;
- fwd+bwd s: the same LM passes the edit made, replayed alone on the same model. Every call of the
  model's forward during an edit is recorded (batch shape, grad mode); each distinct shape is then
  timed alone (fastest of three: a forward, plus a backward from the logits to the input embeddings when the call ran
  with grad on) and multiplied by its count. The replayed backward reaches the embeddings while an
  editor's stops at its edited layer, so the replay is an upper bound of the passes' cost and the
  ratio a lower bound. Passes that skip the model's forward (e.g. MicroEdit's stage-1 reconstruction
  steps on the SAE alone) are not in the replay: they count as overhead.
- overhead = s/edit / fwd+bwd s (target of issue 14: <= 1.5);
- peak MiB: the process's peak resident memory (VmHWM, reset before each cell through
  /proc/self/clear_refs) on CPU, or peak CUDA memory allocated on GPU, from building the editor to
  the last edit; extra MiB = peak minus the memory held right after the model was built (the
  editor's statistics, component, optimiser and caches).
Below the table: growth exponents, the least-squares slope of log(value) against log(width) per
method (2 = quadratic in width); an LM pass is ~2 (d_model x d_ff matrices), a d_ff x d_ff solve ~3.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # datamodules/ when run as a script


@dataclass(frozen=True)
class Arch:
    """A real model's layer shape (its config.json), written here so nothing is downloaded."""

    family: str        # llama | qwen2 | gptj | gpt2
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    layers: int        # the real depth (the bench cuts it to --layers)
    world: str         # whose tokenizer, records and corpus
    rotary_dim: int | None = None


ARCHS: dict[str, Arch] = {
    "llama3-8b": Arch("llama", 4096, 14336, 32, 8, 32, "toyworld"),
    "qwen2.5-7b": Arch("qwen2", 3584, 18944, 28, 4, 28, "toyworld"),
    "gpt-j-6b": Arch("gptj", 4096, 16384, 16, 16, 28, "toyworld-gpt2", rotary_dim=64),
    "gpt2-xl": Arch("gpt2", 1600, 6400, 25, 25, 48, "toyworld-gpt2"),
}
STEP_KEYS = ("v_steps", "max_steps", "n_iter", "stage1_max_steps", "stage2_max_steps")
QUICK = dict(widths="256,512", edits=2, steps=4, corpus_lines=96)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llama3-8b", choices=sorted(ARCHS))
    p.add_argument("--widths", default="512,1024,2048,4096", help="d_model values (the arch's own = the real shape)")
    p.add_argument("--methods", default=None, help="comma list (default: every registered editor)")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--edits", type=int, default=3, help="records applied per cell (the median is reported)")
    p.add_argument("--steps", type=int, default=8, help="cap on each method's optimisation steps per edit")
    p.add_argument("--corpus-lines", type=int, default=512, help="corpus lines handed to prepare")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help=f"every method at two small widths, < 5 min on 2 cores: {QUICK}")
    p.add_argument("--out", default=None, help="also write the table here (markdown; JSON beside it)")
    p.add_argument("--sae", default=None, metavar="LATENTS",
                   help="also run bench/sae_throughput.py at d_in = the widest width with these latents "
                        "(e.g. 32768,65536: tokens/s against sparsify in the same run, and memory)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="print the table of a (possibly unfinished) run's JSON instead of measuring")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="editor overrides for every method "
                   "(editor.KEY=VALUE) or one (METHOD:editor.KEY=VALUE)")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if p.get_default(key) == getattr(args, key):
                setattr(args, key, value)
    return args


def shape_at(arch: Arch, width: int, layers: int) -> dict:
    """The arch's shape at d_model `width`: same head size and d_ff / d_model ratio."""
    head_dim = arch.hidden // arch.heads
    if width % head_dim:
        raise SystemExit(f"error: width {width} is not a multiple of the head size {head_dim}")
    heads = width // head_dim
    kv = max(1, heads * arch.kv_heads // arch.heads)
    while heads % kv:
        kv -= 1
    mlp = int(round(arch.mlp * width / arch.hidden / 64)) * 64 if width != arch.hidden else arch.mlp
    return dict(hidden=width, mlp=mlp, heads=heads, kv_heads=kv, layers=layers, head_dim=head_dim)


def build_model(arch: Arch, shape: dict, vocab: int, dtype, device: str):
    """A random-init causal LM of `arch`'s family at `shape` (seeded)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPTJConfig, LlamaConfig, Qwen2Config

    if arch.family in ("llama", "qwen2"):
        cls = LlamaConfig if arch.family == "llama" else Qwen2Config
        config = cls(vocab_size=vocab, hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
                     num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                     num_hidden_layers=shape["layers"], max_position_embeddings=2048, tie_word_embeddings=False)
    elif arch.family == "gptj":
        config = GPTJConfig(vocab_size=vocab, n_embd=shape["hidden"], n_inner=shape["mlp"], n_head=shape["heads"],
                            n_layer=shape["layers"], rotary_dim=arch.rotary_dim, n_positions=2048)
    else:
        config = GPT2Config(vocab_size=vocab, n_embd=shape["hidden"], n_inner=shape["mlp"], n_head=shape["heads"],
                            n_layer=shape["layers"], n_positions=1024)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).eval()


class PassRecorder:
    """Records (batch shape, grad on) of every forward call of `model` while active."""

    def __init__(self, model):
        self.model, self.calls, self.handle = model, [], None

    def __enter__(self):
        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            import torch

            if ids is not None:
                self.calls.append((tuple(ids.shape), torch.is_grad_enabled()))

        self.handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def replay_seconds(model, calls: list[tuple[tuple[int, ...], bool]], sync) -> float:
    """Wall time of `calls` replayed alone: each distinct (shape, grad) timed once, times its count."""
    import torch

    counts: dict[tuple, int] = {}
    for call in calls:
        counts[call] = counts.get(call, 0) + 1
    total = 0.0
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    for (shape, grad), n in counts.items():
        ids = torch.randint(vocab, shape, device=device)
        took = []
        for _ in range(3):  # the first also pays first-call costs; other load on shared cores: keep the fastest
            sync()
            begin = time.perf_counter()
            if grad:
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, use_cache=False).logits
                logits.float().logsumexp(-1).mean().backward()
            else:
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)
            sync()
            took.append(time.perf_counter() - begin)
        total += min(took) * n
    return total


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


def reset_peak(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        except OSError:
            pass


def memory_now(cuda: bool) -> float:
    import torch

    return torch.cuda.memory_allocated() / 2**20 if cuda else _status("VmRSS")


def memory_peak(cuda: bool) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if cuda else _status("VmHWM")


def method_params(method: str, steps: int, overrides: list[str]) -> tuple[dict, dict]:
    """(editor params, component cfg) of `method`'s YAML, steps capped. Layers and hookpoints are in the
    YAMLs' depth-relative notation (`layers.-2`, `25%`), which every model resolves to its own."""
    from lightning_edit.config import load_config
    from lightning_edit.editors.registry import editor_class
    from lightning_edit.jobs.edit import SCHEMA
    from omegaconf import OmegaConf

    sys.path.insert(0, str(REPO / "bench"))
    from edit_latency import find_config

    mine = [o.split(":", 1)[1] for o in overrides if o.startswith(f"{method}:")]
    common = [o for o in overrides if ":" not in o.split("=", 1)[0]]
    cfg = load_config(SCHEMA, [f"config={find_config(method)}", *common, *mine])
    params = OmegaConf.to_container(cfg.editor, resolve=True)
    component = OmegaConf.to_container(cfg.component, resolve=True)
    names = {f.name for f in fields(editor_class(method).make_config(params))}
    for key in STEP_KEYS:
        if key in names and not any(o.split("=")[0].endswith(f"editor.{key}") for o in [*common, *mine]):
            params[key] = min(int(params.get(key) or steps), steps)
    return params, component


def random_component(kind: str, hookpoint: str, width: int, folder: Path, device: str) -> Path:
    """A random top-k coder (k 32, 8 x d_model latents) at `hookpoint`, saved in the sparsify layout."""
    import torch
    from lightning_edit.sparse import SparseCoderConfig, TopKSparseCoder, save_sparsify

    torch.manual_seed(0)
    coder = TopKSparseCoder(SparseCoderConfig(d_in=width, num_latents=8 * width, k=32, mode=kind))
    save_sparsify(coder, folder / hookpoint)
    return folder


def run_cell(method: str, arch: Arch, width: int, args, world, records, corpus, scratch: Path) -> dict:
    import torch
    from lightning_edit.editors.registry import editor_class
    from lightning_edit.jobs.edit_run import new_editor
    from lightning_edit.models import DTYPES, ModelAdapter, _load_tokenizer

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    shape = shape_at(arch, width, args.layers)
    tokenizer = _load_tokenizer(world.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = build_model(arch, shape, len(tokenizer), DTYPES[args.dtype], args.device)
    adapter = ModelAdapter(model)
    params, component = method_params(method, args.steps, args.overrides)
    cls = editor_class(method)
    request = cls.component_request(cls.make_config(params), component, adapter)
    if request is not None:
        hookpoint = adapter.resolve_hookpoint(request.hookpoint)
        folder = scratch / f"{request.kind}-{width}"
        if not (folder / hookpoint).is_dir():
            random_component(request.kind, hookpoint, width, folder, args.device)
        component = {**component, "path": str(folder), "hookpoint": hookpoint}
    names = {f.name for f in fields(cls.make_config(params))}
    cell = scratch / f"{method}-{width}"  # statistics caches of this cell only: nothing is read from another
    os.environ["LIGHTNING_EDIT_CACHE"] = str(cell / "cache")
    if "stats_dir" in names:
        params["stats_dir"] = str(cell / "stats")
    gc.collect()
    base_mem = memory_now(cuda)
    reset_peak(cuda)
    begin = time.perf_counter()
    editor = new_editor(method, params, model, tokenizer, adapter, component, f"random-{arch.family}-{width}",
                        world=None)
    editor.prepare(corpus)
    sync()
    stats_s = time.perf_counter() - begin
    seconds, steps, passes = [], [], []
    for record in records:
        with PassRecorder(model) as rec:
            begin = time.perf_counter()
            entries = editor.apply([record])
            sync()
            seconds.append(time.perf_counter() - begin)
        steps.append(sum(e.steps for e in entries))
        passes.append(rec.calls)
    peak = memory_peak(cuda)
    replay = statistics.median(replay_seconds(model, calls, sync) for calls in passes)
    edit_s = statistics.median(seconds)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    del editor, model
    gc.collect()
    return dict(method=method, width=width, d_ff=shape["mlp"], heads=shape["heads"], params_m=round(params_m, 1),
                stats_s=stats_s, edit_s=edit_s, steps=statistics.median(steps),
                passes=statistics.median(len(c) for c in passes), fwd_bwd_s=replay,
                overhead=edit_s / replay if replay > 0 else math.inf, peak_mib=peak, extra_mib=peak - base_mem,
                model_mib=base_mem)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x (nan with fewer than two usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else math.nan


def render(rows: list[dict], args, command: str, notes: list[str]) -> str:
    lines = [f"`{command}`", "",
             f"arch {args.arch} ({asdict(ARCHS[args.arch])}), {args.layers} layers, {args.dtype} on {args.device}, "
             f"{args.threads} torch thread(s), steps capped at {args.steps}, {args.edits} edits per cell, "
             f"{args.corpus_lines} corpus lines; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, load average at start {notes[0]}", "",
             "| method | width | d_ff | params M | stats s | s/edit | steps | LM passes | fwd+bwd s | overhead | "
             "peak MiB | extra MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['width']} | | | | | | | | error: {r['error']} | | |")
            continue
        flag = " **>1.5**" if r["overhead"] > 1.5 else ""
        lines.append(f"| {r['method']} | {r['width']} | {r['d_ff']} | {r['params_m']} | {r['stats_s']:.2f} | "
                     f"{r['edit_s']:.3f} | {r['steps']:g} | {r['passes']:g} | {r['fwd_bwd_s']:.3f} | "
                     f"{r['overhead']:.2f}{flag} | {r['peak_mib']:.0f} | {r['extra_mib']:.0f} |")
    lines += ["", "Growth exponents (slope of log value on log width):", "",
              "| method | stats s | s/edit | fwd+bwd s | peak MiB | extra MiB |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and "error" not in r]
        ws = [r["width"] for r in mine]
        cols = [slope(ws, [r[k] for r in mine]) for k in ("stats_s", "edit_s", "fwd_bwd_s", "peak_mib", "extra_mib")]
        lines.append(f"| {method} | " + " | ".join("-" if math.isnan(c) else f"{c:.2f}" for c in cols) + " |")
    lines += ["", f"load average at end {notes[1]}"]
    return "\n".join(lines) + "\n"


def render_saved(path: Path) -> int:
    """Print the table of a saved run (the JSON `--out` writes after every cell)."""
    saved = json.loads(path.read_text())
    args = parse_args(shlex.split(saved["command"])[2:])
    methods = list(dict.fromkeys(r["method"] for r in saved["rows"]))
    rows = sorted(saved["rows"], key=lambda r: (methods.index(r["method"]), r["width"]))
    done = f"not recorded ({len(rows)} cells rendered from {path.name} by --render)"
    table = render(rows, args, saved["command"], [saved.get("load_start", "?"), done])
    print(table + (f"\n{saved['note']}\n" if saved.get("note") else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/scale.py", *(sys.argv[1:] if argv is None else argv)])
    if args.render:
        return render_saved(Path(args.render))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from datamodules.edits import EditStream
    from lightning_edit.editors import EDITORS
    from lightning_edit.jobs.edit_run import read_corpus
    from lightning_edit.locate.statistics import evenly_spaced
    from lightning_edit.world import load_world

    torch.set_num_threads(args.threads)
    arch = ARCHS[args.arch]
    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(EDITORS)
    unknown = [m for m in methods if m not in EDITORS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; expected some of {sorted(EDITORS)}")
    world = load_world(arch.world)
    stream = EditStream(world.counterfact_path, order_seed=0, limit=args.edits)
    stream.setup("fit")
    corpus = evenly_spaced(read_corpus(None, world), args.corpus_lines)
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows: list[dict] = []
    out = Path(args.out) if args.out else None
    saved = lambda: dict(command=command, load_start=load_start, rows=rows)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as scratch:
        for width in widths:
            for method in methods:
                print(f"[scale] {method} at width {width} ...", file=sys.stderr, flush=True)
                cache = os.environ.get("LIGHTNING_EDIT_CACHE")
                try:
                    row = run_cell(method, arch, width, args, world, stream.records, corpus, Path(scratch))
                except Exception as err:  # a failing cell is a row, not the end of the table
                    row = dict(method=method, width=width, error=f"{type(err).__name__}: {str(err)[:160]}")
                finally:  # run_cell points the statistics cache at the cell's scratch folder
                    if cache is None:
                        os.environ.pop("LIGHTNING_EDIT_CACHE", None)
                    else:
                        os.environ["LIGHTNING_EDIT_CACHE"] = cache
                rows.append(row)
                print(f"[scale] {json.dumps(row)}", file=sys.stderr, flush=True)
                if out:
                    out.with_suffix(".json").write_text(json.dumps(saved(), indent=1))
    table = render(sorted(rows, key=lambda r: (methods.index(r["method"]), r["width"])), args, command,
                   [load_start, " ".join(f"{x:.2f}" for x in os.getloadavg())])
    if args.sae:  # SAE training at the widest width: the throughput bench's own table, appended
        import subprocess

        sae = [sys.executable, str(REPO / "bench" / "sae_throughput.py"), "--d-in", str(max(widths)),
               "--num-latents", args.sae, "--device", args.device, "--dtype", args.dtype,
               "--threads", str(args.threads)]
        sae += ["--out", str(out.with_name(out.stem + "_sae.md") if out else Path(tempfile.mkdtemp()) / "sae.md")]
        done = subprocess.run(sae, capture_output=True, text=True)
        table += f"\nSAE training at d_in {max(widths)} (`{shlex.join(sae[1:])}`):\n\n" + (
            done.stdout if done.returncode == 0 else f"failed (exit {done.returncode}): {done.stderr[-500:]}\n")
    print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        out.with_suffix(".json").write_text(json.dumps(saved(), indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
