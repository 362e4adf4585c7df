"""Box ops against brute-force references written as plain loops."""

import math

import pytest
import torch

from sppnet.ops.boxes import (
    batched_nms,
    box_area,
    box_iou,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    nms,
    remove_small_boxes,
    select_detections,
    validate_boxes,
)

# --------------------------------------------------------------- references


def iou_ref(a, b, inclusive):
    """IoU of two boxes given as lists, the PASCAL devkit way when inclusive."""
    off = 1.0 if inclusive else 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + off)
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + off)
    inter = iw * ih
    area_a = (a[2] - a[0] + off) * (a[3] - a[1] + off)
    area_b = (b[2] - b[0] + off) * (b[3] - b[1] + off)
    return inter / (area_a + area_b - inter)


def greedy_nms_ref(boxes, scores, thr, inclusive):
    """R-CNN's nms.m as a loop: visit by score (ties: lower index first), keep if
    the IoU with every kept box is <= thr."""
    boxes, scores = boxes.tolist(), scores.tolist()
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if all(iou_ref(boxes[i], boxes[j], inclusive) <= thr for j in kept):
            kept.append(i)
    return kept


def select_ref(boxes, scores, score_thr, nms_thr, max_per_image, inclusive, max_per_class=None):
    """Per-class threshold + NMS + the best ``max_per_class``, then the best ``max_per_image`` over classes."""
    num_windows, num_classes = scores.shape
    if boxes.dim() == 2:
        boxes = boxes[:, None, :].expand(num_windows, num_classes, 4)
    found = []  # (score, window, class)
    for c in range(num_classes):
        thr = score_thr[c] if isinstance(score_thr, (list, tuple)) else score_thr
        cand = [k for k in range(num_windows) if scores[k, c].item() > thr]
        kept = greedy_nms_ref(boxes[cand, c], scores[cand, c], nms_thr, inclusive)
        if max_per_class is not None:
            kept = kept[:max_per_class]  # greedy NMS visits by decreasing score, ties by window
        found += [(scores[cand[i], c].item(), cand[i], c) for i in kept]
    found.sort(key=lambda t: (-t[0], t[1], t[2]))
    if max_per_image is not None:
        found = found[:max_per_image]
    return found


def random_boxes(n, generator, max_xy=60.0, max_wh=30.0, integer=False, dtype=torch.float64):
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * max_xy
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * max_wh
    boxes = torch.cat([xy, xy + wh], dim=1)
    if integer:
        boxes = boxes.round()
    return boxes.to(dtype)


# ------------------------------------------------------------------ box_iou


@pytest.mark.parametrize("inclusive", [False, True])
@pytest.mark.parametrize("integer", [False, True])
def test_box_iou_matches_loop(inclusive, integer):
    g = torch.Generator().manual_seed(0)
    a = random_boxes(7, g, integer=integer)
    b = random_boxes(5, g, integer=integer)
    got = box_iou(a, b, inclusive=inclusive)
    assert got.shape == (7, 5)
    expected = torch.tensor([[iou_ref(x, y, inclusive) for y in b.tolist()] for x in a.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_box_iou_inclusive_known_values():
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    b = torch.tensor([[5.0, 0.0, 14.0, 9.0], [10.0, 0.0, 19.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    # inclusive: 10x10 boxes sharing 5 columns -> 50 / 150; adjacent -> 0;
    # a single shared pixel (9, 9) -> 1 / 100.
    torch.testing.assert_close(box_iou(a, b, inclusive=True), torch.tensor([[1 / 3, 0.0, 0.01]]))
    # continuous: 9x9 boxes sharing 4 columns -> 36 / 126; the point box has no area.
    torch.testing.assert_close(box_iou(a, b, inclusive=False), torch.tensor([[36 / 126, 0.0, 0.0]]))


def test_box_iou_integer_and_empty():
    a = torch.tensor([[0, 0, 10, 10]])
    b = torch.tensor([[0, 0, 5, 10]])
    assert box_iou(a, b).dtype == torch.float32
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[0.5]]))
    assert box_iou(torch.zeros(0, 4), b).shape == (0, 1)
    assert box_iou(a.float(), torch.zeros(0, 4)).shape == (1, 0)


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(3, 5), torch.zeros(2, 3, 4)])
def test_box_iou_rejects_shapes(bad):
    with pytest.raises(ValueError, match=r"boxes1 must be a Tensor\[K, 4\], got shape"):
        box_iou(bad, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="boxes2"):
        box_iou(torch.zeros(1, 4), bad)


def test_box_area():
    boxes = torch.tensor([[0.0, 0.0, 9.0, 4.0], [2.0, 3.0, 2.0, 3.0]])
    torch.testing.assert_close(box_area(boxes), torch.tensor([36.0, 0.0]))
    torch.testing.assert_close(box_area(boxes, inclusive=True), torch.tensor([50.0, 1.0]))


