"""The paper's training transforms: geometry, randomness, multi-size resize, colour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sppnet.data.images import pil_to_tensor
from sppnet.data.transforms import (
    PCA_EIGVAL,
    PCA_EIGVEC,
    TrainTransform,
    color_jitter,
    crop_boxes,
    lighting,
    normalize,
    random_resized_box,
    resize_short_side,
    resize_side,
    small_size_for,
)


def coordinate_image(width: int, height: int) -> Image.Image:
    """Red = x, green = y (mod 256), blue = 0: every pixel says where it came from."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    rgb = np.stack([xs % 256, ys % 256, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def test_paper_sizes():
    assert resize_side(224) == 256
    assert small_size_for(224) == 180
    assert (resize_side(128), small_size_for(128)) == (146, 103)
    assert (resize_side(112), small_size_for(112)) == (128, 90)


@pytest.mark.parametrize(
    "size, side, expected",
    [((300, 150), 100, (200, 100)), ((150, 300), 100, (100, 200)), ((20, 10), 64, (128, 64)), ((64, 64), 64, (64, 64))],
)
def test_resize_short_side_keeps_aspect(size, side, expected):
    assert resize_short_side(Image.new("RGB", size), side).size == expected


def test_resize_short_side_refuses_extreme_aspect():
    with pytest.raises(ValueError, match="aspect ratio 50.0"):
        resize_short_side(Image.new("RGB", (500, 10)), 64)


def test_crop_boxes_corners_and_centre():
    expected = [(0, 0, 64, 64), (36, 0, 100, 64), (0, 16, 64, 80), (36, 16, 100, 80), (18, 8, 82, 72)]
    assert crop_boxes(100, 80, 64) == expected
    with pytest.raises(ValueError, match="64x64 crop from a 63x80"):
        crop_boxes(63, 80, 64)


def test_train_transform_crops_the_entire_image_at_its_five_positions_and_flips():
    img = coordinate_image(200, 100)  # resized to short side resize_side(64) = 73: 146 x 73
    t = TrainTransform(64, alphastd=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    resized = resize_short_side(img, 73)
    expected = {}
    for box in crop_boxes(*resized.size, 64):
        crop = pil_to_tensor(resized.crop(box))
        expected[box] = (crop, crop.flip(-1))
    seen, flips = set(), 0
    for seed in range(60):
        out = t(img, torch.Generator().manual_seed(seed))
        assert out.shape == (3, 64, 64)
        matches = [(box, f) for box, pair in expected.items() for f in (0, 1) if torch.equal(out, pair[f])]
        assert len(matches) == 1, "every output is one of the 5 crops, flipped or not"
        seen.add(matches[0][0])
        flips += matches[0][1]
    assert seen == set(expected)
    assert 15 <= flips <= 45


def test_multi_size_is_a_resize_of_the_same_crop():
    img = coordinate_image(180, 120)
    seed = 3
    out = TrainTransform(64, out_size=51, alphastd=0.0, mean=(0, 0, 0), std=(1, 1, 1))(
        img, torch.Generator().manual_seed(seed)
    )
    # Replay the random choices in the order the transform draws them.
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(5, (1,), generator=g))
    flip = bool(torch.rand(1, generator=g) < 0.5)
    resized = resize_short_side(img, resize_side(64))
    crop = resized.crop(crop_boxes(*resized.size, 64)[k])
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    reference = pil_to_tensor(crop.resize((51, 51), Image.Resampling.BILINEAR))
    assert out.shape == (3, 51, 51)
    assert torch.equal(out, reference)


