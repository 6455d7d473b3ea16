"""Configuration of a top-k sparse coder (SAE or transcoder).

Field names follow EleutherAI/sparsify's ``SparseCoderConfig`` where the idea is the same
(``num_latents``, ``expansion_factor``, ``k``, ``multi_topk``, ``skip_connection``,
``normalize_decoder``), so a sparsify ``cfg.json`` reads into this class directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, NoReturn

Mode = Literal["sae", "transcoder"]
Activation = Literal["topk", "relu"]

MODES = ("sae", "transcoder")
ACTIVATIONS = ("topk", "relu")


@dataclass
class SparseCoderConfig:
    """Shape and training rules of one sparse coder (METHODS.md section 1)."""

    d_in: int
    """Width of the input activations (the hookpoint's hidden size)."""

    d_out: int | None = None
    """Width of the reconstruction target. None means ``d_in`` (always the case for an SAE;
    a transcoder's target is the MLP output, usually also ``d_in``)."""

    num_latents: int = 0
    """Number of latents n. 0 means ``expansion_factor * d_in``."""

    expansion_factor: int = 32
    """Multiple of ``d_in`` used as the number of latents when ``num_latents`` is 0."""

    k: int = 32
    """Number of non-zero latents per token (top-k activation)."""

    mode: Mode = "sae"
    """"sae": reconstruct the input; "transcoder": predict a module's output from its input."""

    activation: Activation = "topk"
    """"topk" (both modes) or "relu" (transcoders only; every positive latent is kept, so the
    caller must add its own sparsity penalty on ``latent_acts``)."""

    skip_connection: bool = False
    """Transcoder only: add a linear skip path ``x @ W_skip^T`` (``W_skip`` zero-initialised)."""

    normalize_decoder: bool | None = None
    """Keep decoder rows at unit norm (renorm each step, project out the parallel gradient).
    None means True for an SAE and False for a transcoder, which has no norm constraint."""

    multi_topk: bool = False
    """Also report the FVU of the reconstruction from the top ``4 k`` latents (Multi-TopK,
    Gao et al. 2024 / sparsify), returned as ``multi_topk_fvu``."""

    auxk: bool = True
    """Compute the AuxK loss on dead latents (Gao et al. 2024, appendix B.1)."""

    k_aux: int | None = None
    """Number of dead latents used by AuxK. None means ``d_in // 2``."""

    dead_after_tokens: int = 10_000_000
    """A latent is dead once it has not fired for this many tokens."""

    def __post_init__(self):
        if self.normalize_decoder is None:
            self.normalize_decoder = self.mode == "sae"
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when the configuration is inconsistent."""
        for name in ("skip_connection", "normalize_decoder", "multi_topk", "auxk"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, f"must be a bool, got {getattr(self, name)!r}")
        _check_positive_int("d_in", self.d_in)
        if self.d_out is not None:
            _check_positive_int("d_out", self.d_out)
        if isinstance(self.num_latents, bool) or not isinstance(self.num_latents, int):
            _fail("num_latents", f"must be an int, got {self.num_latents!r}")
        if self.num_latents < 0:
            _fail("num_latents", f"must be >= 0 (0 = use expansion_factor), got {self.num_latents}")
        if self.num_latents == 0:
            _check_positive_int("expansion_factor", self.expansion_factor)
        _check_positive_int("k", self.k)
        _check_positive_int("dead_after_tokens", self.dead_after_tokens)
        if self.mode not in MODES:
            _fail("mode", f"must be one of {MODES}, got {self.mode!r}")
        if self.activation not in ACTIVATIONS:
            _fail("activation", f"must be one of {ACTIVATIONS}, got {self.activation!r}")

        n = self.resolved_num_latents
        if self.mode == "sae":
            if self.d_out is not None and self.d_out != self.d_in:
                _fail("d_out", f"={self.d_out}: an SAE reconstructs its input, so d_out must be "
                      f"None or d_in={self.d_in}")
            if self.activation != "topk":
                _fail("activation", f"={self.activation!r} is for transcoders; an SAE uses 'topk'")
            if self.skip_connection:
                _fail("skip_connection", "is only supported for mode='transcoder'")
        elif self.normalize_decoder:
            _fail("normalize_decoder", "=True is not supported for mode='transcoder': its W_dec "
                  "starts at zero and has no norm constraint")
        if self.activation == "topk" and self.k > n:
            _fail("k", f"={self.k} exceeds the number of latents {n}")
        if self.multi_topk:
            if self.activation != "topk":
                _fail("multi_topk", "needs activation='topk'")
            if 4 * self.k > n:
                _fail("multi_topk", f"needs 4*k={4 * self.k} <= the number of latents {n}")
        if self.k_aux is not None:
            _check_positive_int("k_aux", self.k_aux)
            if self.k_aux > n:
                _fail("k_aux", f"={self.k_aux} exceeds the number of latents {n}")

    @property
    def resolved_d_out(self) -> int:
        """``d_out``, or ``d_in`` when unset."""
        return self.d_in if self.d_out is None else self.d_out

    @property
    def resolved_num_latents(self) -> int:
        """``num_latents``, or ``expansion_factor * d_in`` when 0."""
        return self.num_latents or self.expansion_factor * self.d_in

    @property
    def resolved_k_aux(self) -> int:
        """``k_aux``, or ``d_in // 2`` (at least 1, at most the number of latents) when unset."""
        if self.k_aux is not None:
            return self.k_aux
        return max(1, min(self.d_in // 2, self.resolved_num_latents))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], drop_extra_fields: bool = False) -> "SparseCoderConfig":
        """Build from a dict; unknown keys raise unless ``drop_extra_fields``."""
        names = {f.name for f in fields(cls)}
        extra = sorted(set(d) - names)
        if extra and not drop_extra_fields:
            raise ValueError(
                f"unknown SparseCoderConfig fields {extra}; known fields are {sorted(names)}"
            )
        return cls(**{key: value for key, value in d.items() if key in names})


def _fail(field: str, problem: str) -> NoReturn:
    sep = "" if problem.startswith("=") else " "
    raise ValueError(f"SparseCoderConfig.{field}{sep}{problem}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(name, f"must be a positive int, got {value!r}")
