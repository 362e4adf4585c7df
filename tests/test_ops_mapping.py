"""Window mapping (SPP-net Appendix) and backbone geometry.

Hand-worked cases first, then a brute-force reference that checks every cell
centre on random boxes, then the receptive-field centres of a real layer chain
measured with autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ops_reference import map_box_ref

from sppnet.ops import backbone_geometry, map_boxes_to_features


def mapped(boxes, stride, offset=0.0, feature_size=None):
    return map_boxes_to_features(torch.tensor(boxes, dtype=torch.float64), stride, offset, feature_size).tolist()


# ------------------------------------------------------------------ hand-worked cases


def test_paper_rule_stride_16_offset_0():
    # Appendix, S = 16, centres at 16 j: left edge floor(x/S) + 1, right edge ceil(x/S) - 1.
    # x1 = 20 -> 2 (centre 32), y1 = 40 -> 3 (48), x2 = 100 -> 6 (96), y2 = 200 -> 12 (192).
    assert mapped([[20, 40, 100, 200]], 16) == [[2, 3, 6, 12]]
    # Edges on exact multiples keep the cell whose centre lies on them
    # (the paper's formula would give 3 and 5 for x1 = 32, x2 = 96).
    assert mapped([[32, 48, 96, 192]], 16) == [[2, 3, 6, 12]]
    # Just inside / just outside an exact multiple.
    assert mapped([[31.9, 48.1, 96.1, 191.9]], 16) == [[2, 4, 6, 11]]
    # A window from the image origin: cell 0 is centred at pixel 0.
    assert mapped([[0, 0, 223, 223]], 16) == [[0, 0, 13, 13]]


def test_offset_20_5():
    # ZF-5's cell 0 is centred at 20.5 px (see test_backbone_geometry_zf5): centres
    # 20.5, 36.5, 52.5, 68.5, 84.5, 100.5, ...
    assert mapped([[5, 20.5, 100, 100.5]], 16, 20.5) == [[0, 0, 4, 5]]
    assert mapped([[21, 36.4, 84.5, 120]], 16, 20.5) == [[1, 1, 4, 6]]
    # y from 37 to 52.4 holds no centre: it collapses to the centre nearest its
    # middle 44.7, which is 52.5 (7.8 away; 36.5 is 8.2 away).
    assert mapped([[5, 37, 100, 52.4]], 16, 20.5) == [[0, 2, 4, 2]]
    # Cell -1 is centred at 4.5 px, so x1 = 0 maps to it; clamping brings it back.
    assert mapped([[0, 20.5, 100, 100.5]], 16, 20.5) == [[-1, 0, 4, 5]]
    assert mapped([[0, 20.5, 100, 100.5]], 16, 20.5, (14, 14)) == [[0, 0, 4, 5]]


def test_tiny_windows_collapse_to_the_nearest_centre():
    # Centres at 32 and 48; 40..41 holds none: middle 40.5 is nearest 48 -> cell 3.
    assert mapped([[40, 40, 41, 41]], 16) == [[3, 3, 3, 3]]
    # 33..35 holds none: middle 34 is nearest 32 -> cell 2.
    assert mapped([[33, 33, 35, 35]], 16) == [[2, 2, 2, 2]]
    # Exactly halfway between two centres: halves round up.
    assert mapped([[39, 33, 41, 35]], 16) == [[3, 2, 3, 2]]
    # A zero-size box on a centre is that cell; off a centre, the nearest one.
    assert mapped([[64, 64, 64, 64]], 16) == [[4, 4, 4, 4]]
    assert mapped([[70, 70, 70, 70]], 16) == [[4, 4, 4, 4]]


def test_clamping_to_the_feature_map():
    # feature_size = (H, W) = (10, 20)
    assert mapped([[-100, -50, 2000, 30]], 16, 0.0, (10, 20)) == [[0, 0, 19, 1]]
    # A box wholly past the right / bottom edge collapses onto the last cell.
    assert mapped([[1000, 1000, 1100, 1100]], 16, 0.0, (10, 20)) == [[19, 9, 19, 9]]
    # ... and one wholly before the origin onto cell 0.
    assert mapped([[-30, -30, -20, -20]], 16, 0.0, (10, 20)) == [[0, 0, 0, 0]]
    # Without feature_size nothing is clamped.
    assert mapped([[-100, -50, 2000, 30]], 16) == [[-6, -3, 125, 1]]


def test_output_type_device_and_empty_input():
    out = map_boxes_to_features(torch.tensor([[10, 20, 200, 150]], dtype=torch.int32), 16)
    assert out.dtype == torch.int64 and out.tolist() == [[1, 2, 12, 9]]
    empty = map_boxes_to_features(torch.zeros((0, 4)), 16, feature_size=(5, 5))
    assert empty.shape == (0, 4) and empty.dtype == torch.int64
    assert map_boxes_to_features([[0.0, 0.0, 40.0, 40.0]], 16).tolist() == [[0, 0, 2, 2]]
    assert map_boxes_to_features(torch.tensor([[0.0, 0.0, 40.0, 40.0]]), np.float64(16.0)).tolist() == [[0, 0, 2, 2]]
    box = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    assert map_boxes_to_features(box, np.int64(16), np.float32(0.5)).tolist() == [[0, 0, 2, 2]]


@pytest.mark.parametrize(
    "boxes,kwargs,match",
    [
        (torch.zeros(3, 5), {}, r"Tensor\[K, 4\].*got shape \(3, 5\)"),
        (torch.zeros(4), {}, r"got shape \(4,\)"),
        (torch.tensor([[0.0, 0, float("nan"), 5]]), {}, r"finite, got row 0 = \[0.0, 0.0, nan, 5.0\]"),
        (torch.tensor([[0.0, 0, 5, 5], [0, float("-inf"), 5, 5]]), {}, r"finite, got row 1 = \[0.0, -inf, 5.0, 5.0\]"),
        (torch.tensor([[0.0, 0, 5, 5], [9, 0, 5, 5]]), {}, r"x1 <= x2 and y1 <= y2, got row 1 = \[9.0, 0.0, 5.0, 5.0"),
        (torch.tensor([[0.0, 8, 5, 5]]), {}, r"got row 0 = \[0.0, 8.0, 5.0, 5.0\]"),
        (torch.zeros(1, 4), {"stride": 0}, r"stride must be a positive number, got 0"),
        (torch.zeros(1, 4), {"stride": -16}, r"got -16"),
        (torch.zeros(1, 4), {"stride": float("nan")}, r"got nan"),
        (torch.zeros(1, 4), {"stride": True}, r"got True"),
        (torch.zeros(1, 4), {"stride": "16"}, r"got '16'"),
        (torch.zeros(1, 4), {"offset": float("inf")}, r"offset must be a finite number, got inf"),
        (torch.zeros(1, 4), {"feature_size": (0, 5)}, r"H, W >= 1, got \(0, 5\)"),
    ],
    ids=lambda v: None if isinstance(v, (str, dict)) else str(v.tolist())[:30],
)
def test_bad_input_raises_value_error(boxes, kwargs, match):
    kw = {"stride": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        map_boxes_to_features(boxes, **kw)


# ------------------------------------------------------------------ brute force


@pytest.mark.parametrize(
    "stride,offset,feature_size",
    [
        (16, 0.0, None),
        (16, 20.5, (30, 40)),
        (12, 0.5, (20, 25)),
        (8, -3.25, None),
        (1, 0.5, (50, 60)),
        (32, 7.0, (4, 6)),
    ],
    ids=str,
)
def test_random_boxes_match_brute_force(stride, offset, feature_size):
    g = torch.Generator().manual_seed(stride)
    k = 400
    xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * 600 - 50
    wh = torch.rand(k, 2, generator=g, dtype=torch.float64) ** 3 * 400  # many tiny windows
    # Some edges exactly on centres, and zero-size boxes.
    xy[:40, 0] = offset + stride * torch.randint(-2, 30, (40,), generator=g)
    wh[40:60] = 0
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[60:100, 3] = offset + stride * torch.ceil((boxes[60:100, 1] - offset) / stride)
    out = map_boxes_to_features(boxes, stride, offset, feature_size)
    expected = [map_box_ref(b, stride, offset, feature_size) for b in boxes.tolist()]
    assert out.tolist() == expected
    assert (out[:, 0] <= out[:, 2]).all() and (out[:, 1] <= out[:, 3]).all()


# ------------------------------------------------------------------ backbone geometry

# Released ZF-5 (Caffe): conv1 k7 s2 p1; pool1 k3 s2; conv2 k5 s2 p0; pool2 k3 s2;
# conv3-5 k3 s1 p1 (Table 1 gives the filters; the padding is the released model's).
ZF5 = [(7, 2, 1), (3, 2, 0), (5, 2, 0), (3, 2, 0), (3, 1, 1), (3, 1, 1), (3, 1, 1)]


def test_backbone_geometry_zf5():
    # stride 2*2*2*2 = 16; offset 0.5 + sum((k-1)/2 - p) * (stride so far):
    # conv1 (3 - 1) * 1 = 2, pool1 (1 - 0) * 2 = 2, conv2 (2 - 0) * 4 = 8,
    # pool2 (1 - 0) * 8 = 8, conv3-5 (1 - 1) * 16 = 0  ->  0.5 + 20 = 20.5.
    assert backbone_geometry(ZF5) == (16, 20.5)


def test_backbone_geometry_same_padding_is_the_papers_case():
    # Every layer padded by floor(k/2): centres at S * j up to the half pixel.
    assert backbone_geometry([(3, 1, 1), (3, 2, 1), (5, 2, 2), (7, 4, 3)]) == (16, 0.5)
    assert backbone_geometry([]) == (1, 0.5)
    # An even kernel shifts the centre by half an input cell.
    assert backbone_geometry([(2, 2, 0)]) == (2, 1.0)


def test_backbone_geometry_rejects_bad_layers():
    with pytest.raises(ValueError, match=r"got \(3, 0, 1\)"):
        backbone_geometry([(3, 0, 1)])
    with pytest.raises(ValueError, match=r"got \(3, 1, -1\)"):
        backbone_geometry([(3, 1, -1)])


@pytest.mark.parametrize(
    "layers",
    [ZF5, [(3, 1, 1), (2, 2, 0), (3, 1, 1), (2, 2, 0)], [(11, 4, 2), (3, 2, 0), (5, 1, 2)]],
    ids=["zf5", "vgg-ish", "alexnet-ish"],
)
def test_backbone_geometry_matches_measured_receptive_fields(layers):
    # Measure: run the chain on a 1-D signal (all-ones convolutions), take the
    # gradient of one output cell, and find the centre of the input pixels it
    # sees (pixel i spans [i, i + 1)). Interior cells only: padding cuts the
    # field at the borders.
    stride, offset = backbone_geometry(layers)
    length = 500
    x = torch.zeros(1, 1, length, dtype=torch.float64, requires_grad=True)
    y = x
    for k, s, p in layers:
        y = F.conv1d(F.pad(y, (p, p), value=0.0), torch.ones(1, 1, k, dtype=torch.float64), stride=s)
    n_out = y.shape[-1]
    for j in range(n_out // 3, 2 * n_out // 3, max(1, n_out // 12)):
        (grad,) = torch.autograd.grad(y[0, 0, j], x, retain_graph=True)
        seen = grad[0, 0].nonzero()[:, 0]
        assert seen.min() > 0 and seen.max() < length - 1  # an interior cell
        centre = (float(seen.min()) + float(seen.max()) + 1) / 2
        assert centre == offset + stride * j
