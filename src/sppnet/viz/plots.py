"""Training curves and result tables as PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sppnet.utils import atomic_path  # noqa: E402


def save_figure(fig, png: str | os.PathLike, dpi: int = 110, **kwargs) -> Path:
    """Writes a matplotlib figure as a PNG atomically (folders created), then closes it."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", **kwargs)
    plt.close(fig)
    return png


def plot_curves(
    rows: Sequence[dict],
    png: str | os.PathLike,
    x: str = "epoch",
    title: str = "",
    groups: Sequence[Sequence[str]] | None = None,
) -> Path:
    """One panel per group of numeric columns (default: losses | everything else).

    Args:
        rows: per-epoch dicts, e.g. ``{"epoch": 1, "train_loss": .., "val_top1": ..}``.
        png: output file (written atomically).
        x: the column on the x axis.
        groups: column names per panel.
    """
    cols = [k for k in rows[0] if k != x and all(isinstance(r.get(k), (int, float)) for r in rows)]
    if groups is None:
        losses = [c for c in cols if "loss" in c]
        others = [c for c in cols if c not in losses and c not in ("lr", "size", "seconds")]
        groups = [g for g in (losses, others) if g]
    groups = [g for g in groups if g] or [cols]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.8), squeeze=False)
    xs = [r[x] for r in rows]
    for ax, group in zip(axes[0], groups):
        for c in group:
            ax.plot(xs, [r[c] for r in rows], marker="o", ms=3, label=c)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, png)


def plot_grouped_bars(
    groups: Sequence[str],
    series: dict[str, Sequence[float | None]],
    png: str | os.PathLike,
    ylabel: str,
    title: str = "",
    errors: dict[str, Sequence[float | None]] | None = None,
) -> Path:
    """Bars of several series side by side in each group (a results table as a picture).

    Args:
        groups: x-axis labels (e.g. table rows).
        series: name -> one value per group (``None``: no bar).
        png: output file (written atomically).
        errors: name -> error bar per group (e.g. std over seeds).
    """
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(9.5, 4))
    for i, (name, values) in enumerate(series.items()):
        errs = (errors or {}).get(name)
        keep = [j for j, v in enumerate(values) if v is not None]
        xs = [j + (i - (len(series) - 1) / 2) * width for j in keep]
        yerr = [errs[j] or 0.0 for j in keep] if errs is not None else None
        ax.bar(xs, [values[j] for j in keep], width, yerr=yerr, capsize=3 if yerr else 0, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the bars, never over them
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, png)
