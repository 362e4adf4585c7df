"""Test-time views: geometry of center / ten / full, and the multi-view test on feature maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sppnet.data.images import pil_to_tensor
from sppnet.data.transforms import normalize, resize_short_side, resize_side
from sppnet.engine.views import (
    MultiViewInput,
    check_size,
    check_views,
    multi_view_boxes,
    multi_view_scales,
    prepare_views,
    score_views,
    view_probabilities,
)
from sppnet.models import get_model
from sppnet.ops import map_boxes_to_features, roi_spatial_pyramid_pool, spatial_pyramid_pool


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return get_model("zf5", num_classes=5, width=0.1, fc_dim=32).eval()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_multi_view_scales_follow_the_paper():
    assert multi_view_scales(224) == [224, 256, 300, 360, 448, 560]
    assert multi_view_scales(112) == [112, 128, 150, 180, 224, 280]


def test_multi_view_boxes_positions_and_dedup():
    boxes = multi_view_boxes(300, 224, 224)  # short side == window: 3 distinct along x
    assert boxes.tolist() == [[38.0, 0.0, 262.0, 224.0], [0.0, 0.0, 224.0, 224.0], [76.0, 0.0, 300.0, 224.0]]
    assert multi_view_boxes(224, 224, 224).tolist() == [[0.0, 0.0, 224.0, 224.0]]
    big = multi_view_boxes(400, 300, 224)
    assert big.shape == (9, 4)
    assert big[0].tolist() == [88.0, 38.0, 312.0, 262.0]  # centre first
    assert {tuple(b) for b in big[:, :2].tolist()} == {(x, y) for x in (0.0, 88.0, 176.0) for y in (0.0, 38.0, 76.0)}
    assert ((big[:, 2] - big[:, 0]) == 224).all() and ((big[:, 3] - big[:, 1]) == 224).all()
    # The set is its own mirror image: the same boxes serve the flipped image.
    mirrored = torch.stack([400 - big[:, 2], big[:, 1], 400 - big[:, 0], big[:, 3]], 1)
    assert {tuple(b) for b in mirrored.tolist()} == {tuple(b) for b in big.tolist()}
    with pytest.raises(ValueError, match="does not fit"):
        multi_view_boxes(200, 300, 224)


def _paper_view_count(width: int, height: int, size: int = 224) -> int:
    total = 2  # the two full-image views
    for s in multi_view_scales(size):
        w, h = resize_short_side(Image.new("RGB", (width, height)), s).size
        total += 2 * len(multi_view_boxes(w, h, size))
    return total


def test_multi_view_count_matches_the_paper():
    # Sec. 3.1.4: 18 views per scale, 6 at s = 224 for a (non-square) ImageNet
    # image: 96 views, plus 2 full-image views.
    assert _paper_view_count(500, 375) == 96 + 2
    assert _paper_view_count(375, 500) == 96 + 2
    assert _paper_view_count(400, 400) == 5 * 18 + 2 + 2  # square: one window at s = 224


def test_multi_view_scores_have_one_row_per_view(model):
    img = noise_image(80, 64)  # non-square; size 64 -> scales 64 .. 160
    prepared = prepare_views(img, "multi", 64)
    assert isinstance(prepared, MultiViewInput)
    assert [min(x.shape[-2:]) for x in prepared.scales] == multi_view_scales(64)
    probs = score_views(model, prepared, 64)
    assert probs.shape == (98, 5)
    torch.testing.assert_close(probs.sum(1), torch.ones(98))
    square = score_views(model, prepare_views(noise_image(64, 64), "multi", 64), 64)
    assert square.shape[0] == 94


def test_whole_map_window_equals_image_level_pyramid(model):
    x = normalize(pil_to_tensor(noise_image(64, 64, seed=1))).unsqueeze(0)
    with torch.no_grad():
        maps = model.forward_features(x)  # [1, C, 3, 3]
        boxes = multi_view_boxes(64, 64, 64)  # the single window = the whole image
        cells = map_boxes_to_features(boxes, model.stride, model.offset, tuple(maps.shape[-2:]))
        assert cells.tolist() == [[0, 0, maps.shape[-1] - 1, maps.shape[-2] - 1]]
        rois = torch.cat([torch.zeros(1, 1, dtype=torch.long), cells], 1)
        pooled = roi_spatial_pyramid_pool(maps, rois, model.levels)
        torch.testing.assert_close(pooled, model.pool(maps), rtol=0, atol=0)
        torch.testing.assert_close(model.classifier(model.fc(pooled)), model(x))


def test_sub_window_pools_the_mapped_cells(model):
    img = noise_image(240, 200, seed=2)
    x = normalize(pil_to_tensor(img)).unsqueeze(0)
    with torch.no_grad():
        maps = model.forward_features(x)
        box = torch.tensor([[40.0, 30.0, 40.0 + 128, 30.0 + 128]])
        cells = map_boxes_to_features(box, model.stride, model.offset, tuple(maps.shape[-2:]))
        x1, y1, x2, y2 = cells[0].tolist()
        # Cells kept = those whose receptive-field centre (offset + stride * j) lies in the window.
        centres = model.offset + model.stride * torch.arange(maps.shape[-1])
        inside = ((centres >= 40) & (centres <= 168)).nonzero().flatten().tolist()
        assert (x1, x2) == (inside[0], inside[-1])
        pooled = roi_spatial_pyramid_pool(maps, torch.tensor([[0, x1, y1, x2, y2]]), model.levels)
        expected = spatial_pyramid_pool(maps[:, :, y1 : y2 + 1, x1 : x2 + 1], model.levels)
        torch.testing.assert_close(pooled, expected, rtol=0, atol=0)


def test_center_ten_full_geometry():
    img = noise_image(200, 100, seed=3)
    center = prepare_views(img, "center", 64)
    ten = prepare_views(img, "ten", 64)
    full = prepare_views(img, "full", 64)
    assert center.shape == (1, 3, 64, 64)
    assert ten.shape == (10, 3, 64, 64)
    torch.testing.assert_close(ten[5:], ten[:5].flip(-1))
    torch.testing.assert_close(ten[4], center[0])  # the fifth crop is the centre
    assert full.shape == (1, 3, resize_side(64), 2 * resize_side(64))  # aspect kept


def test_tiny_and_grey_images_are_upscaled(model):
    for img in (Image.new("L", (7, 5), 128), Image.new("RGBA", (3, 3))):
        for views in ("center", "ten", "full"):
            probs = view_probabilities(model, img, views, 64)
            assert probs.shape == (5,)
            assert abs(float(probs.sum()) - 1) < 1e-5


def test_view_errors(model):
    with pytest.raises(ValueError, match="unknown views 'five'"):
        check_views("five", model)
    with pytest.raises(ValueError, match=r"smaller than the minimum input of zf5 \(\d+x\d+"):
        check_size(model, 20)
    baseline = get_model("zf5", num_classes=5, width=0.1, fc_dim=32, spp=False, input_size=112)
    for views in ("full", "multi"):
        with pytest.raises(ValueError, match="needs an SPP model: the no-SPP baseline accepts only 112x112"):
            check_views(views, baseline)
    assert check_views("ten", baseline) == "ten"
    with pytest.raises(ValueError, match="accepts only 112x112 inputs, got size=128"):
        check_size(baseline, 128)
    with pytest.raises(ValueError, match="aspect ratio"):
        view_probabilities(model, Image.new("RGB", (1000, 10)), "center", 64)
