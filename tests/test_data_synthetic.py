"""The built-in shapes data sets: determinism, caching, and round trips through the readers."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from sppnet.data import (
    CLASSES,
    ImageFolderDataset,
    VOCDetection,
    _shapes,
    load_image,
    make_classification_dataset,
    make_detection_dataset,
    synthetic,
)
from sppnet.data.synthetic import (
    STAMP_NAME,
    render_classification_image,
    render_detection_image,
    shape_polygons,
)

TINY_CLS = dict(train_per_class=2, val_per_class=1, test_per_class=1, min_size=64, max_size=128)
TINY_DET = dict(num_train=4, num_val=2, num_test=2, min_short_side=100, max_short_side=160)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shapes_are_distinct_masks():
    masks = {}
    for name in CLASSES:
        polygons = shape_polygons(name, 32, 32, 40, 40)
        masks[name] = _shapes._rasterize(polygons, 64, 64)
        assert _shapes._tight_box(masks[name])[0] in range(11, 15)  # left edge near 32 - 20
        area = masks[name].sum()
        assert abs(area - _shapes._shape_area(polygons)) < 0.1 * area + 40
    assert masks["circle"][32, 32] and not masks["ring"][32, 32]  # the ring has a hole
    assert masks["square"][13, 13] and not masks["diamond"][13, 13]  # corners differ
    assert masks["cross"][32, 13] and not masks["cross"][14, 14]
    assert masks["star"][13, 32] and not masks["star"][32, 13]  # tip up, no tip left
    assert masks["triangle"][50, 14] and not masks["triangle"][14, 14]
    signatures = {name: mask.tobytes() for name, mask in masks.items()}
    assert len(set(signatures.values())) == len(CLASSES)
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        shape_polygons("blob", 0, 0, 1, 1)


def test_classification_images_vary_in_size_and_hold_the_object():
    sizes, ratios = [], []
    for i in range(40):
        rng = np.random.default_rng([1, i])
        image, box = render_classification_image(rng, CLASSES[i % 8], 96, 256)
        w, h = image.size
        assert 96 <= w <= 256 and 96 <= h <= 256 and image.mode == "RGB"
        x1, y1, x2, y2 = box
        assert 0 <= x1 <= x2 <= w - 1 and 0 <= y1 <= y2 <= h - 1
        sizes.append((w, h))
        ratios.append(max(x2 - x1 + 1, y2 - y1 + 1) / min(w, h))
    assert len(set(sizes)) > 30 and len({w / h > 1 for w, h in sizes}) == 2
    assert min(ratios) < 0.3 and max(ratios) > 0.6  # object scale varies widely


def test_classification_set_is_deterministic_and_readable(tmp_path):
    a = make_classification_dataset(tmp_path / "a", seed=3, **TINY_CLS)
    b = make_classification_dataset(tmp_path / "b", seed=3, **TINY_CLS)
    c = make_classification_dataset(tmp_path / "c", seed=4, **TINY_CLS)
    files_a, files_c = _files(a), _files(c)
    assert files_a == _files(b)
    assert files_a.keys() == files_c.keys()
    assert sum(files_a[k] != files_c[k] for k in files_a) >= len(files_a) - 1  # all but the stamp
    assert "train/star/star_00001.jpg" in files_a and len(files_a) == 8 * 4 + 1

    train = ImageFolderDataset(a, "train")
    assert train.classes == sorted(CLASSES) and len(train) == 16
    test = ImageFolderDataset(a, "test")
    assert len(test) == 8 and test.targets == list(range(8))
    # The stored JPEG is the rendered picture.
    rng = synthetic._image_rng(3, 1, 2, CLASSES.index("ring"), 0)
    rendered, _ = render_classification_image(rng, "ring", 64, 128)
    stored = load_image(a / "test" / "ring" / "ring_00000.jpg")
    assert stored.size == rendered.size
    diff = np.abs(np.asarray(stored, dtype=float) - np.asarray(rendered, dtype=float)).mean()
    assert diff < 8.0  # JPEG noise only


def test_cache_stamp_regeneration_and_refusal(tmp_path, monkeypatch):
    root = make_classification_dataset(tmp_path / "cls", seed=0, **TINY_CLS)
    stamp = json.loads((root / STAMP_NAME).read_text())
    assert stamp["version"] == synthetic.GENERATOR_VERSION and stamp["params"]["seed"] == 0
    marker = root / "train" / "circle" / "circle_00000.jpg"
    mtime = marker.stat().st_mtime_ns
    assert make_classification_dataset(tmp_path / "cls", seed=0, **TINY_CLS) == root
    assert marker.stat().st_mtime_ns == mtime  # cached: not rewritten

    bigger = dict(TINY_CLS, train_per_class=3)
    make_classification_dataset(root, seed=0, **bigger)  # params changed: regenerated
    assert (root / "train" / "circle" / "circle_00002.jpg").is_file()
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", 999)
    make_classification_dataset(root, seed=0, **bigger)  # version changed: regenerated
    assert json.loads((root / STAMP_NAME).read_text())["version"] == 999
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        make_classification_dataset(foreign, **TINY_CLS)
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"
    with pytest.raises(ValueError, match="train_per_class must be an int >= 1, got 0"):
        make_classification_dataset(tmp_path / "x", train_per_class=0)
    with pytest.raises(ValueError, match="max_size must be an int >= 96, got 50"):
        make_classification_dataset(tmp_path / "x", min_size=96, max_size=50)


def test_a_concurrent_twin_that_finished_first_is_kept_not_deleted(tmp_path, monkeypatch):
    """Two processes generating the same set at once: the one that finishes second must not
    delete the first one's folder, which the first process may already be reading."""
    root = tmp_path / "cls"
    real_render = synthetic.render_classification_image
    twin = {}

    def render_and_let_the_twin_finish(*args, **kwargs):
        if not twin:  # mid-build, another process finishes the same set
            twin["started"] = True
            make_classification_dataset(root, seed=0, **TINY_CLS)
            twin["reader"] = (root / "train" / "circle" / "circle_00000.jpg").open("rb")
            (root / "train" / "twin-was-here").write_text("1")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_classification_image", render_and_let_the_twin_finish)
    assert make_classification_dataset(root, seed=0, **TINY_CLS) == root
    assert (root / "train" / "twin-was-here").is_file()  # the twin's folder, untouched
    assert len(ImageFolderDataset(root, "train")) == 2 * len(CLASSES)
    twin["reader"].close()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # our copy was removed


