"""Tests for sppnet.data.proposals: selective search, its cache, dense windows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sppnet.data import limits as limits_module
from sppnet.data import proposals
from sppnet.data.images import DataWarning, ImageError, SkipCounter
from sppnet.data.limits import ImageLimits
from sppnet.data.proposals import (
    ProposalCache,
    SelectiveSearchParams,
    add_ground_truth,
    check_search_limits,
    compute_proposals,
    selective_search,
    sliding_window_proposals,
)

# Filled rectangles, inclusive corners (PIL's rectangle() fills both ends).
RECTS = [(12, 15, 70, 85), (110, 30, 200, 75), (80, 100, 140, 165)]
COLOURS = [(220, 30, 30), (30, 40, 210), (240, 230, 40)]


def _synthetic_image(width: int = 240, height: int = 180, seed: int = 0, rects=RECTS) -> Image.Image:
    """Textured green background with solid rectangles on it."""
    rng = np.random.default_rng(seed)
    background = np.array([80, 130, 90]) + rng.integers(-12, 13, size=(height, width, 3))
    img = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for rect, colour in zip(rects, COLOURS):
        draw.rectangle(rect, fill=colour)
    return img


def _iou_inclusive(boxes: np.ndarray, box) -> np.ndarray:
    """IoU of each row of boxes [K, 4] with one box, +1-pixel (inclusive) areas."""
    ix1 = np.maximum(boxes[:, 0], box[0])
    iy1 = np.maximum(boxes[:, 1], box[1])
    ix2 = np.minimum(boxes[:, 2], box[2])
    iy2 = np.minimum(boxes[:, 3], box[3])
    inter = np.clip(ix2 - ix1 + 1, 0, None) * np.clip(iy2 - iy1 + 1, 0, None)
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    area_box = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    return inter / (area + area_box - inter)


def _check_valid(boxes: np.ndarray, width: int, height: int, min_size: int) -> None:
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert len(boxes) > 0
    np.testing.assert_array_equal(boxes, np.round(boxes))  # integer pixel corners
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width - 1).all() and (boxes[:, 3] <= height - 1).all()
    sides = np.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1], axis=1)
    assert (sides >= min_size).all(), sides.min()
    assert len(np.unique(boxes, axis=0)) == len(boxes)  # no duplicates


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return _synthetic_image()


@pytest.fixture(scope="module")
def all_boxes(image) -> np.ndarray:
    """Uncapped, unfiltered proposals of the synthetic image (computed once)."""
    return selective_search(np.asarray(image), min_size=1, max_proposals=None)


# --------------------------------------------------------------------------- #
# selective_search
# --------------------------------------------------------------------------- #


def test_selective_search_finds_the_drawn_rectangles(image):
    boxes = selective_search(np.asarray(image))
    # Default min_size: ceil(20 * 240 / 500) = 10 px.
    _check_valid(boxes, 240, 180, min_size=10)
    for rect in RECTS:
        assert _iou_inclusive(boxes, rect).max() > 0.7, rect
    # Deterministic, including the ranking order; PIL and array inputs agree.
    np.testing.assert_array_equal(selective_search(image), boxes)


def test_post_processing_is_a_filter_of_one_ranking(image, all_boxes):
    _check_valid(all_boxes, 240, 180, min_size=1)
    sides = np.minimum(all_boxes[:, 2] - all_boxes[:, 0], all_boxes[:, 3] - all_boxes[:, 1]) + 1
    threshold = int(np.sort(sides)[len(sides) // 2])  # the median: drops some, keeps some
    big = selective_search(np.asarray(image), min_size=threshold, max_proposals=None)
    np.testing.assert_array_equal(big, all_boxes[sides >= threshold])
    assert 0 < len(big) < len(all_boxes)
    capped = selective_search(np.asarray(image), min_size=1, max_proposals=7)
    np.testing.assert_array_equal(capped, all_boxes[:7])


def test_seed_changes_the_order_not_the_set(image, all_boxes):
    other = selective_search(np.asarray(image), min_size=1, max_proposals=None, seed=12345)
    assert not np.array_equal(other, all_boxes)
    assert {tuple(b) for b in other} == {tuple(b) for b in all_boxes}


def test_resize_to_maps_boxes_back_to_the_original_frame(image):
    boxes = selective_search(np.asarray(image), resize_to=90, min_size=12)
    _check_valid(boxes, 240, 180, min_size=12)
    for rect in RECTS:
        assert _iou_inclusive(boxes, rect).max() > 0.7, rect
    # Images already smaller than resize_to are searched as they are.
    np.testing.assert_array_equal(
        selective_search(np.asarray(image), resize_to=500), selective_search(np.asarray(image))
    )


def test_other_modes_and_parameters():
    small = np.asarray(_synthetic_image(96, 72, rects=[(10, 10, 50, 40)]))
    single = selective_search(small, mode="single", min_size=4)
    quality = selective_search(small, mode="quality", min_size=4)
    for boxes in (single, quality):
        _check_valid(boxes, 96, 72, min_size=4)
        assert _iou_inclusive(boxes, (10, 10, 50, 40)).max() > 0.7
    assert len(quality) > len(single)  # many strategies vs one
    coarse = selective_search(small, mode="single", base_k=2000, min_size=1, max_proposals=None)
    fine = selective_search(small, mode="single", base_k=50, min_size=1, max_proposals=None)
    assert len(fine) > len(coarse)  # smaller k, more initial regions


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "slow"}, "mode must be one of .* got 'slow'"),
        ({"base_k": 0}, "base_k must be a positive int or None, got 0"),
        ({"inc_k": -5}, "inc_k must be a positive int, got -5"),
        ({"sigma": 0.0}, "sigma must be a positive number, got 0.0"),
        ({"max_proposals": 0}, "max_proposals must be a positive int or None, got 0"),
        ({"min_size": 2.5}, "min_size must be a positive int or None, got 2.5"),
        ({"seed": -1}, r"seed must be an int in \[0, 2\*\*32\), got -1"),
    ],
)
def test_invalid_parameters(kwargs, message):
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=message):
        selective_search(image, **kwargs)
    with pytest.raises(ValueError, match=message):
        SelectiveSearchParams(**kwargs)


@pytest.mark.parametrize(
    "image, message",
    [
        (
            np.zeros((20, 20), dtype=np.uint8),
            r"shape \[H, W, 3\], got dtype uint8 and shape \(20, 20\)",
        ),
        (np.zeros((20, 20, 3), dtype=np.float32), "got dtype float32"),
        (np.zeros((0, 20, 3), dtype=np.uint8), r"must not be empty, got shape \(0, 20, 3\)"),
        ([[0, 1]], "got list"),
    ],
)
def test_invalid_images(image, message):
    with pytest.raises(ValueError, match=message):
        selective_search(image)


# --------------------------------------------------------------------------- #
# Cache and batch computation
# --------------------------------------------------------------------------- #


@pytest.fixture
def image_files(tmp_path):
    """Three small PNG files with different content."""
    paths = []
    for seed, rects in enumerate([[(5, 5, 40, 30)], [(30, 10, 70, 50)], [(10, 20, 60, 55)]]):
        path = tmp_path / "images" / f"img{seed}.png"
        path.parent.mkdir(exist_ok=True)
        _synthetic_image(96, 72, seed=seed, rects=rects).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def counted(monkeypatch):
    """Counts calls of selective_search made by in-process computation."""
    calls = []
    original = proposals.selective_search

    def counting(image, **kwargs):
        calls.append(kwargs)
        return original(image, **kwargs)

    monkeypatch.setattr(proposals, "selective_search", counting)
    return calls


def _cache_files(cache_dir):
    return sorted(cache_dir.rglob("*.safetensors"))


def test_cache_is_used_on_the_second_call(tmp_path, image_files, counted):
    cache_dir = tmp_path / "cache"
    params = SelectiveSearchParams(min_size=4)
    first = compute_proposals(image_files, cache_dir, params, progress=False)
    assert len(counted) == 3 and len(_cache_files(cache_dir)) == 3
    for boxes in first:
        _check_valid(boxes, 96, 72, min_size=4)

    second = compute_proposals(image_files, cache_dir, params, progress=False)
    assert len(counted) == 3  # nothing recomputed
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)

    # A renamed copy of an image hits the same entry (the key is the content).
    copy = tmp_path / "renamed.png"
    copy.write_bytes(image_files[1].read_bytes())
    (again,) = compute_proposals([copy], cache_dir, params, progress=False)
    assert len(counted) == 3
    np.testing.assert_array_equal(again, first[1])


def test_cache_is_invalidated_by_params_content_and_corruption(tmp_path, image_files, counted):
    cache_dir = tmp_path / "cache"
    params = SelectiveSearchParams(min_size=4)
    reference = compute_proposals(image_files, cache_dir, params, progress=False)
    assert len(counted) == 3

    # Other parameters: different keys, everything recomputed, old entries kept.
    capped = compute_proposals(image_files, cache_dir, dataclasses.replace(params, max_proposals=3), progress=False)
    assert len(counted) == 6 and len(_cache_files(cache_dir)) == 6
    for full, few in zip(reference, capped):
        np.testing.assert_array_equal(few, full[:3])

    # A corrupted entry is detected by its checksum and rebuilt.
    cache = ProposalCache(cache_dir, params)
    entry = cache.path(cache.key(image_files[0]))
    data = bytearray(entry.read_bytes())
    data[-3] ^= 0x55
    entry.write_bytes(bytes(data))
    rebuilt = compute_proposals(image_files, cache_dir, params, progress=False)
    assert len(counted) == 7
    np.testing.assert_array_equal(rebuilt[0], reference[0])
    assert cache.load(cache.key(image_files[0])) is not None  # valid again

    # A truncated entry, too.
    entry.write_bytes(entry.read_bytes()[:50])
    compute_proposals(image_files[:1], cache_dir, params, progress=False)
    assert len(counted) == 8

    # New content under the same file name misses the cache.
    _synthetic_image(96, 72, seed=9, rects=[(0, 0, 30, 30)]).save(image_files[2])
    compute_proposals(image_files, cache_dir, params, progress=False)
    assert len(counted) == 9


def test_duplicate_contents_are_computed_once(tmp_path, image_files, counted):
    paths = [image_files[0], image_files[1], image_files[0]]
    out = compute_proposals(paths, None, {"min_size": 4}, progress=False)
    assert len(counted) == 2
    np.testing.assert_array_equal(out[0], out[2])
    assert out[0] is not out[2]  # independent arrays


def test_proposal_cache_get_and_keys(tmp_path, image_files):
    cache = ProposalCache(tmp_path / "cache", {"min_size": 4})
    boxes = cache.get(image_files[0])
    assert cache.load(cache.key(image_files[0])) is not None
    np.testing.assert_array_equal(cache.get(image_files[0]), boxes)
    np.testing.assert_array_equal(boxes, selective_search(Image.open(image_files[0]), min_size=4))
    other = ProposalCache(tmp_path / "cache", {"min_size": 5})
    assert other.key(image_files[0]) != cache.key(image_files[0])
    assert cache.key(image_files[0]) != cache.key(image_files[1])
    assert "min_size=4" in repr(cache)
    with pytest.raises(ValueError, match="unknown selective search parameters"):
        ProposalCache(tmp_path, {"min_sise": 4})


# "spawn" (the default) imports torch in every worker, "forkserver" once.
@pytest.mark.parametrize("start_method", ["forkserver", pytest.param("spawn", marks=pytest.mark.slow)])
def test_parallel_workers_match_serial(image_files, start_method):
    paths = image_files + [image_files[0]]
    params = SelectiveSearchParams(min_size=4, max_proposals=50)
    serial = compute_proposals(paths, None, params, workers=0, progress=False)
    parallel = compute_proposals(paths, None, params, workers=2, progress=False, start_method=start_method)
    assert len(parallel) == len(serial) == 4
    for a, b in zip(serial, parallel):
        assert len(a) > 0
        np.testing.assert_array_equal(a, b)  # same boxes in the same order


def test_bad_images_raise_or_are_skipped(tmp_path, image_files):
    missing = tmp_path / "images" / "missing.jpg"
    not_image = tmp_path / "images" / "notes.jpg"
    not_image.write_text("this is not a JPEG")
    with pytest.raises(ValueError, match="missing.jpg"):
        compute_proposals([image_files[0], missing], None, progress=False)
    with pytest.raises(ValueError, match="notes.jpg"):
        compute_proposals([not_image], tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists() or _cache_files(tmp_path / "cache") == []

    skipped = SkipCounter("images")
    with (
        pytest.warns(DataWarning, match="skipping .*missing.jpg"),
        pytest.warns(DataWarning, match="skipping .*notes.jpg"),
    ):
        out = compute_proposals(
            [missing, image_files[0], not_image],
            None,
            {"min_size": 4},
            progress=False,
            skip_errors=True,
            skipped=skipped,
        )
    assert out[0].shape == (0, 4) and out[2].shape == (0, 4)
    assert skipped.paths == [str(missing), str(not_image)]
    assert skipped.counts == {"missing": 1, "not an image": 1}
    _check_valid(out[1], 96, 72, min_size=4)

    with pytest.raises(ValueError, match="workers must be an int >= 0, got -1"):
        compute_proposals(image_files, None, workers=-1)
    with pytest.raises(ValueError, match="start_method must be one of .* got 'teleport'"):
        compute_proposals(image_files, None, start_method="teleport")
    with pytest.raises(ValueError, match="got 'fork' .*deadlocks"):
        compute_proposals(image_files, None, workers=2, start_method="fork")


def _no_search(monkeypatch):
    """Makes any call into OpenCV's selective search fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("selective search ran on an image that should have been refused up front")

    monkeypatch.setattr(proposals.cv2.ximgproc.segmentation, "createSelectiveSearchSegmentation", refuse)


