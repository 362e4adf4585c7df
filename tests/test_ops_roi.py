"""The window-level pyramid against cropping each window and looping over bins.

``op_path`` (conftest) runs tests with the numba kernels and with the pure
PyTorch fallbacks (sparse table for max, summed-area table for avg). The
kernel's cost model picks a scan or a sparse-table kernel; ``branch`` below
records which one ran so that both are covered on purpose.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ops_reference import roi_pyramid_ref

from sppnet.ops import RoISpatialPyramidPool, _kernels, roi_spatial_pyramid_pool, spatial_pyramid_pool

PAPER = (6, 3, 2, 1)


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_windows(n_img, height, width, count, seed=0, min_side=1, max_side=None):
    """``LongTensor[K, 5]`` of windows inside the map, sides in ``[min_side, max_side]``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        b = int(torch.randint(n_img, (1,), generator=g))
        hi_h = min(height, max_side or height)
        hi_w = min(width, max_side or width)
        h = int(torch.randint(min(min_side, hi_h), hi_h + 1, (1,), generator=g))
        w = int(torch.randint(min(min_side, hi_w), hi_w + 1, (1,), generator=g))
        y1 = int(torch.randint(height - h + 1, (1,), generator=g))
        x1 = int(torch.randint(width - w + 1, (1,), generator=g))
        rows.append([b, x1, y1, x1 + w - 1, y1 + h - 1])
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 5)


def special_windows(n_img, height, width):
    """One-cell windows in the corners, whole maps, rows, columns and duplicates."""
    rows = []
    for b in range(n_img):
        rows += [
            [b, 0, 0, 0, 0],
            [b, width - 1, height - 1, width - 1, height - 1],
            [b, 0, 0, width - 1, height - 1],
            [b, 0, 0, width - 1, height - 1],
            [b, 0, height - 1, width - 1, height - 1],
            [b, width - 1, 0, width - 1, height - 1],
        ]
    return torch.tensor(rows, dtype=torch.long)


KERNELS = {
    "scan_pyramid_max_forward": "scan",  # with argmax, when a gradient is needed
    "scan_pyramid_max_values": "scan-values",
    "roi_pyramid_max_forward": "table",
    "roi_pyramid_max_values": "table-values",
}


@pytest.fixture
def branch(monkeypatch):
    """Records which numba forward kernels ran (names in ``KERNELS``)."""
    ran = []
    if _kernels.HAVE_NUMBA:
        for name, label in KERNELS.items():
            real = getattr(_kernels, name)
            monkeypatch.setattr(_kernels, name, lambda *a, _real=real, _label=label: ran.append(_label) or _real(*a))
    return ran


def assert_matches(out, ref, mode):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if mode == "max":
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, equal_nan=True)


# ------------------------------------------------------------------ values


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (5, 5), (13, 17), (23, 9), (10, 10)], ids=str)
def test_matches_reference(op_path, mode, hw):
    feats = randn(2, 3, *hw)
    rois = torch.cat([special_windows(2, *hw), random_windows(2, *hw, count=25, seed=1)])
    out = roi_spatial_pyramid_pool(feats, rois, PAPER, mode)
    assert out.shape == (rois.shape[0], 3 * 50)
    assert_matches(out, roi_pyramid_ref(feats, rois, PAPER, mode), mode)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("levels", [(1, 2, 3, 6), (5, 3, 1), (4, 2), (2, 2, 1), (6, 3, 6, 1), (7,), 1], ids=str)
