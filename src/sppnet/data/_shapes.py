"""Drawing for the built-in shapes data sets (:mod:`sppnet.data.synthetic`).

The eight unit shapes and their placement (:func:`shape_polygons`), rasterised
masks, tight boxes and overlap tests, and the painting: textured backgrounds,
distractor clutter, object colours that differ from what lies under them.
Every function draws from the ``numpy`` generator it is given, so a picture is
a function of its seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

#: The shape classes; label ``i`` is ``CLASSES[i]``.
CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star", "ring", "diamond", "hexagon")

Polygon = tuple[np.ndarray, bool]  # ([P, 2] float (x, y) points, True = fill / False = hole)


# ---------------------------------------------------------------------------- shapes


def _regular(n: int, radius: float = 1.0, phase_deg: float = -90.0) -> np.ndarray:
    angles = np.radians(phase_deg + 360.0 * np.arange(n) / n)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # [n, 2]


def _unit_shape(name: str) -> list[Polygon]:
    """The shape in the unit box ``[-1, 1]^2`` (image axes: y points down)."""
    if name == "circle":
        return [(_regular(48), True)]
    if name == "ring":
        return [(_regular(48), True), (_regular(48, 0.55), False)]
    if name == "square":
        return [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), True)]
    if name == "diamond":
        return [(np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], float), True)]
    if name == "triangle":
        return [(np.array([[0, -1], [1, 1], [-1, 1]], float), True)]
    if name == "hexagon":
        return [(_regular(6, phase_deg=0.0), True)]
    if name == "star":
        outer, inner = _regular(5), _regular(5, 0.42, phase_deg=-54.0)
        return [(np.stack([outer, inner], axis=1).reshape(10, 2), True)]  # alternate tips
    if name == "cross":
        a = 0.3  # half width of an arm
        top_and_right = [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a]]  # clockwise corners
        bottom_and_left = [[a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]]
        return [(np.array(top_and_right + bottom_and_left, float), True)]
    raise ValueError(f"unknown shape {name!r}; known shapes: {CLASSES}")


def shape_polygons(name: str, cx: float, cy: float, width: float, height: float, angle: float = 0.0) -> list[Polygon]:
    """Places a shape: scale the unit shape to ``width x height``, rotate, move.

    Args:
        name: one of :data:`CLASSES`.
        cx, cy: centre in pixels.
        width, height: size of the unrotated shape's box in pixels.
        angle: rotation in radians (clockwise on screen, y down).

    Returns:
        ``[(points [P, 2] (x, y), is_fill)]``: fill polygons and holes, drawn in order.
    """
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    placed = []
    for points, fill in _unit_shape(name):
        scaled = points * np.array([width / 2.0, height / 2.0])  # [P, 2]
        placed.append((scaled @ rotation.T + np.array([cx, cy]), fill))
    return placed


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _shape_area(polygons: Sequence[Polygon]) -> float:
    return sum(_polygon_area(p) * (1 if fill else -1) for p, fill in polygons)


def _rasterize(polygons: Sequence[Polygon], width: int, height: int) -> np.ndarray:
    """Bool mask [height, width] of the shape, clipped to the image."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for points, fill in polygons:
        draw.polygon([tuple(p) for p in points.tolist()], fill=255 if fill else 0)
    return np.asarray(mask) > 0


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x1, y1, x2, y2)`` 0-based inclusive around the True pixels, None if none."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _too_much_overlap(mask: np.ndarray, box: Sequence[int], other: dict[str, Any], limit: float = 0.2) -> bool:
    """True if two shapes share more than ``limit`` of the smaller one's pixels."""
    ob = other["box"]
    x1, y1 = max(box[0], ob[0]), max(box[1], ob[1])
    x2, y2 = min(box[2], ob[2]), min(box[3], ob[3])
    if x2 < x1 or y2 < y1:
        return False
    window = (slice(y1, y2 + 1), slice(x1, x2 + 1))
    shared = int(np.count_nonzero(mask[window] & other["mask"][window]))
    smaller = min(int(np.count_nonzero(mask)), int(np.count_nonzero(other["mask"])))
    return shared > limit * smaller


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two 0-based inclusive boxes (VOC +1 widths)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