def test_thin_strip_is_refused_up_front_naming_the_file_and_flag(tmp_path, monkeypatch, image_files):
    # Issue 18: a 200 KB 20000x10 PNG ran selective search for minutes. Now it is
    # refused from its header, before it is decoded or searched.
    strip = tmp_path / "strip.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 20000, 3), dtype=np.uint8)).save(strip)
    _no_search(monkeypatch)
    message = r"strip\.png: no proposals: image is 20000x10 pixels, aspect ratio 2000\.0 exceeds .* --max-aspect-ratio"
    with pytest.raises(ImageError, match=message) as info:
        compute_proposals([strip], tmp_path / "cache", progress=False)
    assert info.value.reason == "too elongated"
    with pytest.raises(ImageError, match="--max-aspect-ratio"):
        ProposalCache(tmp_path / "cache").get(strip)
    with pytest.raises(ValueError, match=r"selective search refused: .*--max-aspect-ratio"):
        selective_search(np.zeros((10, 20000, 3), dtype=np.uint8))
    assert not (tmp_path / "cache").exists() or _cache_files(tmp_path / "cache") == []

    # In a batch, with skip_errors: the strip is skipped and counted, the others are searched.
    monkeypatch.undo()
    skipped = SkipCounter("images")
    with pytest.warns(DataWarning, match=r"skipping .*strip\.png: no proposals: image is 20000x10"):
        out = compute_proposals([image_files[0], strip], None, progress=False, skip_errors=True, skipped=skipped)
    assert len(out[0]) > 0 and out[1].shape == (0, 4)
    assert skipped.counts == {"too elongated": 1}