def test_level_orders_and_derived_levels(op_path, mode, levels):
    feats = randn(1, 2, 15, 12, seed=2)
    rois = random_windows(1, 15, 12, count=20, seed=3)
    lv = (levels,) if isinstance(levels, int) else levels
    assert_matches(roi_spatial_pyramid_pool(feats, rois, levels, mode), roi_pyramid_ref(feats, rois, lv, mode), mode)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_whole_map_window_equals_image_level_pyramid(op_path, mode):
    feats = randn(3, 4, 11, 14, seed=4)
    rois = torch.tensor([[b, 0, 0, 13, 10] for b in (2, 0, 1)])
    out = roi_spatial_pyramid_pool(feats, rois, PAPER, mode)
    assert_matches(out, spatial_pyramid_pool(feats, PAPER, mode)[[2, 0, 1]], mode)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_one_cell_window_repeats_the_cell(op_path, mode):
    feats = randn(2, 3, 6, 8, seed=5)
    out = roi_spatial_pyramid_pool(feats, torch.tensor([[1, 5, 2, 5, 2]]), PAPER, mode)
    cell = feats[1, :, 2, 5]  # [C]
    expected = torch.cat([cell.repeat_interleave(n * n) for n in PAPER])
    assert_matches(out[0], expected, mode)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_many_duplicate_windows(op_path, mode):
    feats = randn(1, 4, 20, 20, seed=6)
    one = torch.tensor([[0, 3, 4, 17, 12]])
    out = roi_spatial_pyramid_pool(feats, one.repeat(200, 1), PAPER, mode)
    ref = roi_pyramid_ref(feats, one, PAPER, mode)
    assert_matches(out, ref.expand(200, -1), mode)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_batched_equals_one_image_at_a_time(op_path, mode):
    feats = randn(3, 4, 9, 12, seed=7)
    rois = random_windows(3, 9, 12, count=30, seed=8)
    out = roi_spatial_pyramid_pool(feats, rois, PAPER, mode)
    for b in range(3):
        mine = rois[:, 0] == b
        single = rois[mine].clone()
        single[:, 0] = 0
        assert_matches(out[mine], roi_spatial_pyramid_pool(feats[b : b + 1], single, PAPER, mode), mode)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_list_form_equals_tensor_form(op_path, mode):
    feats = randn(2, 3, 10, 7, seed=9)
    boxes = [random_windows(1, 10, 7, count=6, seed=10)[:, 1:], random_windows(1, 10, 7, count=4, seed=11)[:, 1:]]
    as_tensor = torch.cat([torch.cat([torch.full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)])
    out = roi_spatial_pyramid_pool(feats, boxes, PAPER, mode)
    assert_matches(out, roi_spatial_pyramid_pool(feats, as_tensor, PAPER, mode), mode)
    assert_matches(out, roi_pyramid_ref(feats, as_tensor, PAPER, mode), mode)


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.int16, torch.float16, torch.float32, torch.float64], ids=str
)
def test_rois_in_any_numeric_dtype(dtype):
    feats = randn(2, 2, 9, 9, seed=12)
    rois = random_windows(2, 9, 9, count=10, seed=13)
    out = roi_spatial_pyramid_pool(feats, rois.to(dtype))
    assert_matches(out, roi_pyramid_ref(feats, rois, PAPER), "max")
    out_list = roi_spatial_pyramid_pool(feats, [rois[rois[:, 0] == b, 1:].to(dtype) for b in range(2)])
    assert out_list.shape == out.shape


def test_list_form_mixing_integer_and_float_rois():
    feats = randn(2, 2, 9, 9, seed=12)
    rois = random_windows(2, 9, 9, count=10, seed=13)
    per_image = [rois[rois[:, 0] == b, 1:] for b in range(2)]
    out = roi_spatial_pyramid_pool(feats, [per_image[0], per_image[1].double()])
    in_list_order = torch.cat([rois[rois[:, 0] == b] for b in range(2)])  # image 0's windows first
    assert_matches(out, roi_pyramid_ref(feats, in_list_order, PAPER), "max")
    fractional = per_image[1].double()
    fractional[0, 0] += 0.5
    with pytest.raises(ValueError, match="whole feature-map cells"):
        roi_spatial_pyramid_pool(feats, [per_image[0], fractional])


