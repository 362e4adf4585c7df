"""load_image / to_rgb / pil_to_tensor / SkipCounter on real files in tmp_path."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sppnet.data import limits
from sppnet.data.images import (
    DataWarning,
    ImageError,
    SkipCounter,
    load_image,
    pil_to_tensor,
    set_max_image_pixels,
    to_rgb,
)


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def test_rgb_png_round_trip_exact(tmp_path):
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 3
    path = _save(Image.fromarray(pixels), tmp_path / "a.png")
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (5, 4)
    np.testing.assert_array_equal(np.asarray(img), pixels)
    tensor = pil_to_tensor(img)
    assert tensor.shape == (3, 4, 5) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    assert tensor[:, 3, 4].tolist() == pytest.approx([171 / 255, 174 / 255, 177 / 255])


def test_grayscale_and_one_bit(tmp_path):
    grey = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    img = load_image(_save(Image.fromarray(grey, mode="L"), tmp_path / "g.png"))
    np.testing.assert_array_equal(np.asarray(img)[..., 0], grey)
    np.testing.assert_array_equal(np.asarray(img)[..., 1], grey)
    bits = Image.fromarray(np.array([[True, False]]))  # mode "1"
    img = load_image(_save(bits, tmp_path / "b.png"))
    assert np.asarray(img).tolist() == [[[255, 255, 255], [0, 0, 0]]]


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putdata([0, 1])
    assert np.asarray(load_image(_save(pal, tmp_path / "p.png"))).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    pal.info["transparency"] = 0  # index 0 transparent -> white
    img = load_image(_save(pal, tmp_path / "pt.png", transparency=0))
    assert np.asarray(img).tolist() == [[[255, 255, 255], [200, 100, 50]]]


def test_rgba_composited_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    img = load_image(_save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "a.png"))
    values = np.asarray(img).astype(int)
    assert values[0, 0].tolist() == [255, 255, 255]  # fully transparent
    assert values[0, 1].tolist() == [0, 0, 255]  # opaque
    assert np.all(np.abs(values[0, 2] - 127) <= 1)  # half black over white
    la = Image.fromarray(np.array([[[50, 0]]], dtype=np.uint8), mode="LA")
    assert np.asarray(to_rgb(la)).tolist() == [[[255, 255, 255]]]


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    deep = Image.fromarray(values)
    assert deep.mode == "I;16"
    path = _save(deep, tmp_path / "deep.png")
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")  # really stored as 16-bit
    img = load_image(path)
    assert np.asarray(img)[0, :, 0].tolist() == [0, 100, 128, 255]


def test_32_bit_and_float_modes():
    wide = Image.fromarray(np.array([[-1000, 0, 99000]], dtype=np.int32), mode="I")
    # Outside 0..65535: stretched from min to max, 1000 / 100000 * 255 = 2.55 -> 3.
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 3, 255]
    small = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I")
    assert np.asarray(to_rgb(small))[0, :, 0].tolist() == [0, 255]  # read as 16-bit
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_6_rotates_upright(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high
    stored[:8, :8] = (255, 0, 0)  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(Image.fromarray(stored), tmp_path / "phone.jpg", exif=exif, quality=95)
    img = load_image(path)
    assert img.size == (20, 40)  # width and height swapped
    values = np.asarray(img).astype(int)
    assert values[2, 17, 0] > 200 and values[2, 17, 1] < 60  # now at the top-right
    assert values[2, 2, 0] < 60 and values[37, 2, 0] < 60


def test_errors_name_the_file_and_reason(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    cases = {empty: "empty", text: "not an image", truncated: "corrupt", tmp_path / "absent.png": "missing"}
    for path, reason in cases.items():
        with pytest.raises(ImageError) as info:
            load_image(path)
        assert info.value.reason == reason
        assert str(path) in str(info.value)
        assert isinstance(info.value, ValueError)
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)


def test_decompression_bomb_limits(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (30, 30), (1, 2, 3)), tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"big\.png.*30x30 = 900 pixels exceeds the limit of 100") as info:
        load_image(path, max_pixels=100)
    # Issue 18: the refusal points to the CLI flag, not to a Python function.
    assert "raise it with --max-image-pixels" in str(info.value)
    assert "set_max_image_pixels" not in str(info.value) and "max_pixels=" not in str(info.value)
    assert load_image(path, max_pixels=900).size == (30, 30)

    monkeypatch.setattr(limits, "_LIMITS", limits.get_image_limits())  # restored after the test
    set_max_image_pixels(500)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.reason == "too large"
    set_max_image_pixels(None)  # no limit at all
    assert load_image(path).size == (30, 30)
    with pytest.raises(ValueError, match="got 0"):
        set_max_image_pixels(0)

    # Pillow's own limit is lower than ours: our explicit max_pixels wins, and
    # Pillow's global is left as it was.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 900 > 2 * 50: Pillow would raise
    set_max_image_pixels(100)
    with pytest.raises(
        ImageError, match="decompression bomb refused: more than 100 pixels, raise the limit with --max-image-pixels"
    ):
        load_image(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.asarray(load_image(path, max_pixels=10_000))[0, 0].tolist() == [1, 2, 3]
    assert Image.MAX_IMAGE_PIXELS == 50


def test_skip_counter_warns_and_summarises(tmp_path):
    counter = SkipCounter("images")
    assert counter.summary(total=5) == "skipped 0 of 5 images" and not counter
    with pytest.warns(DataWarning, match=r"skipping .*a\.jpg: truncated data"):
        counter.skip(tmp_path / "a.jpg", "corrupt", "truncated data")
    with pytest.warns(DataWarning, match=r"b\.jpg"):
        counter.skip(tmp_path / "b.jpg", "corrupt")
    with pytest.warns(DataWarning, match=r"c\.jpg: not an image file"):
        counter.skip_error(ImageError(tmp_path / "c.jpg", "not an image", "not an image file"))
    assert len(counter) == 3
    assert counter.counts == {"corrupt": 2, "not an image": 1}
    assert counter.summary(total=120) == "skipped 3 of 120 images: 2 corrupt, 1 not an image"
    assert counter.summary() == "skipped 3 images: 2 corrupt, 1 not an image"
    assert counter.paths == [str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.jpg")]
    quiet = SkipCounter("objects", warn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.skip("x.xml", "invalid box")
    assert quiet.summary(2) == "skipped 1 of 2 objects: 1 invalid box"
