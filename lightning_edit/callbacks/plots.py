"""`DashboardPlots`: the run's curves against T, as PNGs beside the CSV log and as W&B images.

- `edit_metrics.png`: Rel / Gen / Loc (final-state solid, immediate dashed), from EditModule's rows;
- `locality.png`: `locality/agreement` and `locality/kl`, from `LocalityEval`;
- `downstream.png`: every `downstream/<task>` score, from `DownstreamEval`.
Drawn at the end of fit (after the last evaluation); each is logged to W&B as `plots/<name>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from lightning import Callback

from .common import edit_count, run_dir, wandb_loggers
from .downstream import DownstreamEval
from .locality import LocalityEval


def _axes(title: str, ylabel: str, n: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    for ax in axes[0]:
        ax.set_xscale("symlog", linthresh=1)  # T = 0 (the baseline) stays on a log-like axis
        ax.set_xlabel("T (edits so far)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    return fig, axes[0]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_downstream(history: Sequence[dict[str, Any]], path: str | Path, title: str = "downstream") -> Path | None:
    """Each task's score against T (history rows: {"T", "<task>", "<task>_delta", ...})."""
    tasks = [k for k in dict.fromkeys(k for row in history for k in row)
             if k != "T" and not k.endswith(("_delta", "_seconds"))]
    if not tasks:
        return None
    fig, (ax,) = _axes(title, "score")
    for task in tasks:
        points = [(row["T"], row[task]) for row in history if task in row]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=task)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


def plot_locality(history: Sequence[dict[str, Any]], path: str | Path, title: str = "locality") -> Path | None:
    """Argmax agreement and KL against T (history rows: {"T", "agreement", "kl"})."""
    if not history:
        return None
    fig, (left, right) = _axes(title, "", n=2)
    ts = [row["T"] for row in history]
    left.plot(ts, [row["agreement"] for row in history], marker="o", color="tab:green")
    left.set_ylabel("argmax agreement with the unedited model")
    left.set_ylim(-0.02, 1.02)
    right.plot(ts, [row["kl"] for row in history], marker="o", color="tab:red")
    right.set_ylabel("mean KL(unedited || edited), nats")
    return _save(fig, Path(path))


def plot_edit_metrics(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "edit metrics") -> Path | None:
    """Rel / Gen / Loc against T from EditModule's rows (results.plot_results, the job's own plot)."""
    if not rows:
        return None
    from lightning_edit.results import plot_results

    return plot_results(rows, Path(path), title)


class DashboardPlots(Callback):
    def __init__(self, title: str | None = None):
        self.title = title
        self.paths: dict[str, Path] = {}

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        prefix = f"{self.title}: " if self.title else ""
        made = {"edit_metrics": plot_edit_metrics(getattr(pl_module, "rows", None) or [],
                                                  folder / "edit_metrics.png", prefix + "Rel / Gen / Loc")}
        for cb in trainer.callbacks:
            if isinstance(cb, LocalityEval):
                made["locality"] = plot_locality(cb.history, folder / "locality.png", prefix + "locality (held-out prompts)")
            elif isinstance(cb, DownstreamEval):
                made["downstream"] = plot_downstream(cb.history, folder / "downstream.png", prefix + "downstream tasks")
        self.paths = {name: path for name, path in made.items() if path is not None}
        t = edit_count(pl_module)
        for logger in wandb_loggers(trainer):
            for name, path in self.paths.items():
                logger.log_image(key=f"plots/{name}", images=[str(path)], step=t)