def test_train_transform_is_a_function_of_the_generator():
    img = coordinate_image(150, 170)
    t = TrainTransform(64)
    a = t(img, torch.Generator().manual_seed(7))
    b = t(img, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    others = [t(img, torch.Generator().manual_seed(s)) for s in range(8, 12)]
    assert not all(torch.equal(a, o) for o in others)


def test_lighting_adds_the_pca_colour_shift():
    x = torch.rand(3, 5, 6)
    out = lighting(x, 0.1, torch.Generator().manual_seed(0))
    alpha = torch.randn(3, generator=torch.Generator().manual_seed(0)) * 0.1
    shift = torch.tensor(PCA_EIGVEC) @ (alpha * torch.tensor(PCA_EIGVAL))
    torch.testing.assert_close(out - x, shift.view(3, 1, 1).expand(3, 5, 6))
    assert torch.equal(lighting(x, 0.0), x)


def test_normalize_values():
    x = torch.full((3, 2, 2), 0.5)
    out = normalize(x, (0.5, 0.25, 0.0), (1.0, 0.5, 0.25))
    assert out[:, 0, 0].tolist() == [0.0, 0.5, 2.0]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_images_are_converted(mode):
    img = Image.new(mode, (90, 70))
    out = TrainTransform(64)(img, torch.Generator().manual_seed(0))
    assert out.shape == (3, 64, 64)
    assert torch.isfinite(out).all()


def test_train_transform_rejects_bad_sizes():
    with pytest.raises(ValueError, match="size must be >= 1"):
        TrainTransform(0)
    with pytest.raises(ValueError, match="out_size must be >= 1"):
        TrainTransform(64, out_size=0)


def test_random_resized_box_draws_area_and_aspect_in_range():
    g = torch.Generator().manual_seed(0)
    boxes = [random_resized_box(120, 90, (0.25, 1.0), (0.75, 4 / 3), g) for _ in range(300)]
    for x1, y1, x2, y2 in boxes:
        assert 0 <= x1 < x2 <= 120 and 0 <= y1 < y2 <= 90
    fitted = [b for b in boxes if (b[2] - b[0], b[3] - b[1]) != (90 * 4 // 3, 90)]
    areas = np.array([(x2 - x1) * (y2 - y1) / (120 * 90) for x1, y1, x2, y2 in fitted])
    aspects = np.array([(x2 - x1) / (y2 - y1) for x1, y1, x2, y2 in fitted])
    # rounding to whole pixels moves area and aspect by at most a few percent
    assert areas.min() > 0.23 and areas.max() <= 1.0 and aspects.min() > 0.73 and aspects.max() < 1.37
    assert areas.std() > 0.1  # the scale is really drawn, positions too
    assert len({b[:2] for b in boxes}) > 100


def test_random_resized_box_falls_back_to_a_centred_crop_with_clipped_aspect():
    g = torch.Generator().manual_seed(0)
    # a 400x40 strip: no crop of aspect <= 4/3 and area >= 25 % exists, so the fallback is used
    w = round(40 * 4 / 3)  # the widest crop of aspect 4/3, centred
    assert random_resized_box(400, 40, (0.25, 1.0), (0.75, 4 / 3), g) == ((400 - w) // 2, 0, (400 - w) // 2 + w, 40)
    with pytest.raises(ValueError, match="scale"):
        random_resized_box(10, 10, (0.5, 0.2))


def test_random_crop_transform_is_a_resized_window_of_the_whole_image():
    img = coordinate_image(150, 100)
    tf = TrainTransform(112, crop="random", alphastd=0.0, flip=False, mean=(0, 0, 0), std=(1, 1, 1))
    g = torch.Generator().manual_seed(3)
    x = tf(img, g)
    assert x.shape == (3, 112, 112)
    # the same draws give the box: resized image (short side 128), then the crop
    resized = resize_short_side(img, resize_side(112))
    box = random_resized_box(resized.width, resized.height, tf.scale, tf.ratio, torch.Generator().manual_seed(3))
    expected = pil_to_tensor(resized.crop(box).resize((112, 112), Image.Resampling.BILINEAR))
    torch.testing.assert_close(x, expected)
    small = TrainTransform(112, 90, crop="random")(img, torch.Generator().manual_seed(3))
    assert small.shape == (3, 90, 90)


def jitter_reference(x, b, c, s):
    """Brightness, contrast, saturation by their definitions, pixel by pixel."""
    w = (0.299, 0.587, 0.114)
    out = (x * b).clamp(0, 1)
    mean = sum(w[k] * out[k] for k in range(3)).mean()
    out = (mean + c * (out - mean)).clamp(0, 1)
    grey = sum(w[k] * out[k] for k in range(3))
    return torch.stack([(grey + s * (out[k] - grey)).clamp(0, 1) for k in range(3)])


def test_color_jitter_matches_its_definition():
    x = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    b, c, s = (1.0 + (2.0 * torch.rand(3, generator=torch.Generator().manual_seed(9)) - 1.0) * 0.4).tolist()
    out = color_jitter(x, 0.4, g)
    torch.testing.assert_close(out, jitter_reference(x, b, c, s))
    assert out.min() >= 0 and out.max() <= 1
    assert color_jitter(x, 0.0) is x


def test_paper_crops_draw_the_same_as_before_when_jitter_is_off():
    # jitter=0 draws nothing: the paper's augmentation stream is unchanged
    img = coordinate_image(140, 120)
    a = TrainTransform(112)(img, torch.Generator().manual_seed(5))
    b = TrainTransform(112, jitter=0.0, crop="paper")(img, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="crop"):
        TrainTransform(112, crop="five")
    with pytest.raises(ValueError, match="jitter"):
        TrainTransform(112, jitter=1.5)


def test_batched_photometric_step_matches_the_per_image_definitions():
    # The training loop crops per image (geometric) and colours the whole batch at once
    # (photometric); the result must be each image's crop -> jitter -> lighting -> normalise.
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    tf = TrainTransform(48, 40, crop="random", jitter=0.4, alphastd=0.1, mean=mean, std=std)
    images = [coordinate_image(60 + 7 * i, 90 - 5 * i) for i in range(5)]
    pixels, colours, references = [], [], []
    for i, img in enumerate(images):
        p, colour = tf.geometric(img, torch.Generator().manual_seed(i))
        assert p.dtype == torch.uint8 and p.shape == (3, 40, 40)
        pixels.append(p)
        colours.append(colour)
        # replay the draws in the transform's order: crop, flip, jitter factors, lighting alpha
        g = torch.Generator().manual_seed(i)
        resized = resize_short_side(img, resize_side(48))
        crop = resized.crop(random_resized_box(*resized.size, tf.scale, tf.ratio, g))
        if bool(torch.rand(1, generator=g) < 0.5):
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = pil_to_tensor(crop.resize((40, 40), Image.Resampling.BILINEAR))
        b, c, s = (1.0 + (2.0 * torch.rand(3, generator=g) - 1.0) * 0.4).tolist()
        x = jitter_reference(x, b, c, s)
        alpha = torch.randn(3, generator=g) * 0.1
        x = x + (torch.tensor(PCA_EIGVEC) @ (alpha * torch.tensor(PCA_EIGVAL))).view(3, 1, 1)
        references.append(normalize(x, mean, std))
    batch = tf.photometric(torch.stack(pixels), torch.stack(colours))
    assert batch.shape == (5, 3, 40, 40) and batch.dtype == torch.float32
    torch.testing.assert_close(batch, torch.stack(references), atol=1e-5, rtol=1e-5)
    for i, img in enumerate(images):  # and the one-image call is the same thing
        torch.testing.assert_close(tf(img, torch.Generator().manual_seed(i)), references[i], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"colour \[N, 6\].*\(5, 3, 40, 40\) and \(5, 3\)"):
        tf.photometric(torch.stack(pixels), torch.stack(colours)[:, :3])
