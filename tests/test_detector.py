"""The detector's steps against brute-force references (readable loops)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from sppnet.models import get_model
from sppnet.models.detector import (
    PAPER_SCALES,
    RCNN_CONTEXT_PADDING,
    RELEASED_CODE_TARGET_SIZE,
    Scale,
    SPPDetector,
    assign_scales,
    assign_scales_released,
    image_scales,
    map_windows,
    reorder_pyramid_levels,
    resize_image,
    warp_windows,
)
from sppnet.ops import box_iou, spatial_pyramid_pool

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_backbone(levels=(6, 3, 2, 1), seed=0, num_classes=4):
    torch.manual_seed(seed)
    return get_model("zf5", num_classes=num_classes, width=0.125, fc_dim=32, levels=levels).eval()


def random_boxes(n, width, height, gen, min_side=1):
    x1 = torch.randint(0, width - min_side + 1, (n,), generator=gen)
    y1 = torch.randint(0, height - min_side + 1, (n,), generator=gen)
    x2 = torch.minimum(x1 + min_side - 1 + torch.randint(0, width, (n,), generator=gen), torch.tensor(width - 1))
    y2 = torch.minimum(y1 + min_side - 1 + torch.randint(0, height, (n,), generator=gen), torch.tensor(height - 1))
    return torch.stack([x1, y1, x2, y2], 1).float()


# ------------------------------------------------------------------ scales


def test_image_scales_short_side_is_the_scale():
    for (h, w), s in itertools.product([(300, 400), (401, 299), (123, 123)], [480, 688, 1200]):
        (sc,) = image_scales(h, w, [s])
        assert min(sc.height, sc.width) == s
        assert sc.fy == pytest.approx(sc.height / h) and sc.fx == pytest.approx(sc.width / w)
        assert max(sc.height, sc.width) == round(max(h, w) * s / min(h, w))


def assign_reference(boxes, factors, target):
    """Brute force: per window, the first scale minimising |scaled area - target^2|."""
    out = []
    for x1, y1, x2, y2 in boxes.tolist():
        area = (x2 - x1 + 1) * (y2 - y1 + 1)
        best, best_d = None, math.inf
        for s, (fy, fx) in enumerate(factors):
            d = abs(area * fy * fx - target * target)
            if d < best_d:
                best, best_d = s, d
        out.append(best)
    return out


def test_assign_scales_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    boxes = random_boxes(500, 500, 375, gen)
    for scales in ([688], [480, 576, 688, 864, 1200], [300, 200]):
        sc = image_scales(375, 500, scales)
        factors = [(s.fy, s.fx) for s in sc]
        for target in (224, RELEASED_CODE_TARGET_SIZE, 100):
            got = assign_scales(boxes, sc, target).tolist()
            assert got == assign_reference(boxes, factors, target)


def test_assign_scales_first_scale_wins_ties():
    # A 10x10 window at factors (1, 1) and (1, 7): areas 100 and 700, target 20 -> both 300 away.
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    assert assign_scales(boxes, torch.tensor([[1.0, 1.0], [1.0, 7.0]]), 20).tolist() == [0]
    assert assign_scales(boxes, torch.tensor([[1.0, 7.0], [1.0, 1.0]]), 20).tolist() == [0]
    assert assign_scales(boxes, torch.tensor([[1.0, 7.0], [1.0, 1.0], [1.0, 7.0]]), 20).tolist() == [0]
    assert assign_reference(boxes, [(1.0, 7.0), (1.0, 1.0)], 20) == [0]


def released_reference(boxes, short_sides, image_min_side, target):
    """spm_expected_scale.m + spp_features_convX_to_poolX.m, by a loop: MATLAB round, first minimum."""
    out = []
    for x1, y1, x2, y2 in boxes.tolist():
        area = (x2 - x1 + 1) * (y2 - y1 + 1)
        expected = math.floor(target * image_min_side / math.sqrt(area) + 0.5)  # round half away (> 0)
        dist = [abs(s - expected) for s in short_sides]
        out.append(dist.index(min(dist)))
    return out


def test_assign_scales_released_matches_brute_force_and_differs_from_the_area_rule():
    gen = torch.Generator().manual_seed(0)
    boxes = random_boxes(3000, 500, 375, gen, min_side=8)
    sc = image_scales(375, 500, PAPER_SCALES)
    short_sides = [min(s.height, s.width) for s in sc]
    assert short_sides == list(PAPER_SCALES)
    got = assign_scales_released(boxes, short_sides, 375, RELEASED_CODE_TARGET_SIZE)
    assert got.tolist() == released_reference(boxes, short_sides, 375, RELEASED_CODE_TARGET_SIZE)
    area_rule = assign_scales(boxes, sc, RELEASED_CODE_TARGET_SIZE)
    differ = float((got != area_rule).float().mean())
    assert 0.0 < differ < 0.2  # the rules disagree on windows between two scales only
    # The detector's rule reads the short sides and the image's short side from its Scales.
    det = SPPDetector(tiny_backbone(), 2, scales=PAPER_SCALES, target_size=208, scale_rule="released")
    assert torch.equal(det.assign_scales(boxes, det.image_scales(375, 500)), got)
    det_area = SPPDetector(tiny_backbone(), 2, scales=PAPER_SCALES, target_size=208)
    assert det_area.scale_rule == "area" and torch.equal(det_area.assign_scales(boxes, sc), area_rule)
    # A hand-made case: short side 500, scales 480 / 576. Per window, e = 208 * 500 / sqrt(area) is the
    # short side at which it is 208 px. The area rule compares |s^2 - e^2| (480 iff e < sqrt((480^2 +
    # 576^2) / 2) = 530.2), the released one |s - round(e)| (480 iff round(e) <= 528). A 196 x 197
    # window: e = 529.3, so the area rule picks 480 and the released rule 576 (529 - 480 = 49 > 47).
    box = torch.tensor([[0.0, 0.0, 195.0, 196.0]])
    assert assign_scales_released(box, [480, 576], 500).tolist() == [1]
    assert assign_scales(box, torch.tensor([480 / 500, 576 / 500]), 208).tolist() == [0]
    with pytest.raises(ValueError, match="short sides and image_min_side must be positive"):
        assign_scales_released(box, [480, 0], 500)
    with pytest.raises(ValueError, match="scale_rule must be one of"):
        SPPDetector(tiny_backbone(), 2, scales=(100,), scale_rule="nearest")


# ---------------------------------------------------------------- mapping


def map_reference(box, fy, fx, stride, offset, size):
    """Keep the cells whose centres (offset + stride * j) lie in the scaled window, by a loop."""
    x1, y1, x2, y2 = box
    edges = ((x1 * fx, (x2 + 1) * fx, size[1]), (y1 * fy, (y2 + 1) * fy, size[0]))
    out = []
    for lo, hi, n in edges:
        cells = [j for j in range(-5, n + 5) if lo <= offset + stride * j <= hi]
        if cells:
            a, b = cells[0], cells[-1]
        else:  # no centre inside: the cell nearest the window's centre
            a = b = math.floor(((lo + hi) / 2 - offset) / stride + 0.5)
        out.append((min(max(a, 0), n - 1), min(max(b, 0), n - 1)))
    (ax, bx), (ay, by) = out
    return [ax, ay, bx, by]


def test_map_windows_per_scale_matches_loop():
    bb = tiny_backbone()
    gen = torch.Generator().manual_seed(1)
    boxes = random_boxes(200, 333, 251, gen)
    for sc in image_scales(251, 333, [120, 251, 400]):
        size = bb.feature_size(sc.height, sc.width)
        cells = map_windows(boxes, sc, size, bb.stride, bb.offset)
        for b, c in zip(boxes.tolist(), cells.tolist()):
            assert c == map_reference(b, sc.fy, sc.fx, bb.stride, bb.offset, size), (b, sc)


# ------------------------------------------------------------------ pooling


@pytest.fixture(scope="module")
def detector():
    det = SPPDetector(tiny_backbone(), num_classes=3, scales=(96, 160), target_size=64, chunk_size=7)
    return det.eval()


def test_pooled_window_equals_pyramid_of_the_map_crop(detector):
    gen = torch.Generator().manual_seed(2)
    image = detector.normalize(torch.rand(3, 150, 210, generator=gen))
    boxes = random_boxes(40, 210, 150, gen)
    with torch.no_grad():
        maps, scales = detector.feature_maps(image)
        idx = detector.assign_scales(boxes, scales)
        rois = detector.map_windows(boxes, scales, [m.shape[-2:] for m in maps], idx)
        pooled = detector.pool_windows(maps, rois)
    assert set(idx.tolist()) == {0, 1}  # both scales are exercised
    for row, (s, x1, y1, x2, y2) in zip(pooled, rois.tolist()):
        crop = maps[s][None, :, y1 : y2 + 1, x1 : x2 + 1]
        torch.testing.assert_close(row, spatial_pyramid_pool(crop, detector.levels)[0])


def _bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Row i: the weights of plain bilinear interpolation (half-pixel centres, edges clamped)."""
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(math.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        a[i, lo] += 1 - (src - lo)
        a[i, hi] += src - lo
    return a


@pytest.mark.parametrize("size", [(80, 121), (37, 100), (37, 53), (200, 54)])
def test_resize_image_upscaling_is_plain_bilinear_which_the_antialiased_filter_equals(size):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 37, 53, generator=gen, dtype=torch.float64)
    h, w = size
    expected = torch.einsum("oh,nchw,pw->ncop", _bilinear_matrix(37, h), x, _bilinear_matrix(53, w))
    torch.testing.assert_close(resize_image(x, h, w), expected, rtol=0, atol=1e-10)
    aa = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(aa, expected, rtol=0, atol=1e-10)  # what shrinking uses, same values here


