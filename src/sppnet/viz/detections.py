"""Pictures of detections: boxes, class names and scores on the image; precision-recall curves."""

from __future__ import annotations

import colorsys
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from torch import Tensor  # noqa: E402

from sppnet.utils import atomic_path  # noqa: E402
from sppnet.viz.plots import save_figure  # noqa: E402

__all__ = ["class_colour", "draw_detections", "plot_pr_curves"]


def class_colour(label: int) -> tuple[int, int, int]:
    """A saturated colour per class index (golden-ratio hues: neighbours differ)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _as_list(x: Tensor | Sequence | np.ndarray) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def draw_detections(
    image: Image.Image,
    boxes: Tensor | Sequence,
    labels: Tensor | Sequence,
    scores: Tensor | Sequence | None,
    class_names: Sequence[str],
    path: str | os.PathLike | None = None,
    ground_truth: Tensor | Sequence | None = None,
) -> Image.Image:
    """Draws boxes (inclusive pixel coordinates) with ``"<class> <score>"`` tags.

    Args:
        image: the RGB picture (not modified).
        boxes: ``[D, 4]`` ``(x1, y1, x2, y2)``; labels ``[D]`` class indices; scores ``[D]`` or None.
        class_names: names of the label indices.
        path: write a PNG there (atomically) when given.
        ground_truth: optional ``[G, 4]`` boxes drawn dashed-white underneath.

    Returns:
        The annotated copy.
    """
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(min(canvas.size) / 200))
    if ground_truth is not None:
        for x1, y1, x2, y2 in _as_list(ground_truth):
            draw.rectangle([x1, y1, x2, y2], outline=(255, 255, 255), width=width)
    score_list = _as_list(scores) if scores is not None else [None] * len(_as_list(labels))
    for (x1, y1, x2, y2), label, score in zip(_as_list(boxes), _as_list(labels), score_list):
        colour = class_colour(int(label))
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width + 1)
        text = class_names[int(label)] + ("" if score is None else f" {score:.2f}")
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 4 if y1 - th - 4 >= 0 else y1
        draw.rectangle([x1, ty, x1 + tw + 4, ty + th + 4], fill=colour)
        draw.text((x1 + 2, ty + 2 - top), text, fill=(0, 0, 0), font=font)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            canvas.save(tmp, format="PNG")
    return canvas


def plot_pr_curves(
    curves: Mapping[str, object], path: str | os.PathLike, ap: Mapping[str, float] | None = None, title: str = ""
) -> Path:
    """Per-class precision-recall curves (``sppnet.evaluation.precision_recall``) in one PNG.

    Args:
        curves: class name -> ``PRCurve`` (``recall``, ``precision`` arrays).
        path: the PNG (written atomically).
        ap: class name -> AP, shown in the legend.
    """
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (name, curve) in enumerate(curves.items()):
        recall, precision = np.asarray(curve.recall), np.asarray(curve.precision)
        if recall.size == 0 or np.isnan(recall).all():
            continue
        label = name if ap is None or name not in ap else f"{name} (AP {ap[name]:.3f})"
        ax.plot(recall, precision, color=np.array(class_colour(i)) / 255, label=label, lw=1.5)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)
