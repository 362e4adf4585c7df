"""ImageLimits: the same size guards in every image path, refused from the header, naming the file and flag."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from sppnet.data import limits as limits_module
from sppnet.data.imagefolder import ImageFolderDataset
from sppnet.data.images import ImageError, check_image_size, load_image, read_image_size
from sppnet.data.limits import FLAGS, ImageLimits, get_image_limits, search_size, set_image_limits


@pytest.fixture
def restore_limits(monkeypatch):
    monkeypatch.setattr(limits_module, "_LIMITS", get_image_limits())


@pytest.fixture
def no_decoding(monkeypatch):
    """Any pixel decoding fails the test: refusals must come from the header alone."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"decoded the pixels of {getattr(self, 'filename', '?')}")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def _brute_problem(width: int, height: int, lim: ImageLimits) -> str | None:
    """The rules written out: pixels, then short side, then aspect ratio."""
    if lim.max_pixels is not None and width * height > lim.max_pixels:
        return "too large"
    if min(width, height) < lim.min_side:
        return "too small"
    if lim.max_aspect_ratio is not None and max(width, height) / min(width, height) > lim.max_aspect_ratio:
        return "too elongated"
    return None


def test_problem_matches_the_rules_at_every_boundary():
    cases = [
        ImageLimits(),
        ImageLimits(max_pixels=1000, max_aspect_ratio=2.5, min_side=3),
        ImageLimits(max_pixels=None, max_aspect_ratio=None, min_side=1),
    ]
    sizes = [(w, h) for w in (1, 2, 3, 4, 10, 20, 25, 31, 32, 50, 400, 401, 1000) for h in (1, 2, 3, 10, 20, 40)]
    sizes += [(20000, 10), (10, 20000), (9459, 9459), (9460, 9460), (200, 10), (201, 10), (10, 201)]
    for lim in cases:
        for w, h in sizes:
            got = lim.problem(w, h)
            assert (got and got[0]) == _brute_problem(w, h, lim), (lim, w, h, got)
    assert ImageLimits().problem(200, 10) is None  # exactly 20: accepted
    assert ImageLimits().problem(201, 10)[0] == "too elongated"


def test_every_refusal_names_its_flag():
    lim = ImageLimits(max_pixels=100, max_aspect_ratio=2, min_side=5, max_search_pixels=50)
    for (w, h), field in (((20, 20), "max_pixels"), ((4, 5), "min_side"), ((15, 6), "max_aspect_ratio")):
        reason, detail = lim.problem(w, h)
        assert FLAGS[field] in detail and f"{w}x{h}" in detail, detail
    reason, detail = lim.search_problem(8, 8, None)
    assert reason == "too large to search" and FLAGS["max_search_pixels"] in detail and "--ss-resize-to" in detail
    assert lim.search_problem(8, 8, 4) is None  # searched at 4x4 = 16 pixels
    assert lim.search_problem(20, 20, 4)[0] == "too large"  # the plain limits come first


def test_search_size_downscales_the_short_side_only():
    assert search_size(400, 300, None) == (400, 300)
    assert search_size(400, 300, 300) == (400, 300)  # never upscaled
    assert search_size(400, 300, 150) == (200, 150)
    assert search_size(300, 400, 150) == (150, 200)
    assert search_size(1001, 3, 1) == (334, 1)


def test_invalid_limits_name_the_flag(restore_limits):
    for field, bad in (
        ("max_pixels", 0),
        ("max_pixels", 1.5),
        ("max_aspect_ratio", float("nan")),
        ("max_aspect_ratio", 0.5),
        ("min_side", 0),
        ("min_side", None),
        ("max_search_pixels", -1),
        ("max_pixels", True),
    ):
        with pytest.raises(ValueError, match=FLAGS[field]):
            ImageLimits(**{field: bad})
    with pytest.raises(ValueError, match=r"unknown image limits \['max_side'\]"):
        set_image_limits(max_side=3)


