"""conv5 computed only where the windows read it: the same cells as the whole image's map.

``SPPDetector.feature_maps(image, boxes=...)`` convolves, per scale, the image
regions that hold the receptive fields of the cells the windows read
(``FeatureGeometry.input_span``, ``merge_cell_boxes``). The references here are
the plain whole-image maps and, for the receptive field, autograd.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from sppnet.models import get_model
from sppnet.models.detector import SPPDetector
from sppnet.models.geometry import merge_cell_boxes

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

MODELS = ("zf5", "overfeat5", "overfeat7", "convnet5", "alexnet", "vgg16", "resnet50")


def backbone(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return get_model(name, num_classes=3, width=0.0625, fc_dim=16).eval()


def clustered_boxes(n, width, height, gen, clusters=3, spread=12, max_side=40):
    """Windows around a few centres (proposals on a plain ground), inclusive pixel boxes."""
    cx = torch.randint(0, width, (clusters,), generator=gen)
    cy = torch.randint(0, height, (clusters,), generator=gen)
    k = torch.randint(0, clusters, (n,), generator=gen)
    x1 = (cx[k] + torch.randint(-spread, spread + 1, (n,), generator=gen)).clamp(0, width - 1)
    y1 = (cy[k] + torch.randint(-spread, spread + 1, (n,), generator=gen)).clamp(0, height - 1)
    x2 = torch.minimum(x1 + torch.randint(0, max_side, (n,), generator=gen), torch.tensor(width - 1))
    y2 = torch.minimum(y1 + torch.randint(0, max_side, (n,), generator=gen), torch.tensor(height - 1))
    return torch.stack([x1, y1, x2, y2], 1).float()


# ---------------------------------------------------------------- the groups


def covered_cells(boxes, height, width):
    grid = torch.zeros((height, width), dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.tolist():
        grid[y1 : y2 + 1, x1 : x2 + 1] = True
    return grid


@pytest.mark.parametrize("seed", range(12))
def test_merged_rectangles_are_disjoint_tight_and_hold_whole_boxes(seed):
    gen = torch.Generator().manual_seed(seed)
    height, width = int(torch.randint(1, 40, (1,), generator=gen)), int(torch.randint(1, 40, (1,), generator=gen))
    n = int(torch.randint(1, 30, (1,), generator=gen))
    clusters = int(torch.randint(1, 5, (1,), generator=gen))
    boxes = clustered_boxes(n, width, height, gen, clusters=clusters, spread=3, max_side=6).long()
    rects, member = merge_cell_boxes(boxes, height, width)
    grid = covered_cells(boxes, height, width)
    # every box lies inside the rectangle it is assigned to
    for (x1, y1, x2, y2), m in zip(boxes.tolist(), member.tolist()):
        rx1, ry1, rx2, ry2 = rects[m].tolist()
        assert rx1 <= x1 <= x2 <= rx2 and ry1 <= y1 <= y2 <= ry2
    # pairwise disjoint
    owner = torch.full((height, width), -1)
    for r, (x1, y1, x2, y2) in enumerate(rects.tolist()):
        assert (owner[y1 : y2 + 1, x1 : x2 + 1] == -1).all(), "rectangles overlap"
        owner[y1 : y2 + 1, x1 : x2 + 1] = r
        part = grid[y1 : y2 + 1, x1 : x2 + 1]
        # tight (each border line holds a covered cell) and not cuttable (no empty line inside)
        assert part.any(0).all() and part.any(1).all()
    assert (owner[grid] >= 0).all()  # every covered cell is in some rectangle


def test_groups_separated_by_empty_space_are_split_and_touching_ones_kept_together():
    boxes = torch.tensor([[0, 0, 2, 2], [1, 1, 3, 3], [10, 0, 12, 1], [0, 8, 1, 9], [2, 8, 2, 9]])
    rects, member = merge_cell_boxes(boxes, 12, 14)
    got = sorted(rects.tolist())
    assert got == [[0, 0, 3, 3], [0, 8, 2, 9], [10, 0, 12, 1]]
    assert member[0] == member[1] and member[3] == member[4]
    assert len({int(member[0]), int(member[2]), int(member[3])}) == 3


def test_merge_refuses_boxes_outside_the_map_or_reversed():
    with pytest.raises(ValueError, match="inside the 5x5 map"):
        merge_cell_boxes(torch.tensor([[0, 0, 5, 1]]), 5, 5)
    with pytest.raises(ValueError, match="x2 >= x1"):
        merge_cell_boxes(torch.tensor([[3, 0, 2, 1]]), 5, 5)
    with pytest.raises(ValueError, match="non-empty"):
        merge_cell_boxes(torch.zeros((0, 4), dtype=torch.long), 5, 5)


# ------------------------------------------------------------ receptive field


@pytest.mark.parametrize("name", MODELS)
def test_input_span_holds_every_pixel_that_moves_the_cells(name):
    """Autograd's support of d(cells a..b)/d(input) lies inside ``input_span(a, b)``, along both axes."""
    bb = backbone(name)
    x = torch.randn(1, 3, 150, 170, requires_grad=True)
    fmap = bb.forward_features(x)
    h, w = fmap.shape[-2:]
    for a, b in [(0, 0), (1, 2), (h // 2, h // 2 + 1), (h - 2, h - 1)]:
        a, b = max(0, min(a, h - 1)), max(0, min(b, h - 1))
        (grad,) = torch.autograd.grad(fmap[0, :, a : b + 1, :w].abs().sum(), x, retain_graph=True)
        rows = grad.abs().sum(dim=(0, 1, 3)).nonzero().flatten()
        lo, hi = bb.geometry.input_span(a, b)
        assert len(rows) and lo <= int(rows.min()) and int(rows.max()) <= hi, (a, b, lo, hi, rows.min(), rows.max())
        a, b = min(a, w - 1), min(b, w - 1)
        (grad,) = torch.autograd.grad(fmap[0, :, :, a : b + 1].abs().sum(), x, retain_graph=True)
        cols = grad.abs().sum(dim=(0, 1, 2)).nonzero().flatten()
        lo, hi = bb.geometry.input_span(a, b)
        assert lo <= int(cols.min()) and int(cols.max()) <= hi


# ------------------------------------------------------- maps of the windows


@contextlib.contextmanager
def counting_calls(det):
    """Records the input size of every conv pass of ``det``'s backbone."""
    calls, real = [], det.backbone.forward_features

    def counting(x):
        calls.append(tuple(x.shape[-2:]))
        return real(x)

    det.backbone.forward_features = counting
    try:
        yield calls
    finally:
        del det.backbone.forward_features


def pooled(det, image, boxes, regions):
    scales = det.image_scales(image.shape[-2], image.shape[-1])
    idx = det.assign_scales(boxes, scales)
    with torch.no_grad():
        if regions:
            maps, _ = det.feature_maps(image, scales, boxes, idx)
        else:
            maps, _ = det.feature_maps(image, scales)
        rois = det.map_windows(boxes, scales, [m.shape[-2:] for m in maps], idx)
        return det.pool_windows(maps, rois), idx


@pytest.mark.parametrize("name", MODELS)
def test_window_maps_pool_exactly_what_the_whole_maps_pool(name):
    """Clustered windows, an upscaled and a downscaled scale: every window's pool5 is the whole map's."""
    det = SPPDetector(backbone(name), num_classes=3, scales=(90, 260), target_size=48).eval()
    gen = torch.Generator().manual_seed(1)
    for height, width in [(120, 150), (97, 181)]:
        image = det.normalize(torch.rand(3, height, width, generator=gen))
        small = clustered_boxes(40, width, height, gen, clusters=2, spread=6, max_side=20)
        large = clustered_boxes(6, width, height, gen, clusters=1, spread=10, max_side=100)
        boxes = torch.cat([small, large])
        ref, idx = pooled(det, image, boxes, regions=False)
        with counting_calls(det) as calls:
            got, _ = pooled(det, image, boxes, regions=True)
        assert set(idx.tolist()) == {0, 1}
        big = det.image_scales(height, width)[1]
        assert any(h * w < big.height * big.width for h, w in calls)  # crops were convolved, not the image
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_every_window_at_every_scale_and_the_crops_are_smaller_than_the_image():
    """``scale_index=None`` (the training cache): each map holds the cells of every window;
    with two far-apart clusters the crops cover fewer pixels than the image."""
    det = SPPDetector(backbone("overfeat5"), num_classes=3, scales=(300, 600), target_size=64).eval()
    gen = torch.Generator().manual_seed(4)
    image = det.normalize(torch.rand(3, 200, 260, generator=gen))
    boxes = torch.tensor([[5, 5, 30, 28], [10, 8, 34, 30], [220, 160, 250, 195], [225, 170, 240, 190]]).float()
    with counting_calls(det) as calls, torch.no_grad():
        maps, scales = det.feature_maps(image, boxes=boxes)
    with torch.no_grad():
        full, _ = det.feature_maps(image)
    assert len(calls) == 4  # two crops per scale
    assert sum(h * w for h, w in calls) < sum(sc.height * sc.width for sc in scales) / 2
    for s in range(len(scales)):
        idx = torch.full((len(boxes),), s)
        rois = det.map_windows(boxes, scales, [m.shape[-2:] for m in maps], idx)
        with torch.no_grad():
            torch.testing.assert_close(det.pool_windows(maps, rois), det.pool_windows(full, rois), rtol=1e-5, atol=1e-5)


def test_a_scale_without_windows_is_not_convolved_and_a_whole_image_window_convolves_it_whole():
    det = SPPDetector(backbone("zf5"), num_classes=3, scales=(100, 200), target_size=64).eval()
    image = det.normalize(torch.rand(3, 100, 120))
    whole = torch.tensor([[0.0, 0.0, 119.0, 99.0]])
    with counting_calls(det) as calls, torch.no_grad():
        maps, scales = det.feature_maps(image, boxes=whole, scale_index=torch.tensor([1]))
    assert calls == [(scales[1].height, scales[1].width)]  # scale 0 skipped, scale 1 whole
    assert maps[0].shape[-2:] == det.backbone.feature_size(scales[0].height, scales[0].width)
    assert not maps[0].any()
    resized = F.interpolate(
        image[None], size=(scales[1].height, scales[1].width), mode="bilinear", align_corners=False, antialias=True
    )
    with torch.no_grad():
        torch.testing.assert_close(maps[1], det.backbone.forward_features(resized)[0])


def test_training_mode_convolves_whole_maps():
    """Batch norm in training mode normalises with the statistics of what it sees: no crops then."""
    det = SPPDetector(backbone("overfeat5"), num_classes=3, scales=(200,), target_size=64)
    det.train()
    image = det.normalize(torch.rand(3, 150, 150))
    boxes = torch.tensor([[5.0, 5.0, 20.0, 20.0]])
    with torch.no_grad():
        torch.manual_seed(0)
        with_boxes, _ = det.feature_maps(image, boxes=boxes)
        torch.manual_seed(0)
        whole, _ = det.feature_maps(image)
    torch.testing.assert_close(with_boxes[0], whole[0])
    assert with_boxes[0].abs().sum(0).gt(0).float().mean() > 0.5  # the whole map, not one region
