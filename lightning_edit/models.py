"""The one architecture adapter through which all model access goes.

Everything (layer list, MLP, down projection, final norm, embeddings) is resolved structurally from
the model's own modules, never from its name or ``config.model_type``: a new architecture that is
shaped like a decoder-only transformer works without touching this file.

Hookpoints are module names relative to ``ModelAdapter.base_model`` (the module that owns the layer
list), the convention of EleutherAI/sparsify: ``"layers.3.mlp"`` for Llama, ``"h.3.mlp"`` for GPT-2.
Configs name them relative to the model's depth (`ModelAdapter.resolve_hookpoint`): ``layers.-1``,
``layers.50%.mlp`` resolve to ``layers.3`` / ``h.3.mlp`` on a 4- / 6-layer model, and editors'
`layer` / `layers` values are resolved the same way (`ModelAdapter.resolve_layer`); the absolute
value is what runs record.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.tokenization_auto import get_tokenizer_config
from transformers.pytorch_utils import Conv1D

from lightning_edit.world import resolve_model_path

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
HOOK_KINDS = ("forward", "forward_pre")
LAYER_NOTATION = ("expected a layer index (negative counts from the last layer, -1 = the last) or a "
                  "percentage of depth such as 50% (0% = the first layer, 100% = the last)")
HOOKPOINT_NOTATION = "layers.<layer>[.mlp], e.g. layers.2, layers.-1, layers.50%.mlp"


def parse_layer(spec: int | str, key: str = "layer") -> int | float:
    """The layer notation without a model: an index (int; negative counts from the last layer) or a
    fraction of depth in [0, 1] (float, from "P%"); a ValueError naming `key` for anything else."""
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise ValueError(f"{key} is {spec!r}; {LAYER_NOTATION}")
    text = str(spec).strip()
    try:
        if text.endswith("%"):
            fraction = float(text[:-1]) / 100.0
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"{key} is {spec!r}; a percentage of depth lies in 0%..100%")
            return fraction
        return int(text)
    except ValueError as exc:
        if str(exc).startswith(key):
            raise
        raise ValueError(f"{key} is {spec!r}; {LAYER_NOTATION}") from None


DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def load_model(
    name: str, dtype: str = "float32", device: str = "cpu", device_map: str | Mapping[str, Any] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from an embedded world name, a local directory or the hub.

    The model comes back in eval mode; a tokenizer without a pad token pads with its EOS token, so
    batched scoring works for every model the same way.

    `device_map` (then `device` is not used): "auto", "balanced", "balanced_low_0", "sequential" or an
    explicit {module name: device} map (devices as 0, "cuda:1", "cpu", "disk"), loaded through
    accelerate, which places each layer and moves hidden states between devices. Layers it offloads
    (to "cpu" beside GPUs, or to "disk") keep their weights on the meta device between passes: they
    run, but cannot be edited (`ModelAdapter.down_proj_weight` refuses them; see `offloaded_modules`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    placement = {"device_map": check_device_map(device_map)} if device_map is not None else {}
    path = _world_model_path(name) or name
    if Path(path).is_absolute() and not Path(path).is_dir():
        # An absolute path is never a hub id: say so instead of a confusing repo-id error.
        raise OSError(f"could not load model {name!r}: no such local directory {str(path)!r}")
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise OSError(f"could not load model {name!r}: directory {str(path)!r} has no config.json")
    try:
        if device_map is not None and "disk" in _map_devices(device_map):
            import tempfile

            placement["offload_folder"] = tempfile.mkdtemp(prefix="lightning-edit-offload-")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **placement)
        tokenizer = _load_tokenizer(path)
    except OSError as err:
        if Path(path).is_dir():  # e.g. a directory without config.json or tokenizer files
            raise OSError(f"could not load model {name!r} from directory {str(path)!r}: {err}") from err
        raise OSError(
            f"could not load model {name!r}: not a local directory and the hub is unreachable "
            f"or has no such model ({err})"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device_map is None:
        model = model.to(device)
    elif offloaded := offloaded_modules(model):
        print(f"[lightning-edit] device_map offloads {len(offloaded)} module(s) (e.g. {offloaded[0]!r}): they run "
              "but cannot be edited", file=sys.stderr)
    return model.eval(), tokenizer


def check_device_map(device_map: Any) -> str | dict[str, Any]:
    """`device_map` as accelerate takes it, or a ValueError naming what is expected; accelerate must be
    installed (`pip install accelerate`, or the `eval` extra)."""
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_NAMES:
            raise ValueError(f"model.device_map {device_map!r} is not a strategy; expected one of "
                             f"{list(DEVICE_MAP_NAMES)} or a {{module: device}} map")
    elif isinstance(device_map, Mapping) and device_map:
        bad = {k: v for k, v in device_map.items() if not isinstance(k, str) or not isinstance(v, (int, str))}
        if bad:
            raise ValueError(f"model.device_map entries {bad} are not module name -> device (0, 'cuda:1', "
                             "'cpu', 'disk')")
        device_map = dict(device_map)
    else:
        raise ValueError(f"model.device_map must be one of {list(DEVICE_MAP_NAMES)} or a non-empty "
                         f"{{module: device}} map, got {device_map!r}")
    if importlib.util.find_spec("accelerate") is None:
        raise ValueError("model.device_map needs accelerate: pip install accelerate (or the project's "
                         "`eval` extra)")
    return device_map


def _map_devices(device_map: Any) -> set[str]:
    return {str(v) for v in device_map.values()} if isinstance(device_map, Mapping) else set()


def offloaded_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose own weights sit on the meta device (offloaded by accelerate)."""
    return [name for name, module in model.named_modules()
            if any(p.device.type == "meta" for p in module.parameters(recurse=False))]


