"""PNG plots of a run: loss, PLCC and SRCC per epoch, and predicted score vs MOS on the test split."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from kdiqa_edge.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    return path


def epoch_axis(ax, epochs: int) -> None:
    """x from epoch 0 to `epochs`, whole-epoch ticks: every panel of a run puts epoch e at x = e (the end of
    epoch e, where its metrics were measured), whatever the number of epochs (one epoch included)."""
    from matplotlib.ticker import MaxNLocator

    epochs = max(int(epochs), 1)
    ax.set_xlim(0, epochs + max(0.25, 0.03 * epochs))  # room for the last epoch's marker
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def correlation_panel(ax, history: Sequence[dict]) -> None:
    """Eval PLCC and SRCC per epoch on `ax`, titled with the split they were measured on."""
    epochs = [row["epoch"] for row in history]
    split = history[0].get("eval_split", "eval") if history else "eval"
    for name in ("plcc", "srcc"):
        ax.plot(epochs, [row[name] for row in history], marker=".", label=name.upper())
    epoch_axis(ax, max(epochs, default=1))
    ax.set_title(f"{split} correlation")
    ax.legend()
    ax.grid(alpha=0.3)


NOT_LOSS = {"epoch", "step", "lr", "eval_split", "train_seconds", "images_per_s", "plcc", "plcc_fit", "srcc",
            "krcc", "rmse"}


def loss_terms(history: Sequence[dict], scalars: Iterable[str] = ()) -> list[str]:
    """The columns of metrics.csv the loss panel draws: the loss and its named terms, not the scalars a
    recipe logs beside them (distillation's lambda is a weight in 0..1, not a loss)."""
    skip = NOT_LOSS | set(scalars)
    terms = [k for k in history[0] if k not in skip and isinstance(history[0][k], (int, float))] if history else []
    if len(terms) == 2 and "loss" in terms:  # a single named term is the loss itself: draw it once
        terms = ["loss"]
    return terms


def curves_figure(history: Sequence[dict], title: str = "", scalars: Iterable[str] = ()):
    """Train loss (and its named terms) and eval PLCC/SRCC per epoch, side by side (a matplotlib Figure)."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_corr) = plt.subplots(1, 2, figsize=(11, 4))
    for name in loss_terms(history, scalars):
        ax_loss.plot(epochs, [row.get(name, np.nan) for row in history], marker=".",
                     label=name, linewidth=2 if name == "loss" else 1)
    epoch_axis(ax_loss, max(epochs, default=1))
    ax_loss.set_title("training loss")
    ax_loss.legend()
    correlation_panel(ax_corr, history)
    if title:
        fig.suptitle(title)
    return fig


def plot_curves(history: Sequence[dict], path: Path, title: str = "", scalars: Iterable[str] = ()) -> Path:
    """plots/curves.png: `curves_figure`, written."""
    plt = _pyplot()
    fig = curves_figure(history, title, scalars)
    path = _save(fig, path)
    plt.close(fig)
    return path


def plot_scatter(pred: np.ndarray, mos: np.ndarray, path: Path, title: str = "") -> Path:
    """Predicted score vs MOS, with the identity line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(mos, pred, s=10, alpha=0.6)
    lo, hi = float(min(np.min(mos), np.min(pred))), float(max(np.max(mos), np.max(pred)))
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1, linestyle="--")
    ax.set_xlabel("MOS (1..5)")
    ax.set_ylabel("predicted score")
    ax.set_title(title or "test split")
    path = _save(fig, path)
    plt.close(fig)
    return path


def write_plots(run_dir: Path, history: Sequence[dict], pred: np.ndarray, mos: np.ndarray,
                title: str = "", scalars: Iterable[str] = ()) -> list[Path]:
    plots = Path(run_dir) / "plots"
    written = []
    if history:
        written.append(plot_curves(history, plots / "curves.png", title, scalars))
    if len(pred):
        written.append(plot_scatter(np.asarray(pred), np.asarray(mos), plots / "scatter_test.png",
                                    f"{title} — test split".strip(" —")))
    return written
