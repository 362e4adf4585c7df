"""check_detection_data / check_classification_data: degenerate data is found before any work, never silent."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile

from sppnet.data import COCODetection, DataWarning, ImageFolderDataset, VOCDetection, write_voc_annotation
from sppnet.data.checks import DataError, check_classification_data, check_detection_data
from sppnet.data.limits import ImageLimits
from sppnet.data.proposals import SelectiveSearchParams


@pytest.fixture
def no_decoding(monkeypatch):
    """Any pixel decoding fails the test: the checks read headers only."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"decoded the pixels of {getattr(self, 'filename', '?')}")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def _voc(root: Path, images: dict, split: str = "train") -> Path:
    """images: {id: (stated size, actual size, [objects])} -> a VOC tree whose annotations state `stated`."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (stated, actual, objects) in images.items():
        Image.new("RGB", actual, (90, 120, 30)).save(root / "JPEGImages" / f"{image_id}.jpg")
        write_voc_annotation(root / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", stated, objects)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
    return root


def _coco(root: Path, annotations: list[dict]) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (40, 30)).save(images / name)
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30},
        ],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (root / "ann.json").write_text(json.dumps(data))
    return images, root / "ann.json"


def _ann(image_id: int, category_id: int, crowd: int) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": [2, 3, 10, 8], "iscrowd": crowd}


DOG = {"name": "dog", "box": (1, 1, 20, 20)}
CAT = {"name": "cat", "box": (2, 2, 10, 12)}


def test_annotation_size_that_disagrees_with_the_image_is_found_from_the_header(tmp_path, no_decoding):
    # Issue 18: a <size> that disagreed with the image failed only after proposals and pretraining.
    root = _voc(
        tmp_path / "voc",
        {"a": ((40, 30), (40, 30), [DOG]), "b": ((40, 30), (30, 40), [CAT, DOG]), "c": ((50, 50), (50, 50), [CAT])},
    )
    data = VOCDetection(root, "train")
    with pytest.warns(DataWarning, match=r"skipping .*b\.jpg: the annotation says 40x30 pixels but the image is 30x40"):
        report = check_detection_data(data.records, data.class_names, skipped=[data.skipped_images])
    assert [r["id"] for r in report.records] == ["a", "c"]
    assert report.skipped.counts == {"size mismatch": 1} and report.kept == 2 and report.images == 3
    assert report.per_class == {"cat": 1, "dog": 1} and report.objects == 2
    summary = report.summary()
    assert "detection split 'train': 2 of 3 images kept, 2 classes, 2 objects (0 difficult or crowd)" in summary
    assert "positives per class: cat 1, dog 1" in summary and "1 size mismatch" in summary
    with pytest.raises(DataError, match=r"b\.jpg: the annotation says 40x30 pixels but the image is 30x40"):
        check_detection_data(data.records, data.class_names, strict=True)


def test_exif_rotated_image_matches_its_upright_annotation(tmp_path):
    root = _voc(tmp_path / "voc", {"a": ((30, 40), (30, 40), [DOG])})
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide x 30 high, shown (and loaded) upright as 30 x 40
    Image.new("RGB", (40, 30)).save(root / "JPEGImages" / "a.jpg", exif=exif.tobytes())
    data = VOCDetection(root, "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        report = check_detection_data(data.records, data.class_names)
    assert report.kept == 1
    assert data[0][0].shape == (3, 40, 30)  # what training will load agrees


def test_coco_file_whose_boxes_are_all_crowd_is_an_error(tmp_path):
    # Issue 18: all boxes iscrowd=1 trained to `done` with zero SVM positives.
    data = COCODetection(*_coco(tmp_path, [_ann(1, 1, 1), _ann(2, 2, 1), _ann(2, 1, 1)]))
    with pytest.raises(DataError, match=r"no positive examples: all 3 objects are difficult \(VOC\) or crowd \(COCO"):
        check_detection_data(data.records, data.class_names)


def test_empty_annotation_list_is_an_error(tmp_path):
    data = COCODetection(*_coco(tmp_path, []))
    with pytest.raises(DataError, match=r"has no objects: the annotations list none") as info:
        check_detection_data(data.records, data.class_names, split="val")
    assert "detection split 'val': 2 of 2 images kept, 2 classes, 0 objects" in str(info.value)


def test_class_without_positives_warns_and_strict_raises(tmp_path):
    data = COCODetection(*_coco(tmp_path, [_ann(1, 1, 0), _ann(2, 2, 1)]))  # dog: crowd only
    with pytest.warns(DataWarning, match=r"class 'dog' has no positive example \(only 1 difficult/crowd\)"):
        report = check_detection_data(data.records, data.class_names)
    assert report.per_class == {"cat": 1, "dog": 0} and report.difficult == 1
    assert "warning: class 'dog' has no positive example" in report.summary()
    with pytest.raises(DataError, match=r"class 'dog' has no positive example .*\(strict mode\)"):
        check_detection_data(data.records, data.class_names, strict=True)


def test_images_outside_the_limits_are_skipped_before_any_search(tmp_path, no_decoding):
    root = _voc(
        tmp_path / "voc",
        {
            "a": ((40, 30), (40, 30), [DOG]),
            "strip": ((2000, 10), (2000, 10), []),
            "big": ((400, 300), (400, 300), [CAT]),
        },
    )
    data = VOCDetection(root, "train")
    with pytest.warns(DataWarning, match=r"strip\.jpg: image is 2000x10 .*--max-aspect-ratio"):
        report = check_detection_data(data.records, data.class_names)
    assert [r["id"] for r in report.records] == ["a", "big"]
    # With the search settings, the selective-search bound applies too (400x300 > 100,000 pixels).
    tight = ImageLimits(max_search_pixels=100_000)
    with pytest.warns(DataWarning) as caught:
        report = check_detection_data(data.records, data.class_names, limits=tight, proposals=SelectiveSearchParams())
    messages = " | ".join(str(w.message) for w in caught)
    assert "big.jpg: selective search on the 400x300 image = 120000 pixels exceeds the limit of 100000" in messages
    assert "class 'cat' has no positive example (no object)" in messages  # its only image was skipped
    assert [r["id"] for r in report.records] == ["a"]
    assert report.skipped.counts == {"too elongated": 1, "too large to search": 1}
    with pytest.warns(DataWarning, match="strip"):  # searched at short side 150: 200x150, within the bound
        report = check_detection_data(data.records, data.class_names, limits=tight, proposals={"resize_to": 150})
    assert [r["id"] for r in report.records] == ["a", "big"]


def test_positive_counts_match_a_loop_over_objects():
    rng = random.Random(0)
    classes = ["a", "b", "c", "d"]
    records = []
    for i in range(40):
        n = rng.randint(0, 5)
        records.append(
            {
                "image_path": f"img{i}.jpg",
                "width": 50,
                "height": 40,
                "boxes": torch.zeros((n, 4)),
                "labels": torch.tensor([rng.randrange(3) for _ in range(n)], dtype=torch.long),
                "difficult": torch.tensor([rng.random() < 0.3 for _ in range(n)], dtype=torch.bool),
            }
        )
    expected = dict.fromkeys(classes, 0)
    objects = difficult = 0
    for r in records:
        for label, hard in zip(r["labels"].tolist(), r["difficult"].tolist()):
            objects += 1
            difficult += hard
            if not hard:
                expected[classes[label]] += 1
    with pytest.warns(DataWarning, match="class 'd' has no positive example \\(no object\\)"):
        report = check_detection_data(records, classes, check_headers=False)
    assert report.per_class == expected and report.objects == objects and report.difficult == difficult
    assert len(report.records) == 40


def test_bad_labels_empty_split_and_no_classes():
    record = {
        "image_path": "x.jpg",
        "width": 5,
        "height": 5,
        "boxes": torch.zeros((1, 4)),
        "labels": torch.tensor([2]),
        "difficult": torch.tensor([False]),
    }
    with pytest.raises(DataError, match=r"x\.jpg: labels \[2\] are not indices into the 2 classes"):
        check_detection_data([record], ["a", "b"], check_headers=False)
    with pytest.raises(DataError, match="detection split 'test' has no images"):
        check_detection_data([], ["a"], split="test")
    with pytest.raises(ValueError, match="classes must not be empty"):
        check_detection_data([record], [])


def _image_folder(root: Path, counts: dict[str, int], split: str = "train") -> Path:
    for name, n in counts.items():
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (12, 10), (i * 40, 0, 0)).save(root / split / name / f"{i}.png")
    return root


def test_one_class_image_folder_is_an_error(tmp_path):
    # Issue 18: an ImageFolder with one class trained to accuracy 1.000 without a word.
    root = _image_folder(tmp_path, {"circle": 3})
    with pytest.raises(DataError, match=r"needs at least 2 classes, got 1 \('circle'\).*accuracy is 1\.0") as info:
        check_classification_data(ImageFolderDataset(root, "train"))
    assert f"classification training split of {root / 'train'}" in str(info.value)


def test_classification_counts_and_validation_split(tmp_path):
    root = _image_folder(tmp_path, {"a": 2, "b": 3})
    _image_folder(root, {"a": 1, "b": 1}, "val")
    train, val = ImageFolderDataset(root, "train"), ImageFolderDataset(root, "val")
    report = check_classification_data(train, val=val)
    assert report.per_class == {"a": 2, "b": 3} and report.kept == 5 and not report.warnings
    assert "images per class: a 2, b 3" in report.summary()
    _image_folder(root, {"a": 1, "b": 1, "c": 1}, "val2")
    with pytest.raises(DataError, match=r"validation split has classes \['a', 'b', 'c'\], training has \['a', 'b'\]"):
        check_classification_data(train, val=ImageFolderDataset(root, "val2"))


class _Listed:
    """A plain data set: (image, label) pairs with .classes and .targets."""

    def __init__(self, labels, classes):
        self.targets, self.classes = list(labels), list(classes)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return Image.new("RGB", (8, 8)), self.targets[i]


def test_generic_data_sets_class_without_images_and_bad_labels():
    with pytest.warns(DataWarning, match="class 'c' has no training image"):
        report = check_classification_data(_Listed([0, 1, 1, 0], ["a", "b", "c"]))
    assert report.per_class == {"a": 2, "b": 2, "c": 0}
    with pytest.raises(DataError, match="class 'c' has no training image.*strict"):
        check_classification_data(_Listed([0, 1], ["a", "b", "c"]), strict=True)
    with pytest.raises(DataError, match=r"labels \[5\] are not indices"):
        check_classification_data(_Listed([0, 5], ["a", "b"]))
    with pytest.raises(DataError, match="is empty"):
        check_classification_data(_Listed([], ["a", "b"]))
    with pytest.raises(DataError, match="validation split is empty"):
        check_classification_data(_Listed([0, 1], ["a", "b"]), val=_Listed([], ["a", "b"]))
    plain = check_classification_data([(Image.new("RGB", (8, 8)), 0)] * 3, classes=["a", "b"])
    assert plain.per_class is None  # cannot count without loading: no claim made