# ------------------------------------------------------------------------ painting


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Textured background, uint8 [height, width, 3]."""
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]  # [H, 1]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]  # [1, W]
    theta = rng.uniform(0.0, 2.0 * math.pi)
    ramp = math.cos(theta) * xs + math.sin(theta) * ys  # [H, W]
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    c0, c1 = rng.uniform(0.0, 255.0, size=(2, 3))
    image = np.empty((3, height, width), dtype=np.float32)  # channel-first: long inner loops
    for c in range(3):
        image[c] = c0[c] + (c1[c] - c0[c]) * ramp  # two-colour gradient

    grid_h, grid_w = rng.integers(2, 8, size=2)
    coarse = rng.normal(128.0, rng.uniform(8.0, 40.0), size=(grid_h, grid_w, 3))
    blotches = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    image += np.asarray(blotches, dtype=np.float32).transpose(2, 0, 1) - 128.0

    texture = rng.standard_normal((height, width), dtype=np.float32)  # grey pixel noise
    texture *= rng.uniform(1.0, 8.0)
    if rng.random() < 0.35:  # stripes, period 6..30 px
        phi = rng.uniform(0.0, math.pi)
        frequency = 2.0 * math.pi / rng.uniform(6.0, 30.0)
        along = (
            math.cos(phi) * np.arange(width, dtype=np.float32)[None, :]
            + math.sin(phi) * np.arange(height, dtype=np.float32)[:, None]
        )  # [H, W] px
        texture += rng.uniform(5.0, 25.0) * np.sin(frequency * along)
    image += texture[None]
    pixels = np.clip(image, 0.0, 255.0).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(1, 2, 0))


def _draw_clutter(rng: np.random.Generator, canvas: Image.Image) -> None:
    """Distractor lines and irregular blobs (never one of the shape classes)."""
    width, height = canvas.size
    short = min(width, height)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(0, 6)):
        ends = rng.uniform(0.0, 1.0, size=4) * [width, height, width, height]
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.line(ends.tolist(), fill=colour, width=int(rng.integers(1, max(2, short // 60) + 1)))
    for _ in range(rng.integers(0, 4)):
        n = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, size=n))
        radius = rng.uniform(0.02, 0.05) * short * rng.uniform(0.4, 1.0, size=n)
        centre = rng.uniform(0.0, 1.0, size=2) * [width, height]
        points = centre + radius[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.polygon([tuple(p) for p in points.tolist()], fill=colour)


def _pick_colour(rng: np.random.Generator, under: np.ndarray, low_contrast: bool) -> np.ndarray:
    """Object colour against the mean colour ``under`` it: far from it, or (for
    deliberately difficult objects) 12..25 levels away."""
    mean = under.reshape(-1, 3).mean(axis=0)
    if low_contrast:
        direction = rng.normal(size=3)
        direction /= max(float(np.linalg.norm(direction)), 1e-6)
        return np.clip(mean + rng.uniform(12.0, 25.0) * direction, 0.0, 255.0)
    for _ in range(20):
        colour = rng.uniform(0.0, 255.0, size=3)
        if np.linalg.norm(colour - mean) >= 90.0:
            return colour
    return np.where(mean > 127.0, 20.0, 235.0)  # fallback: per channel far side


def _paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, low_contrast: bool = False) -> None:
    """Paints a shaded, slightly noisy object of random colour into ``canvas`` where ``mask``."""
    ys, xs = np.nonzero(mask)
    colour = _pick_colour(rng, canvas[ys, xs].astype(np.float32), low_contrast)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    span = max(float(np.ptp(xs)) + float(np.ptp(ys)), 1.0)
    shade = (math.cos(theta) * (xs - xs.mean()) + math.sin(theta) * (ys - ys.mean())) / span
    strength = 0.0 if low_contrast else rng.uniform(0.0, 0.4)
    values = colour[None, :] * (1.0 + strength * shade[:, None])  # [P, 3]
    values += 3.0 * rng.standard_normal(values.shape, dtype=np.float32)
    canvas[ys, xs] = np.clip(values, 0.0, 255.0).astype(np.uint8)


def _image_size(
    rng: np.random.Generator,
    min_short: int,
    max_short: int,
    min_aspect: float,
    max_aspect: float,
    max_side: int | None = None,
) -> tuple[int, int]:
    aspect = math.exp(rng.uniform(math.log(min_aspect), math.log(max_aspect)))  # w / h
    stretch = max(aspect, 1.0 / aspect)
    top = max_short if max_side is None else max(min_short, min(max_short, int(max_side / stretch)))
    short = int(rng.integers(min_short, top + 1))
    long = int(round(short * stretch))
    if max_side is not None:
        long = min(long, max_side)
    return (long, short) if aspect >= 1.0 else (short, long)