# --------------------------------------------------------------------- NMS


@pytest.mark.parametrize("inclusive", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_nms_matches_greedy_loop_with_ties(inclusive, seed):
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(60, g, max_xy=40.0)
    scores = torch.randint(0, 6, (60,), generator=g).double()  # many ties
    got = nms(boxes, scores, 0.3, inclusive=inclusive)
    assert got.tolist() == greedy_nms_ref(boxes, scores, 0.3, inclusive)


def test_nms_tie_keeps_earlier_box():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.5, 0.9, 0.9])
    assert nms(boxes, scores, 0.5).tolist() == [1]


@pytest.mark.parametrize("seed", range(3))
def test_batched_nms_matches_per_class_loop(seed):
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(80, g, max_xy=30.0)
    scores = torch.randint(0, 8, (80,), generator=g).double()
    labels = torch.randint(0, 4, (80,), generator=g)
    got = batched_nms(boxes, scores, labels, 0.4, inclusive=True)
    expected = []
    for c in range(4):
        idx = (labels == c).nonzero().squeeze(1)
        expected += [idx[i].item() for i in greedy_nms_ref(boxes[idx], scores[idx], 0.4, True)]
    expected.sort(key=lambda i: (-scores[i].item(), i))
    assert got.tolist() == expected


def test_nms_empty_and_bad_inputs():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.3).tolist() == []
    no_labels = torch.zeros(0, dtype=torch.long)
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), no_labels, 0.3).tolist() == []
    with pytest.raises(ValueError, match=r"scores must be a Tensor\[K\] with K = 2"):
        nms(torch.zeros(2, 4), torch.zeros(3), 0.3)
    with pytest.raises(ValueError, match="iou_threshold must be in \\[0, 1\\], got 1.5"):
        nms(torch.zeros(2, 4), torch.zeros(2), 1.5)
    with pytest.raises(ValueError, match="labels must be"):
        batched_nms(torch.zeros(2, 4), torch.zeros(2), torch.zeros(3, dtype=torch.long), 0.3)


# -------------------------------------------------------- select_detections


def _check_select(boxes, scores, score_thr, nms_thr, max_per_image, inclusive, max_per_class=None):
    out = select_detections(boxes, scores, score_thr, nms_thr, max_per_image, inclusive, max_per_class)
    expected = select_ref(boxes, scores, score_thr, nms_thr, max_per_image, inclusive, max_per_class)
    assert out["labels"].dtype == torch.int64
    assert out["labels"].tolist() == [c for _, _, c in expected]
    assert out["windows"].tolist() == [k for _, k, _ in expected]
    assert out["scores"].tolist() == [s for s, _, _ in expected]
    per_class = boxes if boxes.dim() == 3 else boxes[:, None, :].expand(-1, scores.shape[1], -1)
    expected_boxes = [per_class[k, c].tolist() for _, k, c in expected]
    assert out["boxes"].tolist() == expected_boxes


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_class_boxes", [False, True])
def test_select_detections_matches_reference(seed, per_class_boxes):
    g = torch.Generator().manual_seed(seed)
    num_windows, num_classes = 70, 5
    if per_class_boxes:
        boxes = random_boxes(num_windows * num_classes, g, max_xy=50.0)
        boxes = boxes.reshape(num_windows, num_classes, 4)
    else:
        boxes = random_boxes(num_windows, g, max_xy=50.0)
    scores = (torch.randn(num_windows, num_classes, generator=g, dtype=torch.float64) * 2).round() / 2
    for score_thr, max_per_image in [(float("-inf"), 100), (0.0, 25), (-1.0, None), (0.5, 1)]:
        _check_select(boxes, scores, score_thr, 0.3, max_per_image, inclusive=True)
        for max_per_class in (1, 4):  # per class, then over classes
            _check_select(boxes, scores, score_thr, 0.3, max_per_image, True, max_per_class=max_per_class)
    _check_select(boxes, scores, 0.0, 0.5, 40, inclusive=False)
    # one threshold per class (calibrated operating points); +-inf keep all / none
    per_class = [0.0, -1.0, float("inf"), 0.5, float("-inf")]
    for max_per_image in (100, 7):
        _check_select(boxes, scores, per_class, 0.3, max_per_image, inclusive=True)
    out = select_detections(boxes, scores, torch.tensor(per_class), 0.3, 100)
    assert out["labels"].tolist() == [c for _, _, c in select_ref(boxes, scores, per_class, 0.3, 100, True)]