def _load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer, except that a checkpoint declaring the generic ``TokenizersBackend`` (what
    transformers 5 writes for a plain tokenizer.json, e.g. a locally built WordLevel tokenizer) gets
    exactly that: for some model types AutoTokenizer would otherwise substitute the type's own class
    and silently tokenise with a different vocabulary."""
    if get_tokenizer_config(path).get("tokenizer_class") == "TokenizersBackend":
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _world_model_path(name: str) -> Path | None:
    """The embedded world's HF directory for ``name`` (built on first use), or None."""
    return resolve_model_path(name)


def model_device(module: nn.Module) -> torch.device:
    """Where a module's parameters live (CPU for a module without any). For a whole model loaded with a
    device map this is its first parameter's device (the embeddings': where input ids go); a layer's
    own is `module_device(layer)`."""
    return module_device(module)


def module_device(module: nn.Module) -> torch.device:
    """Where `module` computes: the execution device accelerate's hook gives it (offloaded modules keep
    their weights on the meta device), else its first parameter's device, else CPU."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def offloaded_value(model: nn.Module, name: str) -> torch.Tensor:
    """The values of `model`'s tensor `name` that a device map offloaded (its parameter is on the meta
    device), read from the accelerate hook that holds them (its weights map)."""
    module_name, _, tensor_name = name.rpartition(".")
    hook = getattr(model.get_submodule(module_name), "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None or tensor_name not in weights:
        raise ValueError(f"{name} is on the meta device and no accelerate hook holds its values")
    return weights[tensor_name]


def resident_parameters(module: nn.Module) -> list[torch.Tensor]:
    """`module.parameters()` in order, an offloaded one (on the meta device) by its offloaded values."""
    return [offloaded_value(module, name) if p.device.type == "meta" else p
            for name, p in module.named_parameters()]


def module_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype of `module`'s first floating parameter (float32 for a module without any)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the block, restoring the model's training flag after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def freeze(model: nn.Module) -> None:
    """No parameter of `model` gets a gradient (an editor turns on only what it edits, when it edits)."""
    for p in model.parameters():
        p.requires_grad_(False)


def max_positions(model: nn.Module) -> int | None:
    """The model's context length from its config (None when it declares none)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden state in a module's output: the tensor itself, or the first element of a tuple.

    Decoder layers return one or the other depending on architecture and transformers version.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"expected a tensor or a tuple starting with one, got {type(output).__name__}")