@pytest.mark.parametrize("case", ["few", "many"])
def test_channels_last_features_backpropagate_like_contiguous_ones(op_path, case):
    # a feature cache keeps its maps channels-last; values and gradients must not depend on the layout
    feats, rois = few_windows() if case == "few" else many_windows()
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        x = feats.clone().contiguous(memory_format=layout).requires_grad_()
        out = roi_spatial_pyramid_pool(x, rois, PAPER)
        assert_matches(out.detach(), roi_pyramid_ref(feats, rois, PAPER), "max")
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_zero_windows(op_path, mode):
    feats = randn(2, 3, 5, 5, dtype=torch.float32, seed=14).requires_grad_()
    for rois in (torch.zeros((0, 5)), torch.zeros((0, 5), dtype=torch.long), [torch.zeros((0, 4))] * 2):
        out = roi_spatial_pyramid_pool(feats, rois, PAPER, mode)
        assert out.shape == (0, 3 * 50) and out.dtype == torch.float32
    out.sum().backward()  # an empty result still backpropagates (zeros)
    assert feats.grad is None or not feats.grad.any()


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("view", ["transposed", "channel_slice", "channels_last"])
def test_non_contiguous_features(op_path, mode, view):
    base = randn(2, 6, 11, 8, seed=15)
    feats = {
        "transposed": base.transpose(2, 3),
        "channel_slice": base[:, 1::2],
        "channels_last": base.contiguous(memory_format=torch.channels_last),
    }[view]
    assert not feats.is_contiguous()
    rois = random_windows(2, feats.shape[2], feats.shape[3], count=12, seed=16)
    out = roi_spatial_pyramid_pool(feats, rois, PAPER, mode)
    assert_matches(out, roi_pyramid_ref(feats.contiguous(), rois, PAPER, mode), mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_low_precision_dtypes(op_path, dtype, mode):
    feats = randn(2, 3, 12, 9, dtype=torch.float32, seed=17).to(dtype)
    rois = torch.cat([special_windows(2, 12, 9), random_windows(2, 12, 9, count=15, seed=18)])
    out = roi_spatial_pyramid_pool(feats, rois, PAPER, mode)
    assert out.dtype == dtype
    ref = roi_pyramid_ref(feats.float(), rois, PAPER, mode)
    if mode == "max":
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=0)
    else:
        tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


# ------------------------------------------------------------------ the kernel's cost model


def few_windows():
    """Three windows on a 20x20 map: scanning them beats building a sparse table."""
    return randn(2, 3, 20, 20, seed=19), torch.tensor([[0, 0, 0, 19, 19], [1, 2, 3, 9, 15], [1, 4, 4, 4, 4]])


def many_windows():
    """80 big windows on the same map: the sparse table pays off."""
    return randn(2, 3, 20, 20, seed=19), random_windows(2, 20, 20, count=80, seed=20, min_side=14)


@pytest.mark.parametrize("case,expected", [(few_windows, "scan"), (many_windows, "table")], ids=["scan", "table"])
def test_both_kernel_branches_and_fallback_match_reference(case, expected, branch, monkeypatch):
    # Each branch has a values-only kernel (no gradient needed) and one that also
    # keeps the argmax for backward; all four and the PyTorch fallback must agree.
    if not _kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    feats, rois = case()
    ref = roi_pyramid_ref(feats, rois, PAPER)
    assert_matches(roi_spatial_pyramid_pool(feats, rois, PAPER), ref, "max")
    assert branch == [f"{expected}-values"]
    out = roi_spatial_pyramid_pool(feats.clone().requires_grad_(), rois, PAPER)
    assert branch == [f"{expected}-values", expected]
    assert_matches(out.detach(), ref, "max")
    monkeypatch.setattr(_kernels, "HAVE_NUMBA", False)
    assert_matches(roi_spatial_pyramid_pool(feats, rois, PAPER), ref, "max")
    assert len(branch) == 2  # the fallback does not touch the kernels


# ------------------------------------------------------------------ gradients


def small_few():
    rois = torch.tensor([[0, 0, 0, 6, 5], [1, 1, 2, 4, 3], [1, 3, 3, 3, 3], [0, 0, 0, 6, 5]])
    return randn(2, 2, 6, 7, seed=21), rois


