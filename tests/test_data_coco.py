"""COCODetection on COCO JSON files and images written in tmp_path."""

import copy
import json

import pytest
import torch
from PIL import Image

from sppnet.data import COCODetection, DataWarning, ImageError

BASE = {
    "images": [
        {"id": 7, "file_name": "a.jpg", "width": 40, "height": 30},
        {"id": 3, "file_name": "sub/b.png", "width": 20, "height": 50},
    ],
    "annotations": [
        {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10.0, 20.0, 30.0, 10.0], "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 0, 4.5, 2], "iscrowd": 1},
        {"id": 3, "image_id": 3, "category_id": 5, "bbox": [1, 1, 0.4, 3]},
    ],
    "categories": [{"id": 5, "name": "dog"}, {"id": 2, "name": "cat"}],
}


def _write(tmp_path, data=BASE):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (250, 0, 0)).save(images / "a.jpg", quality=95)
    Image.new("RGB", (20, 50), (0, 0, 250)).save(images / "sub" / "b.png")
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return images, path


def test_records_labels_and_box_convention(tmp_path):
    ds = COCODetection(*_write(tmp_path))
    assert ds.class_names == ["cat", "dog"] and ds.category_ids == [2, 5] and ds.num_classes == 2
    assert [r["id"] for r in ds.records] == [7, 3]
    a, b = ds.records
    assert (a["width"], a["height"]) == (40, 30) and a["image_path"].endswith("images/a.jpg")
    # [x, y, w, h] continuous -> (x, y, x + w - 1, y + h - 1) 0-based inclusive
    torch.testing.assert_close(a["boxes"], torch.tensor([[10.0, 20, 39, 29], [0, 0, 3.5, 1]]))
    assert a["labels"].tolist() == [1, 0]
    assert a["difficult"].tolist() == [False, True]  # crowd -> difficult
    assert a["truncated"].tolist() == [False, False]
    # Thinner than a pixel: one pixel wide.
    assert b["boxes"].tolist() == [[1.0, 1.0, 1.0, 3.0]]
    widths = a["boxes"][:, 2] - a["boxes"][:, 0] + 1  # VOC-style +1 widths give back w
    assert widths.tolist() == [30.0, 4.5]

    image, target = ds[1]
    assert image.shape == (3, 50, 20)
    assert abs(image[2].mean().item() - 250 / 255) < 1e-6 and image[0].max().item() == 0.0
    assert target["labels"].tolist() == [1]
    assert "2 images, 3 objects (1 difficult), 2 classes" in ds.summary()


def test_malformed_json_names_the_file(tmp_path):
    images, path = _write(tmp_path)
    path.write_text('{"images": [,]}')
    with pytest.raises(ValueError, match=r"instances\.json: malformed JSON at line 1, column 13"):
        COCODetection(images, path)
    path.write_text("[]")
    with pytest.raises(ValueError, match="top level must be a JSON object"):
        COCODetection(images, path)
    path.write_text(json.dumps({"images": [], "categories": [{"id": 1}]}))
    with pytest.raises(ValueError, match=r"categories\[0\] needs an int 'id'"):
        COCODetection(images, path)
    with pytest.raises(ValueError, match="does not exist"):
        COCODetection(images, tmp_path / "missing.json")


@pytest.mark.parametrize("name", ["../outside.jpg", "/etc/passwd", "sub/../../x.jpg", "a\\b.jpg"])
def test_file_names_escaping_the_folder_are_refused(tmp_path, name):
    data = copy.deepcopy(BASE)
    data["images"][0]["file_name"] = name
    with pytest.raises(ValueError, match="file_name of image id 7"):
        COCODetection(*_write(tmp_path, data))


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    images, path = _write(tmp_path)
    outside = tmp_path / "outside.jpg"
    Image.new("RGB", (40, 30)).save(outside)
    (images / "a.jpg").unlink()
    (images / "a.jpg").symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):
        COCODetection(images, path)


def test_bad_entries_are_skipped_and_counted(tmp_path):
    data = copy.deepcopy(BASE)
    data["images"] += [
        {"id": 9, "file_name": "gone.jpg", "width": 10, "height": 10},  # missing file
        {"id": 7, "file_name": "a.jpg", "width": 40, "height": 30},  # duplicate id
        {"id": 11, "file_name": "a.jpg", "width": 0, "height": 30},  # bad size
    ]
    data["annotations"] += [
        {"image_id": 7, "category_id": 5, "bbox": [5, 5, -2, 3]},  # negative w
        {"image_id": 7, "category_id": 5, "bbox": [30, 5, 12, 3]},  # 42 > 40 + 1
        {"image_id": 7, "category_id": 5, "bbox": [30, 5, 10.5, 3]},  # 40.5: clipped
        {"image_id": 7, "category_id": 99, "bbox": [1, 1, 2, 2]},  # unknown category
        {"image_id": 1234, "category_id": 5, "bbox": [1, 1, 2, 2]},  # unknown image
        {"image_id": 9, "category_id": 5, "bbox": [1, 1, 2, 2]},  # image skipped: dropped
        {"image_id": 7, "category_id": 5, "bbox": [1, 1, 2]},  # malformed bbox
    ]
    images, path = _write(tmp_path, data)
    with pytest.warns(DataWarning) as caught:
        ds = COCODetection(images, path)
    messages = "\n".join(str(w.message) for w in caught)
    assert "instances.json: images[2]: image file" in messages and "gone.jpg not found" in messages
    assert "annotations[4]: bbox [x, y, w, h] = [30, 5, 12, 3] lies outside the 40x30 image" in messages
    assert ds.skipped_images.summary(5) == ("skipped 3 of 5 images: 1 duplicate id, 1 malformed image, 1 missing image")
    assert ds.skipped_objects.summary(9) == (
        "skipped 5 of 9 objects: 1 box outside image, 1 invalid box, 1 malformed annotation, "
        "1 unknown category, 1 unknown image id"
    )
    assert ds.records[0]["boxes"][-1].tolist() == [30.0, 5.0, 39.0, 7.0]
    assert len(ds) == 2 and len(ds.records[0]["labels"]) == 3

    with pytest.raises(ValueError, match=r"instances\.json: images\[2\]: image file .*gone\.jpg"):
        COCODetection(images, path, strict=True)
    data["images"] = data["images"][:2]
    data["annotations"] = data["annotations"][:4]
    images, path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=r"annotations\[3\]: .*non-positive w or h"):
        COCODetection(images, path, strict=True)


def test_missing_root_and_unreadable_image(tmp_path):
    images, path = _write(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        COCODetection(tmp_path / "nope", path)
    ds = COCODetection(images, path)
    (images / "a.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"a\.jpg: empty file"):
        ds[0]


def test_annotation_file_with_a_bom_is_read(tmp_path):
    images, path = _write(tmp_path)
    path.write_bytes(json.dumps(BASE).encode("utf-8-sig"))  # as some Windows tools save it
    assert [r["id"] for r in COCODetection(images, path).records] == [7, 3]