def with_hidden(output: Any, new_hidden: torch.Tensor) -> Any:
    """``output`` with its hidden state (see ``hidden_of``) replaced by ``new_hidden``."""
    if isinstance(output, torch.Tensor):
        return new_hidden
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return type(output)([new_hidden, *output[1:]])
    raise TypeError(f"expected a tensor or a tuple starting with one, got {type(output).__name__}")


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear-like module (nn.Linear or GPT-2's Conv1D), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # weight is [in, out] = [nx, nf]
        return module.nx, module.nf
    return None


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """A linear-like module's weight as [out, in], aliasing the parameter (Conv1D is transposed)."""
    if isinstance(module, Conv1D):
        return module.weight.T
    return module.weight


def is_norm(module: nn.Module) -> bool:
    """Structural test for a normalisation layer: any *RMSNorm / *LayerNorm class (torch's own included)."""
    return type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def _is_attention(module: nn.Module) -> bool:
    """Class-name test used only to break a tie between equally wide down-projection candidates."""
    name = type(module).__name__.lower()
    return "attention" in name or "attn" in name


def _match(pattern: str, name: str) -> bool:
    """Glob match on dotted names where ``*`` stays within one segment: "layers.*" means the layers,
    not every module below them (plain fnmatch would let ``*`` cross dots)."""
    pattern_parts, name_parts = pattern.split("."), name.split(".")
    return len(pattern_parts) == len(name_parts) and all(
        fnmatchcase(n, p) for p, n in zip(pattern_parts, name_parts)
    )


class ModelAdapter:
    """Structural view of a decoder-only causal LM: layers, MLPs, down projections, norms, hooks.

    Only names are cached; modules are looked up on every access so that a ``swap`` is always seen.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        layers_path = self._find_layers_path()
        self.base_model_prefix, _, self.layers_name = layers_path.rpartition(".")
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None)
        self.hidden_size: int = int(hidden) if hidden else self.embeddings.embedding_dim
        self.num_layers: int = len(self.layers)
        # Per layer: (MLP child name, down projection path inside it) or the reason it is unresolvable.
        self._mlp_paths: list[tuple[str, str] | str] = [
            self._find_mlp(i, layer) for i, layer in enumerate(self.layers)
        ]

    # --- structure -------------------------------------------------------------------------------

    def _find_layers_path(self) -> str:
        """Path of the decoder layer list: the ModuleList of num_hidden_layers with the most parameters."""
        config = getattr(self.model, "config", None)
        n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        candidates = [
            (name, module)
            for name, module in self.model.named_modules()
            if isinstance(module, nn.ModuleList) and (n_layers is None or len(module) == n_layers)
        ]
        if not candidates:
            raise ValueError(
                f"{type(self.model).__name__}: no nn.ModuleList of length {n_layers} "
                "(config.num_hidden_layers) to use as the decoder layers"
            )
        return max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))[0]

    def _find_mlp(self, i: int, layer: nn.Module) -> tuple[str, str] | str:
        """(MLP child name, down path) for layer i, or why there is none.

        The MLP is the direct child holding a linear-like d_ff -> hidden map with d_ff > hidden (the
        down projection). Attention usually maps hidden -> hidden, so the widest such input wins; when
        an attention output is exactly as wide (heads * head_dim == d_ff), the child whose class is
        named like attention drops out.
        """
        found: list[tuple[int, str, str]] = []  # (d_ff, child name, path inside child)
        for child_name, child in layer.named_children():
            for path, sub in child.named_modules():
                dims = linear_dims(sub)
                if dims and dims[1] == self.hidden_size and dims[0] > self.hidden_size:
                    found.append((dims[0], child_name, path))
        if not found:
            return f"layer {i} has no linear-like map from d_ff > {self.hidden_size} to {self.hidden_size}"
        widest = max(d for d, _, _ in found)
        best = [(c, p) for d, c, p in found if d == widest]
        if len(best) > 1:
            best = [(c, p) for c, p in best if not _is_attention(layer.get_submodule(c))] or best
        if len(best) > 1:
            names = [f"{c}.{p}" if p else c for c, p in best]
            return f"layer {i} has several candidate down projections {names} (d_ff={widest})"
        return best[0]

    def _mlp_path(self, i: int) -> tuple[str, str]:
        entry = self._mlp_paths[i]
        if isinstance(entry, str):
            raise ValueError(f"{type(self.model).__name__}: cannot resolve the MLP: {entry}")
        return entry

    @property
    def base_model(self) -> nn.Module:
        """The module that owns the decoder layer list; hookpoints are relative to it."""
        return self.model.get_submodule(self.base_model_prefix)

    @property
    def layers(self) -> nn.ModuleList:
        return self.base_model.get_submodule(self.layers_name)

    def layer(self, i: int) -> nn.Module:
        return self.layers[i]

    def layer_name(self, i: int) -> str:
        """Hookpoint name of layer i, e.g. "layers.3" / "h.3"."""
        return f"{self.layers_name}.{i}"

    def mlp_name(self, i: int) -> str:
        """Hookpoint name of layer i's MLP, e.g. "layers.3.mlp" / "h.3.mlp"."""
        return f"{self.layer_name(i)}.{self._mlp_path(i)[0]}"

    def mlp(self, i: int) -> nn.Module:
        return self.module(self.mlp_name(i))

    def down_proj_name(self, i: int) -> str:
        """Hookpoint name of layer i's down projection, e.g. "layers.3.mlp.down_proj"."""
        child, path = self._mlp_path(i)
        return ".".join(filter(None, (self.layer_name(i), child, path)))

    def down_proj(self, i: int) -> nn.Module:
        """Layer i's d_ff -> hidden projection: nn.Linear, or Conv1D (weight [in, out]) for GPT-2."""
        return self.module(self.down_proj_name(i))

    def down_proj_weight(self, i: int) -> torch.Tensor:
        """Down projection weight as [d_model, d_ff], aliasing the parameter: in-place edits (under
        torch.no_grad) land in the model. A ValueError for a layer a device map offloaded (its weight
        is on the meta device, where an edit would silently be lost)."""
        weight = weight_out_in(self.down_proj(i))
        if weight.device.type == "meta":
            raise ValueError(f"layer {i}'s down projection ({self.down_proj_name(i)}) is offloaded by "
                             "model.device_map (its weights are on the meta device): an edited layer "
                             "must be mapped to a device (a GPU, or cpu when the whole model is on cpu)")
        return weight

    def layer_device(self, i: int) -> torch.device:
        """The device layer i computes on (its own under a device map)."""
        return module_device(self.layer(i))

    def layer_dtype(self, i: int) -> torch.dtype:
        return module_dtype(self.layer(i))

    def hookpoint_device(self, hookpoint: str) -> torch.device:
        """The device the module at `hookpoint` computes on (what a component attached there follows)."""
        return module_device(self.module(hookpoint))

    def intermediate_size(self, i: int) -> int:
        return linear_dims(self.down_proj(i))[0]

    @property
    def embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def unembedding(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def unembedding_weight(self) -> torch.Tensor:
        """Unembedding as [vocab, d_model] (aliases the parameter; tied models share it with embeddings)."""
        return weight_out_in(self.unembedding)

    @property
    def final_norm(self) -> nn.Module:
        """The norm applied after the last layer: the last norm-like child of base_model (registered
        after the layer list when there is one, so an embedding norm is never picked)."""
        children = list(self.base_model.named_children())
        after_layers = children[[name for name, _ in children].index(self.layers_name) + 1 :]
        norms = [m for _, m in after_layers if is_norm(m)] or [m for _, m in children if is_norm(m)]
        if not norms:
            raise ValueError(
                f"{type(self.model).__name__}: no norm-like child of {self._base_desc} "
                f"among {[n for n, _ in children]}"
            )
        return norms[-1]

    # --- hookpoints ------------------------------------------------------------------------------

    def hookpoint_names(self) -> list[str]:
        """Every module name under base_model, in registration order."""
        return [name for name, _ in self.base_model.named_modules() if name]

    def resolve_layer(self, spec: int | str, key: str = "layer") -> int:
        """A layer given relative to this model's depth as its absolute index in 0..n-1 (LAYER_NOTATION):
        an int (negative counts from the last layer: -1 is the last) or a percentage of depth "P%"
        (0% the first layer, 100% the last, nearest layer, halves rounded up). A ValueError naming
        `key` when the model has no such layer or the value is neither."""
        n = self.num_layers
        index = parse_layer(spec, key)
        if isinstance(index, float):
            return int(math.floor(index * (n - 1) + 0.5))
        if not -n <= index < n:
            raise ValueError(f"{key} is {spec!r}; the model has {n} layers (0..{n - 1}, or -1..-{n})")
        return index % n

    def resolve_layers(self, specs: list[int | str], key: str = "layers") -> list[int]:
        """`resolve_layer` for each of `specs`, in order (duplicates kept)."""
        return [self.resolve_layer(spec, f"{key}[{i}]") for i, spec in enumerate(specs)]

    def resolve_hookpoint(self, spec: str, key: str = "hookpoint") -> str:
        """A hookpoint in the depth-relative notation (HOOKPOINT_NOTATION) as this model's module name:
        `layers.<layer>[.mlp][.rest]` -> e.g. "layers.2", "h.4.mlp" (`layers` stands for the decoder
        layer list whatever the model calls it, `mlp` for its MLP child, `<layer>` as in
        `resolve_layer`); any other name is returned as it is. The module must exist."""
        name = self._canonical(spec, key)
        if "*" not in name and "?" not in name and "[" not in name:
            self.module(name)
        return name

    def _canonical(self, spec: str, key: str) -> str:
        parts = str(spec).split(".")
        if len(parts) < 2 or parts[0] not in ("layers", self.layers_name):
            return str(spec)
        if parts[0] == "layers" and self.layers_name != "layers" and hasattr(self.base_model, "layers"):
            return str(spec)  # the model has a module of that name that is not its layer list
        segment, rest = parts[1], parts[2:]
        if any(c in segment for c in "*?["):
            index = None
        else:
            # a percentage's own dot ("12.5%") spans two segments
            if rest and rest[0].endswith("%") and segment.isdigit():
                segment, rest = f"{segment}.{rest[0]}", rest[1:]
            index = self.resolve_layer(segment, f"the layer of {key} {spec!r}")
            segment = str(index)
        if rest and rest[0] == "mlp":
            layer = self.layers[index if index is not None else 0]
            if not hasattr(layer, "mlp") and not isinstance(self._mlp_paths[index or 0], str):
                rest = [self._mlp_paths[index or 0][0], *rest[1:]]
        return ".".join([self.layers_name, segment, *rest])

    def resolve_hookpoints(self, spec: str | list[str]) -> list[str]:
        """Expand names or glob patterns ("layers.*.mlp", "h.*"; ``*`` within one dotted segment), each
        in the depth-relative notation of `resolve_hookpoint` ("layers.-1", "layers.50%.mlp"), to
        hookpoint names in model order; every pattern must match something."""
        patterns = [spec] if isinstance(spec, str) else list(spec)
        patterns = [self._canonical(p, "hookpoint") for p in patterns]
        names = self.hookpoint_names()
        for pattern in patterns:
            if not any(_match(pattern, name) for name in names):
                raise ValueError(
                    f"hookpoint {pattern!r} matches no module of {type(self.model).__name__}; "
                    f"names are relative to {self._base_desc}, e.g. {self._examples()}"
                )
        return [name for name in names if any(_match(p, name) for p in patterns)]

    @property
    def _base_desc(self) -> str:
        return repr(self.base_model_prefix) if self.base_model_prefix else "the model itself"

    def _examples(self) -> list[str]:
        examples = [self.layer_name(0), f"{self.layers_name}.*"]
        if not isinstance(self._mlp_paths[0], str):
            examples.append(f"{self.layers_name}.*.{self._mlp_paths[0][0]}")
        return examples

    def module(self, hookpoint: str) -> nn.Module:
        try:
            return self.base_model.get_submodule(hookpoint)
        except AttributeError:
            raise ValueError(
                f"no module {hookpoint!r} in {type(self.model).__name__} (names are relative to "
                f"{self._base_desc}, e.g. {self._examples()})"
            ) from None

    def hookpoint_io_dims(self, hookpoint: str) -> tuple[int, int]:
        """(in, out) width of the hidden state entering and leaving a hookpoint.

        Known structurally for linear-like modules, norms, the layers and their direct children
        (attention, MLP: residual-stream in and out).
        """
        module = self.module(hookpoint)
        dims = linear_dims(module)
        if dims:
            return dims
        if is_norm(module) and getattr(module, "weight", None) is not None:
            return module.weight.shape[-1], module.weight.shape[-1]
        parts = hookpoint.split(".")
        if parts[0] == self.layers_name and len(parts) in (2, 3) and parts[1].isdigit():
            return self.hidden_size, self.hidden_size
        raise ValueError(
            f"cannot tell the input/output widths of hookpoint {hookpoint!r} ({type(module).__name__}); "
            "known for layers, their direct children, linear-like modules and norms"
        )

    @contextmanager
    def hooks(self, fns: dict[str, Callable], kind: str = "forward") -> Iterator[None]:
        """Register torch hooks ``{hookpoint: fn}`` for the duration of the block; always removed.

        forward: fn(module, args, output) -> new output or None;
        forward_pre: fn(module, args) -> new args or None.
        """
        if kind not in HOOK_KINDS:
            raise ValueError(f"unknown hook kind {kind!r}; expected one of {HOOK_KINDS}")
        handles = []
        try:
            for hookpoint, fn in fns.items():
                module = self.module(hookpoint)
                if kind == "forward":
                    handles.append(module.register_forward_hook(fn))
                else:
                    handles.append(module.register_forward_pre_hook(fn))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def swap(self, hookpoint: str, new_module: nn.Module) -> Iterator[nn.Module]:
        """Replace the module at ``hookpoint`` for the duration of the block (yields the original)."""
        original = self.module(hookpoint)
        self.base_model.set_submodule(hookpoint, new_module)
        try:
            yield original
        finally:
            self.base_model.set_submodule(hookpoint, original)