@pytest.mark.parametrize("size", [(20, 30), (80, 40), (36, 53)])
def test_resize_image_shrinking_on_either_axis_is_antialiased(size):
    x = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(1))
    aa = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    plain = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    assert torch.equal(resize_image(x, *size), aa)
    if size[0] < 30:  # a real shrink: the plain filter skips source pixels, the antialiased one averages them
        assert not torch.allclose(aa, plain, atol=1e-3)


def test_window_features_match_a_loop_over_windows(detector):
    """conv once per scale + chunked pooling == every window computed on its own."""
    gen = torch.Generator().manual_seed(3)
    image = detector.normalize(torch.rand(3, 130, 170, generator=gen))
    boxes = random_boxes(12, 170, 130, gen)
    with torch.no_grad():
        pool5 = detector.window_pool5(image, boxes)  # chunks of 7
        for k, box in enumerate(boxes):
            # the reference: resize the image to the window's scale, run conv, crop, pool
            scales = image_scales(130, 170, detector.scales, detector.backbone.min_input_size)
            s = int(assign_scales(box[None], scales, detector.target_size))
            resized = F.interpolate(
                image[None],
                size=(scales[s].height, scales[s].width),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
            fmap = detector.backbone.forward_features(resized)[0]
            x1, y1, x2, y2 = map_windows(box[None], scales[s], fmap.shape[-2:], detector.stride, detector.offset)[0]
            expected = spatial_pyramid_pool(fmap[None, :, y1 : y2 + 1, x1 : x2 + 1], detector.levels)[0]
            torch.testing.assert_close(pool5[k], expected)


def test_reordering_levels_keeps_the_backbone_function():
    bb = tiny_backbone(levels=(6, 3, 2, 1))
    x = torch.rand(2, 3, 70, 90)
    with torch.no_grad():
        before = bb(x)
        det = SPPDetector(bb, 3, levels=(1, 2, 3, 6), scales=(100,))
        after = bb(x)
    assert det.levels == (1, 2, 3, 6) and bb.levels == (1, 2, 3, 6)
    torch.testing.assert_close(after, before)
    with pytest.raises(ValueError, match="pyramid levels"):
        reorder_pyramid_levels(tiny_backbone(), (1, 2, 4))


# -------------------------------------------------------------------- R-CNN


def test_rcnn_warp_without_context_equals_manual_crop_and_resize():
    gen = torch.Generator().manual_seed(4)
    image = torch.rand(3, 120, 160, generator=gen)
    boxes = torch.tensor([[10.0, 5.0, 80.0, 60.0], [0.0, 0.0, 159.0, 119.0], [30.0, 40.0, 62.0, 103.0]])
    warped = warp_windows(image, boxes, 32, sampling_ratio=1, context=0.0)
    for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        crop = image[None, :, y1 : y2 + 1, x1 : x2 + 1]
        expected = F.interpolate(crop, size=(32, 32), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(warped[k], expected, atol=1e-5, rtol=1e-5)


def test_rcnn_warp_with_context_equals_a_crop_of_the_mean_padded_image():
    # context 1/4: the box fills the middle half of the output, so a 10 (12, 20) px side is
    # enlarged about its centre to 20 (24, 40) px, a whole-pixel crop of the image padded
    # with the mean (0), and warped to 8 px. Windows hang over every border.
    gen = torch.Generator().manual_seed(13)
    image = torch.rand(3, 30, 40, generator=gen)
    pad = 25
    padded = F.pad(image, (pad, pad, pad, pad))  # zeros: the mean of a normalised image
    boxes = torch.tensor(
        [
            [0.0, 0.0, 11.0, 19.0],
            [30.0, 20.0, 49.0, 31.0],
            [10.0, 3.0, 21.0, 14.0],
            [-4.0, 12.0, 7.0, 31.0],
            [34.0, 25.0, 43.0, 34.0],
            [1.0, 22.0, 10.0, 41.0],  # 10 px sides: 2.5 source pixels per output pixel
        ]
    )
    warped = warp_windows(image, boxes, 8, sampling_ratio=1, context=0.25)
    for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        w, h = x2 - x1 + 1, y2 - y1 + 1
        left, top = x1 - w // 2 + pad, y1 - h // 2 + pad  # the enlarged box, 2w x 2h, in the padded image
        crop = padded[None, :, top : top + 2 * h, left : left + 2 * w]
        expected = F.interpolate(crop, size=(8, 8), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(warped[k], expected, atol=1e-6, rtol=1e-6)
    assert bool((warped[0, :, :2, :] == 0).all()) and bool((warped[0, :, :, :2] == 0).all())


def test_rcnn_context_is_16_pixels_at_227():
    # R-CNN's p = 16 at 227: the middle 195 x 195 pixels are the bare box warped to 195,
    # and a box in the image's corner gets 15 rows / columns of mean (0) before it.
    gen = torch.Generator().manual_seed(14)
    image = torch.rand(3, 260, 300, generator=gen)
    boxes = torch.tensor([[30.0, 20.0, 129.0, 89.0], [40.0, 50.0, 290.0, 250.0]])
    warped = warp_windows(image, boxes, 227, sampling_ratio=1)  # default: RCNN_CONTEXT_PADDING
    assert RCNN_CONTEXT_PADDING * 227 == pytest.approx(16.0)
    bare = warp_windows(image, boxes, 195, sampling_ratio=1, context=0.0)
    torch.testing.assert_close(warped[:, :, 16:211, 16:211], bare, atol=1e-4, rtol=1e-4)
    corner = warp_windows(image, torch.tensor([[0.0, 0.0, 194.0, 194.0]]), 227, sampling_ratio=1)[0]
    assert bool((corner[:, :15, :] == 0).all()) and bool((corner[:, :, :15] == 0).all())
    assert bool((corner[:, 16:, 16:] != 0).all())
    with pytest.raises(ValueError, match=r"context must be in \[0, 0.5\)"):
        warp_windows(image, boxes, 227, context=0.5)


def test_rcnn_features_are_the_pyramid_of_each_warped_window():
    det = SPPDetector(tiny_backbone(), 3, scales=(100,), target_size=48, method="rcnn", warp_chunk=2).eval()
    gen = torch.Generator().manual_seed(5)
    image = det.normalize(torch.rand(3, 90, 120, generator=gen))
    boxes = random_boxes(5, 120, 90, gen, min_side=8)
    with torch.no_grad():
        got = det.window_pool5(image, boxes)
        for k, box in enumerate(boxes):
            crop = warp_windows(image, box[None], 48)
            expected = spatial_pyramid_pool(det.backbone.forward_features(crop), det.levels)[0]
            torch.testing.assert_close(got[k], expected)


# ---------------------------------------------------------------- detection


def test_detect_applies_per_class_nms_and_the_caps():
    det = SPPDetector(tiny_backbone(seed=6), 3, scales=(120,), target_size=48, chunk_size=64).eval()
    torch.manual_seed(7)
    det.svm_weight.normal_()
    det.svm_bias.normal_()
    det.trained_heads[0] = True
    gen = torch.Generator().manual_seed(8)
    image = torch.rand(3, 140, 180, generator=gen)
    boxes = random_boxes(600, 180, 140, gen, min_side=6)
    (out,) = det.detect([image], [boxes], scorer="svm")
    per_class = torch.bincount(out["labels"], minlength=3)
    assert int(per_class.max()) == 100 and len(out["boxes"]) > 100  # 100 per class (spp_test.m), not in all
    (total,) = det.detect([image], [boxes], scorer="svm", max_per_class=None, max_per_image=100)
    assert len(total["boxes"]) == 100
    assert torch.all(out["scores"][:-1] >= out["scores"][1:])
    for c in range(3):
        b = out["boxes"][out["labels"] == c]
        iou = box_iou(b, b, inclusive=True)
        iou.fill_diagonal_(0)
        assert float(iou.max()) <= 0.3 if len(b) > 1 else True
    (few,) = det.detect([image], [boxes[:5]], scorer="softmax", max_per_image=100)
    assert len(few["boxes"]) <= 15 and set(few["labels"].tolist()) <= {0, 1, 2}
    (none,) = det.detect([image], [boxes[:0]], scorer="softmax")
    assert len(none["boxes"]) == 0


def test_detect_scores_equal_the_heads_applied_by_hand():
    det = SPPDetector(tiny_backbone(seed=9), 2, scales=(110,), target_size=48, chunk_size=5).eval()
    torch.manual_seed(10)
    det.svm_weight.normal_()
    det.svm_feature_scale.fill_(3.0)
    det.bbox_weight.normal_(0, 1e-3)
    det.bbox_bias.normal_(0, 0.05)
    det.bbox_feature_scale.fill_(0.5)
    det.trained_heads[:] = True
    gen = torch.Generator().manual_seed(11)
    image = torch.rand(3, 100, 130, generator=gen)
    boxes = random_boxes(12, 130, 100, gen, min_side=10)
    scores, per_class = det.score_windows(image, boxes)
    with torch.no_grad():
        pool5 = det.window_pool5(det.normalize(image), boxes)
        fc7 = det.fc7(pool5)
    torch.testing.assert_close(scores, 3.0 * fc7 @ det.svm_weight.T + det.svm_bias)
    from sppnet.ops import clip_boxes, decode_boxes

    deltas = torch.stack([0.5 * pool5 @ det.bbox_weight[c] + det.bbox_bias[c] for c in range(2)], dim=1)
    torch.testing.assert_close(per_class, clip_boxes(decode_boxes(boxes, deltas), (100, 130), True))
    soft = det.class_scores(fc7, "softmax")
    torch.testing.assert_close(soft.sum(1) + torch.softmax(det.cls_score(fc7), 1)[:, 0], torch.ones(12))


def greedy_nms(boxes, scores, threshold):
    """Visit by decreasing score (ties: lower index), drop a box overlapping a kept one by > threshold."""
    kept = []
    for i in sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i)):
        if all(float(box_iou(boxes[i][None], boxes[j][None], inclusive=True)) <= threshold for j in kept):
            kept.append(i)
    return kept


def test_detect_runs_nms_on_the_proposals_then_regresses_the_survivors():
    # spp_test_svm_bbox_regressor.m: per class NMS on the proposals' boxes and scores, the
    # best 100, then their regressed boxes; nms_boxes="regressed" runs NMS on the regressed boxes.
    det = SPPDetector(tiny_backbone(seed=15), 2, scales=(110,), target_size=48, chunk_size=9).eval()
    torch.manual_seed(16)
    det.svm_weight.normal_()
    det.bbox_weight.normal_(0, 2e-3)
    det.bbox_bias.normal_(0, 0.2)
    det.trained_heads[:] = True
    gen = torch.Generator().manual_seed(17)
    image = torch.rand(3, 100, 130, generator=gen)
    boxes = random_boxes(60, 130, 100, gen, min_side=10)
    scores, regressed = det.score_windows(image, boxes)

    def reference(nms_on):
        found = []
        for c in range(2):
            kept = greedy_nms(nms_on[:, c] if nms_on.dim() == 3 else nms_on, scores[:, c], 0.3)[:100]
            found += [(float(scores[k, c]), k, c) for k in kept]
        found.sort(key=lambda t: (-t[0], t[1], t[2]))
        return torch.stack([regressed[k, c] for _, k, c in found]), [c for *_, c in found]

    (release,) = det.detect([image], [boxes])
    (fast,) = det.detect([image], [boxes], nms_boxes="regressed")
    for out, nms_on in ((release, boxes), (fast, regressed)):
        expected_boxes, expected_labels = reference(nms_on)
        assert out["labels"].tolist() == expected_labels
        torch.testing.assert_close(out["boxes"], expected_boxes)
    assert len(release["boxes"]) != len(fast["boxes"])  # the case tells the two orders apart
    with pytest.raises(ValueError, match="nms_boxes must be one of"):
        det.detect([image], [boxes], nms_boxes="both")
    with pytest.raises(ValueError, match=r"proposals\[1\] must satisfy x1 <= x2"):
        det.detect([image, image], [boxes, torch.tensor([[5.0, 5.0, 1.0, 9.0]])])


def test_pool_windows_reads_maps_from_another_device_and_dtype(detector):
    # The feature cache hands CPU maps (possibly float16 / float64) and a subset of the scales.
    gen = torch.Generator().manual_seed(18)
    image = detector.normalize(torch.rand(3, 120, 150, generator=gen))
    boxes = random_boxes(20, 150, 120, gen)
    with torch.no_grad():
        maps, scales = detector.feature_maps(image)
        rois = detector.map_windows(boxes, scales, [m.shape[-2:] for m in maps], torch.zeros(20, dtype=torch.long))
        direct = detector.pool_windows(maps, rois)
        from_cache = detector.pool_windows([m.double() for m in maps], rois)
    assert from_cache.dtype == torch.float32
    torch.testing.assert_close(from_cache, direct)


def test_untrained_svms_are_refused():
    det = SPPDetector(tiny_backbone(), 2, scales=(100,))
    with pytest.raises(ValueError, match="not trained"):
        det.class_scores(torch.zeros(1, 32), "svm")


def test_compress_fc_full_rank_is_exact_and_low_rank_is_close():
    det = SPPDetector(tiny_backbone(seed=12), 2, scales=(100,)).eval()
    x = torch.randn(20, det.pooled_dim)
    with torch.no_grad():
        ref = det.fc7(x)
        det.compress_fc(32)  # fc_dim 32: full rank for fc7, rank 32 of fc6
        torch.testing.assert_close(det.fc7(x), ref, atol=1e-4, rtol=1e-4)
    assert isinstance(det.backbone.fc[0], torch.nn.Sequential)
    with pytest.raises(ValueError, match="already compressed"):
        det.compress_fc(8)


def test_scale_namedtuple_and_constructor_checks():
    assert Scale(10, 20, 1.0, 2.0).fx == 2.0
    with pytest.raises(ValueError, match="scales"):
        SPPDetector(tiny_backbone(), 2, scales=(10,))
    with pytest.raises(ValueError, match="method"):
        SPPDetector(tiny_backbone(), 2, scales=(100,), method="fast")


# ------------------------------------------------------------------- memory

_MEMORY_SCRIPT = r"""
import resource, sys, time, torch
from sppnet.models import get_model
from sppnet.models.detector import SPPDetector
torch.manual_seed(0)
backbone = get_model("zf5", num_classes=21, width=1.0, fc_dim=1024).eval()  # paper conv5: 12,800-d pool5
det = SPPDetector(backbone, 20, scales=(1200,), chunk_size=1024).eval()
det.trained_heads[:] = True
g = torch.Generator().manual_seed(1)
image = torch.rand(3, 900, 1200, generator=g)  # -> 1200 x 1600 at the paper's largest scale
x1 = torch.randint(0, 1100, (20000,), generator=g).float()
y1 = torch.randint(0, 800, (20000,), generator=g).float()
w = torch.randint(16, 400, (20000,), generator=g).float()
h = torch.randint(16, 400, (20000,), generator=g).float()
boxes = torch.stack([x1, y1, (x1 + w).clamp(max=1199), (y1 + h).clamp(max=899)], 1)
t = time.perf_counter()
(out,) = det.detect([image], [boxes])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{peak:.0f} {time.perf_counter() - t:.1f} {len(out['boxes'])}")
"""


@pytest.mark.slow
def test_20000_windows_on_a_1200px_image_stay_within_the_memory_bound():
    """Chunked pooling / fc / regression: the peak does not grow with the number of windows."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, check=True)
    peak_mib, _seconds, kept = res.stdout.split()
    # Unchunked, pool5 alone would be 20,000 x 12,800 x 4 B = 1 GB (plus fc6, regression outputs).
    assert float(peak_mib) < 2000, res.stdout
    assert 100 < int(kept) <= 20 * 100  # at most 100 per class (spp_test.m)