def test_select_detections_keeps_100_per_class_by_default():
    # spp_test.m: at most 100 detections of EACH class per image (not 100 over all classes).
    g = torch.Generator().manual_seed(0)
    # Far-apart windows: NMS removes nothing, so the caps alone decide.
    xy = torch.arange(300, dtype=torch.float64)[:, None] * 100
    boxes = torch.cat([xy, xy, xy + 10, xy + 10], dim=1)
    scores = torch.rand(300, 2, generator=g, dtype=torch.float64)
    scores[:, 1] -= 0.5  # class 1 scores lower: a total cap of 100 would keep few of them
    out = select_detections(boxes, scores)
    assert len(out["scores"]) == 200
    for c in range(2):
        torch.testing.assert_close(out["scores"][out["labels"] == c], scores[:, c].sort(descending=True).values[:100])
    total = select_detections(boxes, scores, max_per_image=100, max_per_class=None)
    torch.testing.assert_close(total["scores"], scores.flatten().sort(descending=True).values[:100])
    assert int((total["labels"] == 1).sum()) < 50  # the case tells the two caps apart


def test_select_detections_empty_and_errors():
    out = select_detections(torch.zeros(0, 4), torch.zeros(0, 3), 0.0)
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["labels"].shape == (0,)
    out = select_detections(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[-1.0, -2.0]]), 0.0)
    assert len(out["scores"]) == 0
    with pytest.raises(ValueError, match=r"Tensor\[K, C, 4\] or Tensor\[K, 4\] with K = 3, C = 2"):
        select_detections(torch.zeros(3, 3, 4), torch.zeros(3, 2), 0.0)
    with pytest.raises(ValueError, match="scores must be a Tensor\\[K, C\\]"):
        select_detections(torch.zeros(3, 4), torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="max_per_image must be a positive int or None, got 0"):
        select_detections(torch.zeros(3, 4), torch.zeros(3, 2), 0.0, max_per_image=0)
    with pytest.raises(ValueError, match="max_per_class must be a positive int or None, got 1.5"):
        select_detections(torch.zeros(3, 4), torch.zeros(3, 2), 0.0, max_per_class=1.5)
    with pytest.raises(ValueError, match="nms_threshold must be in"):
        select_detections(torch.zeros(3, 4), torch.zeros(3, 2), 0.0, nms_threshold=-0.1)
    with pytest.raises(ValueError, match=r"sequence of 2 per-class values .* got shape \(3,\)"):
        select_detections(torch.zeros(3, 4), torch.zeros(3, 2), [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="score_threshold must not be NaN"):
        select_detections(torch.zeros(3, 4), torch.zeros(3, 2), [0.0, float("nan")])
    with pytest.raises(ValueError, match="score_threshold must be a number or one number per class"):
        select_detections(torch.zeros(3, 4), torch.zeros(3, 2), "high")
    scores = torch.zeros(3, 2)
    scores[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"scores must not contain NaN, got row 2"):
        select_detections(torch.zeros(3, 4), scores, 0.0)


# ------------------------------------------------------ box regression


def encode_ref(p, g, inclusive):
    """R-CNN Appendix C, one box, written out."""
    off = 1.0 if inclusive else 0.0
    pw, ph = p[2] - p[0] + off, p[3] - p[1] + off
    gw, gh = g[2] - g[0] + off, g[3] - g[1] + off
    px, py = p[0] + 0.5 * pw, p[1] + 0.5 * ph
    gx, gy = g[0] + 0.5 * gw, g[1] + 0.5 * gh
    return [(gx - px) / pw, (gy - py) / ph, math.log(gw / pw), math.log(gh / ph)]


@pytest.mark.parametrize("inclusive", [False, True])
def test_encode_matches_formula_and_decode_inverts(inclusive):
    g = torch.Generator().manual_seed(0)
    proposals = random_boxes(50, g) + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    gt = random_boxes(50, g) + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    deltas = encode_boxes(proposals, gt, inclusive=inclusive)
    expected = [encode_ref(p, t, inclusive) for p, t in zip(proposals.tolist(), gt.tolist())]
    torch.testing.assert_close(deltas, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(decode_boxes(proposals, deltas, inclusive=inclusive), gt)
    weights = (10.0, 10.0, 5.0, 5.0)
    weighted = encode_boxes(proposals, gt, weights=weights, inclusive=inclusive)
    torch.testing.assert_close(weighted, deltas * torch.tensor(weights, dtype=torch.float64))
    torch.testing.assert_close(decode_boxes(proposals, weighted, weights=weights, inclusive=inclusive), gt)


def test_encode_known_values():
    p = torch.tensor([[0.0, 0.0, 9.0, 9.0]])  # 10x10 pixels, centre (5, 5)
    t = torch.tensor([[5.0, 0.0, 24.0, 4.0]])  # 20x5 pixels, centre (15, 2.5)
    torch.testing.assert_close(encode_boxes(p, t), torch.tensor([[1.0, -0.25, math.log(2.0), math.log(0.5)]]))


def test_decode_per_class_deltas_and_clamp():
    g = torch.Generator().manual_seed(1)
    proposals = random_boxes(6, g) + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    deltas = torch.randn(6, 3, 4, generator=g, dtype=torch.float64) * 0.3
    out = decode_boxes(proposals, deltas)
    assert out.shape == (6, 3, 4)
    for c in range(3):
        torch.testing.assert_close(out[:, c], decode_boxes(proposals, deltas[:, c]))
    # dw far beyond log(1000/16) is clamped: the 16-pixel box grows to 1000 pixels.
    p = torch.tensor([[0.0, 0.0, 15.0, 15.0]], dtype=torch.float64)
    big = decode_boxes(p, torch.tensor([[0.0, 0.0, 50.0, 0.0]], dtype=torch.float64))
    assert torch.isfinite(big).all()
    assert big[0, 2] - big[0, 0] + 1 == pytest.approx(1000.0)
    assert big[0, 3] - big[0, 1] + 1 == pytest.approx(16.0)


def test_encode_decode_errors_name_rows():
    p = torch.tensor([[0.0, 0.0, 9.0, 9.0], [3.0, 3.0, 3.0, 8.0]])
    msg = r"proposals must have positive widths and heights, got row 1 = \[3.0, 3.0, 3.0, 8.0\]"
    with pytest.raises(ValueError, match=msg):
        encode_boxes(p, p, inclusive=False)
    encode_boxes(p, p, inclusive=True)  # a one-pixel column is fine with +1 widths
    with pytest.raises(ValueError, match="same shape"):
        encode_boxes(p, p[:1])
    with pytest.raises(ValueError, match=r"deltas must be a Tensor\[K, 4\] or Tensor\[K, C, 4\] with K = 2"):
        decode_boxes(p, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="weights must be 4 positive"):
        encode_boxes(p, p, weights=(1.0, 1.0, 0.0, 1.0))


# -------------------------------------------------- clip, small, validate


def test_clip_boxes():
    boxes = torch.tensor([[-5.0, -1.0, 120.0, 30.0], [10.0, 20.0, 50.0, 200.0]])
    assert clip_boxes(boxes, (100, 80)).tolist() == [[0, 0, 80, 30], [10, 20, 50, 100]]
    assert clip_boxes(boxes, (100, 80), inclusive=True).tolist() == [[0, 0, 79, 30], [10, 20, 50, 99]]
    assert clip_boxes(boxes[None], (100, 80)).shape == (1, 2, 4)
    with pytest.raises(ValueError, match=r"size must be \(H, W\) with positive entries, got \(0, 5\)"):
        clip_boxes(boxes, (0, 5))


def test_remove_small_boxes():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 9.0], [0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 9.0, 3.0]])
    assert remove_small_boxes(boxes, 5.0).tolist() == [1]
    assert remove_small_boxes(boxes, 5.0, inclusive=True).tolist() == [0, 1]


