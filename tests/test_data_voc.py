"""VOCDetection, parse_voc_xml and write_voc_annotation on VOC trees built in tmp_path."""

import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sppnet.data import (
    DataWarning,
    ImageError,
    VOCDetection,
    parse_voc_xml,
    resolve_inside,
    write_voc_annotation,
)


def _make_voc(root, images, splits=None):
    """images: {id: (size (w, h), [objects], colour)} -> a VOC tree."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (size, objects, colour) in images.items():
        Image.new("RGB", size, colour).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        write_voc_annotation(root / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", size, objects)
    for split, ids in (splits or {"trainval": list(images)}).items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


@pytest.fixture
def voc(tmp_path):
    return _make_voc(
        tmp_path / "VOC",
        {
            "000001": (
                (40, 30),
                [
                    {"name": "dog", "box": (0, 0, 39, 29), "truncated": True},
                    {"name": "cat", "box": (5, 6, 10, 12), "difficult": True},
                ],
                (200, 10, 10),
            ),
            "000002": ((20, 50), [{"name": "cat", "box": (2.5, 3, 7, 49)}], (10, 200, 10)),
            "000003": ((16, 16), [], (10, 10, 200)),
        },
    )


def test_xml_is_one_based_records_are_zero_based(voc):
    text = (voc / "Annotations" / "000001.xml").read_text()
    assert "<xmin>1</xmin>" in text and "<xmax>40</xmax>" in text and "<ymax>30</ymax>" in text
    assert "<xmin>6</xmin>" in text and "<ymin>7</ymin>" in text
    parsed = parse_voc_xml(voc / "Annotations" / "000001.xml")
    assert parsed["width"] == 40 and parsed["height"] == 30 and parsed["filename"] == "000001.jpg"
    assert parsed["objects"][1] == {"name": "cat", "box": (5.0, 6.0, 10.0, 12.0), "difficult": True, "truncated": False}


def test_records_and_samples(voc):
    ds = VOCDetection(voc, "trainval")
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2 and len(ds) == 3
    r = ds.records[0]
    assert r["id"] == "000001" and (r["width"], r["height"]) == (40, 30)
    assert r["image_path"] == str(voc / "JPEGImages" / "000001.jpg")
    torch.testing.assert_close(r["boxes"], torch.tensor([[0.0, 0, 39, 29], [5, 6, 10, 12]]))
    assert r["boxes"].dtype == torch.float32
    assert r["labels"].tolist() == [1, 0] and r["labels"].dtype == torch.int64
    assert r["difficult"].tolist() == [False, True] and r["truncated"].tolist() == [True, False]
    assert ds.records[1]["boxes"].tolist() == [[2.5, 3.0, 7.0, 49.0]]
    assert ds.records[2]["boxes"].shape == (0, 4) and ds.records[2]["labels"].shape == (0,)

    image, target = ds[1]
    assert image.shape == (3, 50, 20) and image.dtype == torch.float32
    assert abs(image[1].mean().item() - 200 / 255) < 0.02 and image[0].mean().item() < 0.1
    torch.testing.assert_close(target["boxes"], ds.records[1]["boxes"])
    target["boxes"] += 1  # a copy: the record is untouched
    assert ds.records[1]["boxes"].tolist() == [[2.5, 3.0, 7.0, 49.0]]
    summary = ds.summary()
    assert "3 images, 3 objects (1 difficult), 2 classes" in summary
    assert "cat 2, dog 1" in summary and "skipped 0 of 3 images" in summary


def test_classes_argument_difficult_and_transforms(voc):
    with pytest.warns(DataWarning, match=r"000001\.xml.*'dog' is not in classes"):
        ds = VOCDetection(voc, classes=["cat"])
    assert ds.records[0]["labels"].tolist() == [0]
    assert ds.skipped_objects.summary(3) == "skipped 1 of 3 objects: 1 unknown class"
    with pytest.raises(ValueError, match="'dog' is not in classes"):
        VOCDetection(voc, classes=["cat"], strict=True)
    easy = VOCDetection(voc, classes=["dog", "cat"], use_difficult=False)
    assert easy.records[0]["labels"].tolist() == [0] and easy.records[0]["difficult"].sum() == 0

    def flip(image, target):
        width = image.shape[-1]
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - 1 - target["boxes"][:, [2, 0]]
        return image.flip(-1), {**target, "boxes": boxes}

    flipped = VOCDetection(voc, transforms=flip)
    assert flipped[0][1]["boxes"].tolist() == [[0.0, 0, 39, 29], [29, 6, 34, 12]]


def test_missing_layout_and_split(tmp_path, voc):
    with pytest.raises(ValueError, match="does not exist"):
        VOCDetection(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"available splits: \['trainval'\]"):
        VOCDetection(voc, "test")
    (voc / "ImageSets" / "Main" / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="lists no image ids"):
        VOCDetection(voc, "empty")
    with pytest.raises(ValueError, match="split file"):
        VOCDetection(voc, "../../escape")


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<annotation><filename>&lol9;</filename>
<size><width>10</width><height>10</height></size></annotation>
"""

EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE annotation [ <!ENTITY secret SYSTEM "file:///etc/passwd"> ]>
<annotation><filename>&secret;</filename>
<size><width>10</width><height>10</height></size></annotation>
"""


@pytest.mark.parametrize("payload", [BILLION_LAUGHS, EXTERNAL_ENTITY], ids=["laughs", "external"])
def test_hostile_xml_is_refused_even_when_not_strict(voc, payload):
    xml = voc / "Annotations" / "000002.xml"
    xml.write_text(payload)
    with pytest.raises(ValueError, match=r"000002\.xml: refusing XML with a DTD"):
        VOCDetection(voc)
    with pytest.raises(ValueError, match=r"000002\.xml"):
        parse_voc_xml(xml)


@pytest.mark.parametrize("bad_id", ["../000001", "/etc/passwd", "sub/000001", "..", "a\\b"])
def test_ids_escaping_the_root_are_refused(voc, bad_id):
    (voc / "ImageSets" / "Main" / "evil.txt").write_text(f"000001\n{bad_id}\n")
    with pytest.raises(ValueError) as info:
        VOCDetection(voc, "evil")
    assert repr(bad_id) in str(info.value)


def test_symlinks_out_of_the_root_are_refused(tmp_path, voc):
    outside = tmp_path / "outside.xml"
    outside.write_text((voc / "Annotations" / "000001.xml").read_text())
    os.symlink(outside, voc / "Annotations" / "000009.xml")
    (voc / "ImageSets" / "Main" / "linked.txt").write_text("000009\n")
    with pytest.raises(ValueError, match=r"'000009'.*outside"):
        VOCDetection(voc, "linked")

    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (40, 30)).save(secret)
    (voc / "JPEGImages" / "000001.jpg").unlink()
    os.symlink(secret, voc / "JPEGImages" / "000001.jpg")
    with pytest.raises(ValueError, match=r"image id '000001'.*outside"):
        VOCDetection(voc)

    # A symlink that stays inside, and a symlinked folder, are fine.
    (voc / "JPEGImages" / "000001.jpg").unlink()
    os.symlink(voc / "JPEGImages" / "000003.jpg", voc / "JPEGImages" / "000001.jpg")
    assert len(VOCDetection(voc)) == 3
    shared = tmp_path / "shared"
    (voc / "JPEGImages").rename(shared)
    os.symlink(shared, voc / "JPEGImages")
    assert len(VOCDetection(voc)) == 3


def test_damage_is_skipped_counted_or_fatal_when_strict(voc):
    _make_voc(
        voc,
        {
            "000004": (
                (30, 30),
                [
                    {"name": "dog", "box": (1, 1, 5, 5)},
                    {"name": "cat", "box": (2, 2, 29, 29)},
                ],
                (0, 0, 0),
            ),
            "000005": ((30, 30), [{"name": "dog", "box": (1, 1, 5, 5)}], (0, 0, 0)),
            "000006": ((30, 30), [{"name": "dog", "box": (1, 1, 5, 5)}], (0, 0, 0)),
        },
        splits={"damaged": ["000001", "000004", "000005", "000006", "000007", "000001"]},
    )
    xml4 = voc / "Annotations" / "000004.xml"
    text = xml4.read_text()
    text = text.replace("<xmax>30</xmax>", "<xmax>31</xmax>", 1)  # cat box past the border
    text = text.replace("<xmin>2</xmin>", "<xmin>9</xmin>", 1)  # dog box: x2 < x1
    xml4.write_text(text)
    (voc / "Annotations" / "000005.xml").write_text("<annotation><size>")  # malformed
    (voc / "JPEGImages" / "000006.jpg").unlink()  # missing image
    # 000007 has no annotation at all; 000001 is listed twice.

    with pytest.warns(DataWarning) as caught:
        ds = VOCDetection(voc, "damaged")
    messages = "\n".join(str(w.message) for w in caught)
    assert "000004.xml: object 0 ('dog')" in messages and "x2 < x1" in messages
    assert "000004.xml: object 1 ('cat')" in messages and "outside the 30x30 image" in messages
    assert "000005.xml: malformed XML" in messages
    assert "000006.jpg: image file not found" in messages
    assert "000007.xml: annotation file not found" in messages
    assert [r["id"] for r in ds.records] == ["000001", "000004"]
    assert ds.records[1]["boxes"].shape == (0, 4)
    assert ds.skipped_images.summary(6) == (
        "skipped 4 of 6 images: 1 duplicate id, 1 malformed XML, 1 missing annotation, 1 missing image"
    )
    assert "skipped 2 of 4 objects: 1 box outside image, 1 invalid box" in ds.summary()

    with pytest.raises(ValueError, match=r"damaged\.txt: line 6: image id '000001' listed twice"):
        VOCDetection(voc, "damaged", strict=True)
    (voc / "ImageSets" / "Main" / "boxes.txt").write_text("000004\n")
    with pytest.raises(ValueError, match=r"000004\.xml: object 0 \('dog'\).*x2 < x1"):
        VOCDetection(voc, "boxes", strict=True)
    (voc / "ImageSets" / "Main" / "broken.txt").write_text("000005\n")
    with pytest.raises(ValueError, match=r"000005\.xml: malformed XML"):
        VOCDetection(voc, "broken", strict=True)
    with pytest.warns(DataWarning), pytest.raises(ValueError, match="no usable images"):
        VOCDetection(voc, "broken")


def test_unreadable_image_and_size_mismatch_fail_at_load(voc):
    ds = VOCDetection(voc)
    (voc / "JPEGImages" / "000002.jpg").write_bytes(b"garbage")
    with pytest.raises(ImageError, match=r"000002\.jpg"):
        ds[1]
    Image.new("RGB", (17, 16)).save(voc / "JPEGImages" / "000003.jpg")
    with pytest.raises(
        ValueError,
        match=r"000003\.jpg: image is 17x16 pixels but its annotation "
        r"says 16x16",
    ):
        ds[2]


def test_filename_element_is_used_and_checked(voc):
    image = voc / "JPEGImages" / "000002.jpg"
    image.rename(voc / "JPEGImages" / "renamed.png")
    xml = voc / "Annotations" / "000002.xml"
    xml.write_text(xml.read_text().replace("000002.jpg", "renamed.png"))
    ds = VOCDetection(voc)
    assert ds.records[1]["image_path"].endswith("renamed.png")
    assert ds[1][0].shape == (3, 50, 20)
    xml.write_text(xml.read_text().replace("renamed.png", "../../etc/passwd"))
    with pytest.raises(ValueError, match=r"<filename> in .*000002\.xml '\.\./\.\./etc/passwd'"):
        VOCDetection(voc)


def test_writer_validates_boxes(tmp_path):
    with pytest.raises(ValueError, match=r"x2 <= 9.*got \[0.0, 0.0, 10.0, 5.0\]"):
        write_voc_annotation(tmp_path / "a.xml", "a.jpg", (10, 10), [{"name": "x", "box": (0, 0, 10, 5)}])
    with pytest.raises(ValueError, match="size must be positive"):
        write_voc_annotation(tmp_path / "a.xml", "a.jpg", (0, 10), [])
    write_voc_annotation(tmp_path / "b.xml", "b.jpg", (10, 10), [{"name": "x", "box": (0.5, 0, 9, 9)}])
    assert parse_voc_xml(tmp_path / "b.xml")["objects"][0]["box"] == (0.5, 0.0, 9.0, 9.0)
    assert np.isclose(float((tmp_path / "b.xml").read_text().split("<xmin>")[1].split("<")[0]), 1.5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(alphabet=st.sampled_from("ab./\\\x00 ~:"), min_size=0, max_size=12), subdirs=st.booleans())
def test_resolve_inside_never_leaves_the_folder(tmp_path, name, subdirs):
    folder = tmp_path / "JPEGImages"
    folder.mkdir(exist_ok=True)
    try:
        path = resolve_inside(folder, name, what="image id", allow_subdirs=subdirs)
    except ValueError as error:
        assert repr(name) in str(error)
        return
    resolved = path.resolve()
    assert folder.resolve() in resolved.parents
    assert subdirs or resolved.parent == folder.resolve()


def test_split_file_with_a_bom_keeps_its_first_id(voc):
    # Issue 18: a BOM at the start silently dropped the first id ("\ufeff000001" not found).
    (voc / "ImageSets" / "Main" / "bom.txt").write_bytes("000001\r\n000002\r\n".encode("utf-8-sig"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        ds = VOCDetection(voc, "bom")
    assert [r["id"] for r in ds.records] == ["000001", "000002"]


def test_split_file_that_is_not_utf8_names_the_file(voc):
    # Issue 18: a non-UTF-8 ImageSets file errored without naming the file.
    split = voc / "ImageSets" / "Main" / "latin1.txt"
    split.write_bytes("000001\n000002 caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 text \(byte 0xe9 at offset 17, line 2\)"):
        VOCDetection(voc, "latin1")