def test_default_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPNET_DATA", str(tmp_path / "cache"))
    assert synthetic.default_data_root() == tmp_path / "cache"
    root = make_detection_dataset(seed=5, **TINY_DET)
    assert root == tmp_path / "cache" / "shapes-voc-seed5"
    monkeypatch.delenv("SPPNET_DATA")
    assert synthetic.default_data_root() == synthetic.Path.home() / ".cache" / "sppnet"


def test_detection_set_is_deterministic(tmp_path):
    a = make_detection_dataset(tmp_path / "a", seed=1, **TINY_DET)
    b = make_detection_dataset(tmp_path / "b", seed=1, **TINY_DET)
    c = make_detection_dataset(tmp_path / "c", seed=2, **TINY_DET)
    files_a = _files(a)
    assert files_a == _files(b)
    assert files_a["Annotations/000001.xml"] != _files(c)["Annotations/000001.xml"]

    def split(name):
        return (a / "ImageSets" / "Main" / f"{name}.txt").read_text().split()

    assert split("train") == ["000001", "000002", "000003", "000004"]
    assert split("val") == ["000005", "000006"] and split("test") == ["000007", "000008"]
    assert split("trainval") == split("train") + split("val")


def test_detection_round_trip_boxes_hold_the_drawn_pixels(tmp_path):
    root = make_detection_dataset(tmp_path / "voc", seed=7, **TINY_DET)
    ds = VOCDetection(root, "trainval", classes=CLASSES)
    assert len(ds) == 6 and ds.skipped_images.summary() == "skipped 0 images"
    for number, record in enumerate(ds.records, start=1):
        rng = synthetic._image_rng(7, 2, number)
        rendered, objects = render_detection_image(rng, CLASSES, 100, 160, 5)
        assert (record["width"], record["height"]) == rendered.size
        assert 100 <= min(rendered.size) <= 160
        assert record["boxes"].tolist() == [list(map(float, o["box"])) for o in objects]
        assert record["labels"].tolist() == [CLASSES.index(o["name"]) for o in objects]
        assert record["difficult"].tolist() == [o["difficult"] for o in objects]
        assert record["truncated"].tolist() == [o["truncated"] for o in objects]
        for obj in objects:
            x1, y1, x2, y2 = obj["box"]
            ys, xs = np.nonzero(obj["mask"])
            # Every pixel of the shape is inside its box, and the box is tight.
            assert xs.min() == x1 and xs.max() == x2 and ys.min() == y1 and ys.max() == y2
        image, target = ds[number - 1]
        stored = (image.permute(1, 2, 0).numpy() * 255).astype(float)
        # JPEG noise only (two unrelated pictures differ by ~60).
        assert np.abs(stored - np.asarray(rendered, dtype=float)).mean() < 8.0


