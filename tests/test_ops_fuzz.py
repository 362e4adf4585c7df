"""Property-based tests (Hypothesis) of the operators against the brute-force references.

Issue 7: random N, C, H, W (including 1), random levels, random windows
(one cell, the whole map, duplicates), float32 / float64, max and avg; plus the
invariants of the pyramid. Examples are few and small so that the whole file
stays well under a minute; the numba kernels and the PyTorch fallbacks are both
drawn.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ops_reference import map_box_ref, pyramid_ref, roi_pyramid_ref

from sppnet.ops import (
    _kernels,
    map_boxes_to_features,
    pyramid_output_dim,
    roi_spatial_pyramid_pool,
    spatial_pyramid_pool,
)

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure is reproducible
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

levels_st = st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple)
dtype_st = st.sampled_from([torch.float32, torch.float64])
mode_st = st.sampled_from(["max", "avg"])
seed_st = st.integers(0, 2**31 - 1)


def features(n, c, h, w, dtype, seed):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


HAVE_NUMBA = _kernels.HAVE_NUMBA  # read once: the flag is patched per example below


def use_kernels(monkeypatch, on: bool):
    """Numba kernels (where they apply) or the pure-PyTorch fallbacks."""
    monkeypatch.setattr(_kernels, "HAVE_NUMBA", HAVE_NUMBA and on)


def close(out, ref, mode, dtype):
    if mode == "max":
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    else:
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@st.composite
def windows(draw, n_img, height, width):
    """Windows as ``[b, x1, y1, x2, y2]`` rows: random ones, one-cell ones, whole maps, duplicates."""
    rows = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["random", "cell", "whole"]))
        b = draw(st.integers(0, n_img - 1))
        if kind == "whole":
            rows.append([b, 0, 0, width - 1, height - 1])
            continue
        x1 = draw(st.integers(0, width - 1))
        y1 = draw(st.integers(0, height - 1))
        if kind == "cell":
            rows.append([b, x1, y1, x1, y1])
        else:
            rows.append([b, x1, y1, draw(st.integers(x1, width - 1)), draw(st.integers(y1, height - 1))])
    if rows and draw(st.booleans()):
        rows += [rows[0]] * draw(st.integers(1, 5))
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 5)


@FUZZ
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 3),
    h=st.integers(1, 16),
    w=st.integers(1, 16),
    levels=levels_st,
    mode=mode_st,
    dtype=dtype_st,
    kernels=st.booleans(),
    seed=seed_st,
)
def test_image_level_matches_reference(monkeypatch, n, c, h, w, levels, mode, dtype, kernels, seed):
    use_kernels(monkeypatch, kernels)
    x = features(n, c, h, w, dtype, seed)
    out = spatial_pyramid_pool(x, levels, mode)
    # invariant: the width depends on C and the levels only, never on H, W
    assert out.shape == (n, pyramid_output_dim(c, levels))
    close(out, pyramid_ref(x, levels, mode), mode, dtype)
    if mode == "max" and 1 in levels:
        # invariant: the 1x1 level is the global max of each channel
        start = c * sum(m * m for m in levels[: levels.index(1)])
        assert torch.equal(out[:, start : start + c], x.amax(dim=(2, 3)))


@FUZZ
@given(
    data=st.data(),
    n=st.integers(1, 3),
    c=st.integers(1, 3),
    h=st.integers(1, 14),
    w=st.integers(1, 14),
    levels=levels_st,
    mode=mode_st,
    dtype=dtype_st,
    kernels=st.booleans(),
    seed=seed_st,
)
def test_window_level_matches_reference(monkeypatch, data, n, c, h, w, levels, mode, dtype, kernels, seed):
    use_kernels(monkeypatch, kernels)
    x = features(n, c, h, w, dtype, seed)
    rois = data.draw(windows(n, h, w))
    out = roi_spatial_pyramid_pool(x, rois, levels, mode)
    assert out.shape == (rois.shape[0], pyramid_output_dim(c, levels))
    close(out, roi_pyramid_ref(x, rois, levels, mode), mode, dtype)
    if mode == "max" and 1 in levels and rois.shape[0]:
        # invariant: the 1x1 level of a window is the window's max
        start = c * sum(m * m for m in levels[: levels.index(1)])
        for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
            assert torch.equal(out[k, start : start + c], x[b, :, y1 : y2 + 1, x1 : x2 + 1].amax(dim=(1, 2)))


@settings(FUZZ, max_examples=40)
@given(
    data=st.data(),
    c=st.integers(1, 3),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    levels=levels_st,
    kernels=st.booleans(),
    seed=seed_st,
)
def test_max_gradients_match_reference(monkeypatch, data, c, h, w, levels, kernels, seed):
    # With a gradient the kernels keep the argmax (a different kernel than the
    # values-only forward); continuous random data has no ties.
    use_kernels(monkeypatch, kernels)
    x = features(2, c, h, w, torch.float64, seed).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    rois = data.draw(windows(2, h, w))
    grad = features(1, 1, rois.shape[0], pyramid_output_dim(c, levels), torch.float64, seed + 1)[0, 0]
    out, ref = roi_spatial_pyramid_pool(x, rois, levels), roi_pyramid_ref(x_ref, rois, levels)
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=0, atol=0)
    if rois.shape[0]:
        out.backward(grad)
        ref.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    xi, xi_ref = (x.detach().clone().requires_grad_() for _ in range(2))
    image, image_ref = spatial_pyramid_pool(xi, levels), pyramid_ref(xi_ref, levels)
    torch.testing.assert_close(image.detach(), image_ref.detach(), rtol=0, atol=0)
    grad = features(1, 1, 2, pyramid_output_dim(c, levels), torch.float64, seed + 2)[0, 0]
    image.backward(grad)
    image_ref.backward(grad)
    torch.testing.assert_close(xi.grad, xi_ref.grad, rtol=1e-12, atol=1e-12)


@FUZZ
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 4),
    h=st.integers(1, 20),
    w=st.integers(1, 20),
    levels=levels_st,
    mode=mode_st,
    dtype=dtype_st,
    kernels=st.booleans(),
    seed=seed_st,
)
def test_whole_map_window_equals_image_level(monkeypatch, n, c, h, w, levels, mode, dtype, kernels, seed):
    use_kernels(monkeypatch, kernels)
    x = features(n, c, h, w, dtype, seed)
    whole = [torch.tensor([[0, 0, w - 1, h - 1]])] * n
    close(roi_spatial_pyramid_pool(x, whole, levels, mode), spatial_pyramid_pool(x, levels, mode), mode, dtype)


@FUZZ
@given(
    h1=st.integers(1, 30),
    w1=st.integers(1, 30),
    h2=st.integers(1, 30),
    w2=st.integers(1, 30),
    levels=levels_st,
    mode=mode_st,
    bins=st.sampled_from(["adaptive", "sliding"]),
)
def test_output_width_is_independent_of_the_map_size(h1, w1, h2, w2, levels, mode, bins):
    widths = set()
    for h, w in ((h1, w1), (h2, w2)):
        try:
            widths.add(spatial_pyramid_pool(torch.randn(1, 3, h, w), levels, mode, bins).shape)
        except ValueError as err:
            # only the Sec. 2.3 rule may refuse a size, and it says why
            assert bins == "sliding" and "bins='sliding'" in str(err)
    assert widths <= {torch.Size([1, pyramid_output_dim(3, levels)])}


finite = st.floats(-400, 1200, allow_nan=False, allow_infinity=False)


@FUZZ
@given(
    boxes=st.lists(st.tuples(finite, finite, st.floats(0, 500), st.floats(0, 500)), min_size=0, max_size=20),
    stride=st.sampled_from([1, 4, 8, 12, 16, 32]) | st.floats(0.5, 40),
    offset=st.floats(-30, 30) | st.sampled_from([0.0, 0.5, 20.5]),
    feature_size=st.none() | st.tuples(st.integers(1, 80), st.integers(1, 80)),
)
def test_mapping_matches_reference(boxes, stride, offset, feature_size):
    t = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in boxes], dtype=torch.float64).reshape(-1, 4)
    out = map_boxes_to_features(t, stride, offset, feature_size)
    assert out.dtype == torch.int64 and out.shape == t.shape
    assert out.tolist() == [map_box_ref(b, stride, offset, feature_size) for b in t.tolist()]
    assert (out[:, 0] <= out[:, 2]).all() and (out[:, 1] <= out[:, 3]).all()
    if feature_size is not None:
        fh, fw = feature_size
        assert (out[:, 0::2] >= 0).all() and (out[:, 0::2] < fw).all()
        assert (out[:, 1::2] >= 0).all() and (out[:, 1::2] < fh).all()
        # the mapped windows are always valid input for the window-level pyramid
        pooled = roi_spatial_pyramid_pool(torch.randn(1, 1, fh, fw), [out], (2, 1))
        assert pooled.shape == (len(boxes), 5) and math.isfinite(float(pooled.sum()))


@pytest.mark.parametrize("mode", ["max", "avg"])
@settings(FUZZ, max_examples=40)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    seed=seed_st,
    special=st.lists(st.sampled_from([float("nan"), float("inf"), float("-inf")]), min_size=1, max_size=4),
)
def test_non_finite_values_stay_in_their_bins(monkeypatch, mode, h, w, seed, special):
    # Same rule as torch's adaptive pooling of each window's crop (issue 7).
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, h, w, generator=g)
    for v in special:
        c, y, col = (int(torch.randint(size, (1,), generator=g)) for size in (2, h, w))
        x[0, c, y, col] = v
    rois = torch.tensor([[0, 0, 0, w - 1, h - 1], [0, w // 2, h // 2, w - 1, h - 1], [0, 0, 0, w // 2, h // 2]])
    pool = torch.nn.functional.adaptive_max_pool2d if mode == "max" else torch.nn.functional.adaptive_avg_pool2d
    expected = torch.stack(
        [
            torch.cat([pool(x[:, :, y1 : y2 + 1, x1 : x2 + 1], n).flatten() for n in (3, 2, 1)])
            for _, x1, y1, x2, y2 in rois.tolist()
        ]
    )
    for kernels in (True, False):
        use_kernels(monkeypatch, kernels)
        out = roi_spatial_pyramid_pool(x, rois, (3, 2, 1), mode)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
        image = spatial_pyramid_pool(x, (3, 2, 1), mode)
        torch.testing.assert_close(image, expected[:1], rtol=1e-6, atol=1e-6, equal_nan=True)