def test_search_pixel_bound_counts_the_downscaled_copy(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    _synthetic_image(400, 300).save(path)  # 120,000 pixels
    limits = ImageLimits(max_search_pixels=100_000)
    _no_search(monkeypatch)
    message = r"big\.png: no proposals: selective search on the 400x300 image = 120000 pixels exceeds the limit"
    with pytest.raises(ImageError, match=message + r" of 100000 .*--ss-resize-to or raise --max-search-pixels"):
        compute_proposals([path], None, progress=False, limits=limits)
    # A parameter set that searches a 200x150 copy is within the bound (30,000 pixels).
    assert check_search_limits(path, {"resize_to": 150}, limits) == (400, 300)
    with pytest.raises(ImageError, match=r"the 400x300 image at 200x150 = 30000 pixels exceeds the limit of 20000"):
        check_search_limits(path, {"resize_to": 150}, ImageLimits(max_search_pixels=20_000))
    monkeypatch.undo()
    boxes = compute_proposals([path], None, {"resize_to": 150}, progress=False, limits=limits)[0]
    _check_valid(boxes, 400, 300, min_size=16)


def test_raised_limits_reach_spawned_workers(tmp_path, monkeypatch):
    # Spawned workers do not inherit this process's settings; compute_proposals
    # sends them. A 600x24 strip (aspect ratio 25) needs --max-aspect-ratio 30: a
    # worker still at the default 20 would refuse it while decoding.
    path = tmp_path / "strip.png"
    _synthetic_image(600, 24, rects=[(10, 2, 200, 20)]).save(path)
    with pytest.raises(ImageError, match="aspect ratio 25.0 exceeds the limit of 20"):
        compute_proposals([path], None, progress=False)
    monkeypatch.setattr(limits_module, "_LIMITS", limits_module.get_image_limits())  # restored after the test
    limits_module.set_image_limits(max_aspect_ratio=30)
    boxes = compute_proposals([path, path], None, {"min_size": 4}, workers=2, progress=False)
    _check_valid(boxes[0], 600, 24, min_size=4)


# --------------------------------------------------------------------------- #
# Ground truth and sliding windows
# --------------------------------------------------------------------------- #


def test_add_ground_truth_prepends_and_deduplicates():
    gt = np.array([[0, 0, 9, 9], [5, 5, 20, 20], [0, 0, 9, 9]], dtype=np.float32)
    props = np.array([[1, 1, 8, 8], [5, 5, 20, 20], [1, 1, 8, 8], [30, 30, 40, 40]], dtype=np.float32)
    out = add_ground_truth(props, gt)
    expected = np.array(
        [[0, 0, 9, 9], [5, 5, 20, 20], [0, 0, 9, 9], [1, 1, 8, 8], [30, 30, 40, 40]],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(add_ground_truth(props[:0], gt[:1]), gt[:1])
    np.testing.assert_array_equal(add_ground_truth(props, np.zeros((0, 4))), props[[0, 1, 3]])
    with pytest.raises(ValueError, match=r"gt_boxes must have shape \[K, 4\], got \(2, 5\)"):
        add_ground_truth(props, np.zeros((2, 5)))


def test_sliding_window_proposals():
    boxes = sliding_window_proposals(100, 60, scales=(20, 40), aspect_ratios=(0.5, 1.0), stride_frac=0.5)
    _check_valid(boxes, 100, 60, min_size=1)
    # Square 20 px windows, stride 10: x starts 0..80 (9), y starts 0..40 (5).
    squares = boxes[(boxes[:, 2] - boxes[:, 0] == 19) & (boxes[:, 3] - boxes[:, 1] == 19)]
    assert len(squares) == 9 * 5
    np.testing.assert_array_equal(squares[0], [0, 0, 19, 19])
    np.testing.assert_array_equal(squares[-1], [80, 40, 99, 59])
    # A 40 px window with ratio 0.5 is 57 x 28; the last column is flush right.
    wide = boxes[(boxes[:, 2] - boxes[:, 0] == 56) & (boxes[:, 3] - boxes[:, 1] == 27)]
    assert wide[:, 2].max() == 99 and wide[:, 3].max() == 59
    # Every pixel is covered, and the result is reproducible.
    covered = np.zeros((60, 100), dtype=bool)
    for x1, y1, x2, y2 in boxes.astype(int):
        covered[y1 : y2 + 1, x1 : x2 + 1] = True
    assert covered.all()
    again = sliding_window_proposals(100, 60, (20, 40), (0.5, 1.0), 0.5)
    np.testing.assert_array_equal(boxes, again)

    # Windows larger than the image are clipped to it, then deduplicated.
    tiny = sliding_window_proposals(10, 8, scales=(50, 60), aspect_ratios=(1.0,))
    np.testing.assert_array_equal(tiny, [[0, 0, 9, 7]])

    with pytest.raises(ValueError, match="width must be a positive int, got 0"):
        sliding_window_proposals(0, 10)
    with pytest.raises(ValueError, match=r"stride_frac must be in \(0, 1\], got 1.5"):
        sliding_window_proposals(10, 10, stride_frac=1.5)
    with pytest.raises(ValueError, match=r"aspect_ratios must be non-empty and positive, got \(\)"):
        sliding_window_proposals(10, 10, aspect_ratios=())