def test_set_image_limits_is_process_wide_and_returns_the_previous(tmp_path, restore_limits):
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 10)).save(path)  # aspect ratio 30
    with pytest.raises(ImageError, match=r"wide\.png: image is 300x10 pixels, aspect ratio 30\.0 exceeds the limit"):
        load_image(path)
    previous = set_image_limits(max_aspect_ratio=40)
    assert previous == ImageLimits() and get_image_limits().max_aspect_ratio == 40
    assert load_image(path).size == (300, 10)
    set_image_limits(previous)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.reason == "too elongated"
    assert load_image(path, limits=ImageLimits(max_aspect_ratio=None)).size == (300, 10)


def test_thin_strip_and_bomb_are_refused_before_decoding(tmp_path, no_decoding):
    # Issue 18: a 20000x10 PNG; classify predict refused it, detect predict searched it for minutes.
    strip = tmp_path / "strip.png"
    Image.frombytes("RGB", (20000, 10), bytes(20000 * 10 * 3)).save(strip)
    for read in (load_image, read_image_size):
        with pytest.raises(ImageError, match=r"strip\.png: image is 20000x10 .* raise it with --max-aspect-ratio"):
            read(strip)
    bomb = tmp_path / "bomb.png"
    Image.frombytes("L", (4000, 3000), bytes(4000 * 3000)).save(bomb)
    with pytest.raises(
        ImageError,
        match=r"bomb\.png: decompression bomb refused: 4000x3000 = 12000000 pixels "
        r"exceeds the limit of 1000000; raise it with --max-image-pixels",
    ):
        load_image(bomb, limits=ImageLimits(max_pixels=1_000_000))
    with pytest.raises(ImageError, match="too small|short side is below the minimum of 11; lower it with --min-image"):
        read_image_size(strip, ImageLimits(max_aspect_ratio=None, min_side=11))


def test_read_image_size_is_the_upright_size_load_image_returns(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)  # 50 wide, 30 high
    for orientation, expected in ((1, (50, 30)), (3, (50, 30)), (6, (30, 50)), (8, (30, 50))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.jpg"
        Image.fromarray(pixels).save(path, exif=exif.tobytes())
        assert read_image_size(path) == expected == load_image(path).size
    png = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(png, exif=exif.tobytes())
    assert read_image_size(png) == (30, 50) == load_image(png).size


def test_read_image_size_does_not_decode(tmp_path, no_decoding):
    for name in ("a.jpg", "a.png", "a.bmp", "a.tif"):  # PNG's own getexif() would decode
        Image.new("RGB", (64, 48)).save(tmp_path / name)
        assert read_image_size(tmp_path / name) == (64, 48)
    with pytest.raises(ImageError) as info:
        read_image_size(tmp_path / "missing.jpg")
    assert info.value.reason == "missing"
    (tmp_path / "notes.jpg").write_text("not a picture")
    with pytest.raises(ImageError, match=r"notes\.jpg: not an image"):
        read_image_size(tmp_path / "notes.jpg")


def test_check_image_size_names_the_file():
    with pytest.raises(ImageError, match=r"^x/y\.jpg: image is 1x100 pixels") as info:
        check_image_size("x/y.jpg", 1, 100)
    assert info.value.path == "x/y.jpg" and info.value.reason == "too elongated"
    check_image_size("x/y.jpg", 100, 5)


def test_strip_in_a_training_folder_is_skipped_naming_the_file(tmp_path):
    # Issue 18: inside an ImageFolder the same image aborted training without naming the file.
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 30), (i * 80, 0, 0)).save(tmp_path / "train" / cls / f"{i}.png")
    Image.new("RGB", (2000, 10)).save(tmp_path / "train" / "a" / "strip.png")
    ds = ImageFolderDataset(tmp_path, "train")
    with pytest.warns(UserWarning, match=r"skipping .*strip\.png: image is 2000x10 .*--max-aspect-ratio"):
        counter = ds.scan()
    assert counter.counts == {"too elongated": 1} and len(ds) == 4
    assert sorted(Path(p).name for p, _ in ds.samples) == ["0.png", "0.png", "1.png", "1.png"]