def small_many():
    """Enough windows of a single coarse level for the cost model to build a table."""
    return randn(1, 1, 8, 8, seed=22), random_windows(1, 8, 8, count=40, seed=23, min_side=6)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize(
    "case,levels,kernel", [(small_few, PAPER, "scan"), (small_many, (2, 1), "table")], ids=["few", "many"]
)
def test_gradcheck_float64(op_path, mode, case, levels, kernel, branch):
    feats, rois = case()
    feats.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f: roi_spatial_pyramid_pool(f, rois, levels, mode), (feats,), eps=1e-6, atol=1e-6, fast_mode=True
    )
    if op_path == "kernel" and mode == "max":
        assert kernel in branch and set(branch) <= {kernel, f"{kernel}-values"}
    else:
        assert branch == []


@pytest.mark.parametrize("case", [few_windows, many_windows], ids=["scan", "table"])
def test_max_backward_equals_reference_backward(op_path, case):
    feats, rois = case()
    feats.requires_grad_()
    feats_ref = feats.detach().clone().requires_grad_()
    grad = randn(rois.shape[0], 3 * 50, seed=24)
    out, ref = roi_spatial_pyramid_pool(feats, rois, PAPER), roi_pyramid_ref(feats_ref, rois, PAPER)
    assert_matches(out.detach(), ref.detach(), "max")  # the forward that keeps argmax
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(feats.grad, feats_ref.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("count,kernel", [(3, "scan"), (60, "table")])
def test_max_backward_on_a_map_of_more_than_32767_cells(count, kernel, branch):
    # The kernels keep the argmax as a cell index: int16 while H*W fits, int32
    # beyond (here 200 x 170 = 34,000 cells); both must route the gradient.
    if not _kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    feats = randn(1, 2, 200, 170, seed=31)
    rois = torch.cat([special_windows(1, 200, 170), random_windows(1, 200, 170, count=count, seed=32, min_side=150)])
    feats.requires_grad_()
    feats_ref = feats.detach().clone().requires_grad_()
    grad = randn(rois.shape[0], 2 * 50, seed=33)
    out, ref = roi_spatial_pyramid_pool(feats, rois, PAPER), roi_pyramid_ref(feats_ref, rois, PAPER)
    assert_matches(out.detach(), ref.detach(), "max")
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(feats.grad, feats_ref.grad, rtol=1e-10, atol=1e-10)
    assert kernel in branch


# ------------------------------------------------------------------ non-finite values


@pytest.mark.parametrize("case", [few_windows, many_windows], ids=["few", "many"])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_non_finite_values_propagate_like_torch_pooling(op_path, mode, case):
    # Each window's pyramid equals torch's adaptive pooling of the window's crop,
    # NaN and inf included: they reach only the bins that hold them.
    feats, rois = case()
    feats = feats.float()
    feats[0, 0, 3, 4] = float("nan")
    feats[0, 1, 10, 10] = float("inf")
    feats[0, 1, 12, 12] = float("-inf")
    feats[1, 2, 0, 0] = float("-inf")
    feats[1, 0, 19, 19] = float("nan")
    out = roi_spatial_pyramid_pool(feats, rois, PAPER, mode)
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    expected = torch.stack(
        [
            torch.cat([pool(feats[b : b + 1, :, y1 : y2 + 1, x1 : x2 + 1], n).flatten() for n in PAPER])
            for b, x1, y1, x2, y2 in rois.tolist()
        ]
    )
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert out.isnan().any() and not out.isnan().all()


# ------------------------------------------------------------------ bad input

FEATS = torch.randn(2, 3, 10, 12)


@pytest.mark.parametrize(
    "rois,match",
    [
        (torch.tensor([[0, 1, 2, 3]]), r"Tensor\[K, 5\].*got shape \(1, 4\)"),
        (torch.zeros(5), r"got shape \(5,\)"),
        (torch.tensor([[0, 5, 1, 4, 2]]), r"x1 <= x2 and y1 <= y2, got row 0 = \[0, 5, 1, 4, 2\]"),
        (torch.tensor([[0, 0, 0, 1, 1], [1, 1, 6, 2, 5]]), r"x1 <= x2 and y1 <= y2, got row 1 = \[1, 1, 6, 2, 5\]"),
        (torch.tensor([[0, 0, 0, 12, 3]]), r"lie in the 10x12 map, got row 0 = \[0, 0, 0, 12, 3\]"),
        (torch.tensor([[0, 0, 0, 3, 10]]), r"lie in the 10x12 map, got row 0 = \[0, 0, 0, 3, 10\]"),
        (torch.tensor([[1, -1, 0, 3, 3]]), r"lie in the 10x12 map, got row 0 = \[1, -1, 0, 3, 3\]"),
        (torch.tensor([[2, 0, 0, 3, 3]]), r"batch index must be in \[0, 2\), got row 0 = \[2, 0, 0, 3, 3\]"),
        (torch.tensor([[-1, 0, 0, 3, 3]]), r"batch index must be in \[0, 2\), got row 0 = \[-1, 0, 0, 3, 3\]"),
        (torch.tensor([[0, 0, 0, 3, float("nan")]]), r"finite, got row 0 = \[0.0, 0.0, 0.0, 3.0, nan\]"),
        (torch.tensor([[0, 0, 0, float("inf"), 3]]), r"finite, got row 0 = \[0.0, 0.0, 0.0, inf, 3.0\]"),
        (torch.tensor([[0, 0.5, 0, 3, 3]]), r"whole feature-map cells.*got row 0 = \[0.0, 0.5, 0.0, 3.0, 3.0\]"),
        ([torch.zeros(1, 4)], r"one Tensor\[L_i, 4\] per image: got 1 for 2 images"),
        ([torch.zeros(1, 4)] * 3, r"got 3 for 2 images"),
        ([torch.zeros(1, 4), torch.zeros(1, 5)], r"rois\[1\] must be Tensor\[L, 4\].*got shape \(1, 5\)"),
        ([torch.zeros(1, 4), torch.tensor([[0, 0, 12, 0]])], r"got row 1 = \[1, 0, 0, 12, 0\]"),
        ({"boxes": 1}, r"got dict"),
    ],
    ids=lambda v: None if isinstance(v, str) else str(v).replace("\n", "")[:40],
)
def test_bad_rois_raise_value_error(rois, match):
    with pytest.raises(ValueError, match=match):
        roi_spatial_pyramid_pool(FEATS, rois)


@pytest.mark.parametrize(
    "feats,match",
    [
        (torch.randn(3, 10, 12), r"4 dims\), got \(3, 10, 12\)"),
        (torch.zeros(2, 3, 10, 12, dtype=torch.int32), r"floating-point.*torch.int32"),
        (None, r"got NoneType"),
    ],
    ids=["rank3", "int", "none"],
)
def test_bad_features_raise_value_error(feats, match):
    with pytest.raises(ValueError, match=match):
        roi_spatial_pyramid_pool(feats, torch.tensor([[0, 0, 0, 1, 1]]))


def test_bad_levels_and_mode_raise_value_error():
    rois = torch.tensor([[0, 0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"got \(6, 0, 1\)"):
        roi_spatial_pyramid_pool(FEATS, rois, (6, 0, 1))
    with pytest.raises(ValueError, match=r"must not be empty"):
        roi_spatial_pyramid_pool(FEATS, rois, [])
    with pytest.raises(ValueError, match=r"got 'median'"):
        roi_spatial_pyramid_pool(FEATS, rois, mode="median")
    with pytest.raises(ValueError, match=r"got 'median'"):
        RoISpatialPyramidPool(mode="median")


# ------------------------------------------------------------------ module form


def test_module_form():
    pool = RoISpatialPyramidPool((1, 2, 3, 6))
    assert pool.num_bins == 50 and pool.output_dim(256) == 12_800
    text = repr(pool)
    for part in ["RoISpatialPyramidPool(", "levels=(1, 2, 3, 6)", "mode='max'", "num_bins=50"]:
        assert part in text
    feats = randn(2, 3, 9, 9, seed=25)
    rois = random_windows(2, 9, 9, count=8, seed=26)
    out = pool(feats, rois)
    assert out.shape == (8, pool.output_dim(3))
    assert_matches(out, roi_pyramid_ref(feats, rois, (1, 2, 3, 6)), "max")