def test_detection_statistics_over_many_images():
    objects, sizes = [], []
    for i in range(60):
        image, objs = render_detection_image(np.random.default_rng([11, i]))
        w, h = image.size
        assert 200 <= min(w, h) <= 400 and 1 <= len(objs) <= 5
        sizes.append(image.size)
        for o in objs:
            x1, y1, x2, y2 = o["box"]
            touches = x1 == 0 or y1 == 0 or x2 == w - 1 or y2 == h - 1
            if o["truncated"]:
                assert touches
            if min(x2 - x1 + 1, y2 - y1 + 1) < 12:
                assert o["difficult"]
            objects.append(o)
        for i, a in enumerate(objs):  # objects overlap little
            assert all(_shapes._iou(a["box"], b["box"]) <= 0.3 for b in objs[i + 1 :])
    sides = [max(o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]) + 1 for o in objects]
    assert min(sides) < 30 and max(sides) > 250  # from tiny to most of the image
    aspect = [(o["box"][2] - o["box"][0] + 1) / (o["box"][3] - o["box"][1] + 1) for o in objects]
    assert min(aspect) < 0.7 and max(aspect) > 1.4
    difficult = np.mean([o["difficult"] for o in objects])
    assert 0.0 < difficult < 0.2
    assert any(o["truncated"] for o in objects)
    assert {o["name"] for o in objects} == set(CLASSES)
    assert len(set(sizes)) > 40


def test_detection_class_subset_and_validation(tmp_path):
    root = make_detection_dataset(tmp_path / "sub", seed=0, classes=["ring", "star"], **TINY_DET)
    ds = VOCDetection(root, "train", classes=["ring", "star"])
    assert set(ds.class_names) == {"ring", "star"} and len(ds) == 4
    with pytest.raises(ValueError, match=r"unknown \['blob'\]"):
        make_detection_dataset(tmp_path / "x", classes=["ring", "blob"])
    with pytest.raises(ValueError, match="max_objects must be an int >= 1, got 0"):
        make_detection_dataset(tmp_path / "x", max_objects=0)
    assert not os.path.exists(tmp_path / "x")


def test_generated_images_are_not_blank(tmp_path):
    rng = np.random.default_rng(0)
    image, objects = render_detection_image(rng, min_short_side=120, max_short_side=120)
    pixels = np.asarray(image, dtype=float)
    assert pixels.std() > 10  # textured background, not flat
    for o in objects:
        if not o["difficult"]:
            inside = pixels[o["mask"]].mean(axis=0)
            ring = np.zeros_like(o["mask"])
            x1, y1, x2, y2 = o["box"]
            ring[max(0, y1 - 3) : y2 + 4, max(0, x1 - 3) : x2 + 4] = True
            ring &= ~o["mask"]
            if ring.sum() > 50:
                outside = pixels[ring].mean(axis=0)
                assert np.linalg.norm(inside - outside) > 20  # the object stands out
    assert Image.fromarray(np.asarray(image)).mode == "RGB"