def test_validate_boxes_accepts_good_boxes():
    validate_boxes(torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]]))
    validate_boxes(torch.zeros(0, 4))
    validate_boxes(torch.tensor([[0, 0, 5, 5]]))


def test_validate_boxes_errors_name_the_row():
    with pytest.raises(ValueError, match=r"proposals must be a Tensor\[K, 4\], got shape \(3, 5\)"):
        validate_boxes(torch.zeros(3, 5), name="proposals")
    with pytest.raises(ValueError, match="must be a Tensor"):
        validate_boxes([[0, 0, 1, 1]])
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, float("inf"), 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"boxes must be finite, got row 2 = \[0.0, inf, 1.0, 1.0\]"):
        validate_boxes(boxes)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [4.0, 0.0, 3.0, 1.0]])
    with pytest.raises(ValueError, match=r"x1 <= x2 and y1 <= y2, got row 1 = \[4.0, 0.0, 3.0, 1.0\]"):
        validate_boxes(boxes)
    boxes = torch.tensor([[0.0, 5.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"got row 0 = \[0.0, 5.0, 1.0, 1.0\]"):
        validate_boxes(boxes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_select_detections_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(500, g, max_xy=200.0).float()
    scores = (torch.rand(500, 20, generator=g) * 8).round() / 8  # ties
    cpu = select_detections(boxes, scores, 0.1)
    gpu = select_detections(boxes.cuda(), scores.cuda(), 0.1)
    for key in ("boxes", "scores", "labels"):
        assert gpu[key].is_cuda
        torch.testing.assert_close(gpu[key].cpu(), cpu[key])
    torch.testing.assert_close(
        box_iou(boxes.cuda(), boxes[:7].cuda(), inclusive=True).cpu(), box_iou(boxes, boxes[:7], inclusive=True)
    )
