"""The image-level SPP layer against a brute-force loop over bins (SPP-net Sec. 2.2, 2.3 and Appendix).

Four implementations are checked, selected by the ``path`` fixture:
``kernel`` (numba, as the library picks it for CPU float32/float64 max: the
per-plane kernel for these small batches), ``kernel-scan`` (the channels-last
numba kernel used for big batches of small maps), ``torch`` (pure PyTorch, as
without numba) and ``export`` (the mask formulation used while tracing or
exporting, run eagerly here).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ops_reference import appendix_bins, pyramid_ref, sliding_bins, usual_pyramid

import sppnet.ops.spp as spp_module
from sppnet.ops import SpatialPyramidPool, _kernels, pyramid_output_dim, spatial_pyramid_pool

PAPER = (6, 3, 2, 1)
# maps smaller than the finest level, H != W, odd sizes, and one above the kernel's 32x32 limit
SHAPES = [(1, 1), (2, 3), (3, 2), (5, 5), (7, 4), (4, 7), (6, 6), (10, 10), (13, 13), (13, 17), (23, 9), (1, 9)]
SHAPES += [(12, 1), (33, 40)]


@pytest.fixture(params=["kernel", "kernel-scan", "torch", "export"])
def path(request, monkeypatch):
    # "kernel": the choice the library makes (mostly the per-plane kernel for
    # these small batches); "kernel-scan": the channels-last scan kernel forced.
    if request.param.startswith("kernel") and not _kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    if request.param == "kernel-scan":
        monkeypatch.setattr(spp_module, "_use_planes", lambda n_img, height, width: False)
    if request.param == "torch":
        monkeypatch.setattr(_kernels, "HAVE_NUMBA", False)
    if request.param == "export":
        monkeypatch.setattr(spp_module, "_is_exporting", lambda: True)
    return request.param


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_matches(out, ref, mode):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if mode == "max":
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, equal_nan=True)


# ------------------------------------------------------------------ the bins themselves


def test_reference_bins_are_the_appendix_and_sec_2_3_bins():
    # Hand-worked: 13 cells, 6 bins (ZF-5 conv5 at 224): kernel 3, stride 2.
    assert appendix_bins(13, 6) == [(0, 3), (2, 5), (4, 7), (6, 9), (8, 11), (10, 13)]
    # 10 cells, 6 bins (the 180-px network): uneven bins, every cell covered.
    assert appendix_bins(10, 6) == [(0, 2), (1, 4), (3, 5), (5, 7), (6, 9), (8, 10)]
    # fewer cells than bins: cells repeat, no bin is empty.
    assert appendix_bins(2, 6) == [(0, 1), (0, 1), (0, 1), (1, 2), (1, 2), (1, 2)]
    # Sec. 2.3 on 10 cells, 4 bins: window 3, stride 2 -- the last cell is never read.
    assert sliding_bins(10, 4) == [(0, 3), (2, 5), (4, 7), (6, 9)]


# ------------------------------------------------------------------ adaptive bins


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("hw", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_adaptive_matches_reference(path, mode, hw):
    x = randn(2, 3, *hw)
    out = spatial_pyramid_pool(x, PAPER, mode)
    assert out.shape == (2, 3 * 50)
    assert_matches(out, pyramid_ref(x, PAPER, mode), mode)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize(
    "levels", [(1, 2, 3, 6), (5, 3, 1), (4, 2), (2, 2, 1), (6, 3, 6, 1), (3,), 1, (7, 5, 2), (4, 8, 2)], ids=str
)
def test_level_orders_and_derived_levels(path, mode, levels):
    # Coarse levels that divide a finer one are derived from its bins (max);
    # the order of the output follows `levels` whatever the processing order.
    x = randn(2, 3, 13, 11, seed=1)
    out = spatial_pyramid_pool(x, levels, mode)
    lv = (levels,) if isinstance(levels, int) else levels
    assert_matches(out, pyramid_ref(x, lv, mode), mode)


def test_layout_is_channel_major_per_level(path):
    # x[c, y, x] = 100c + 10y + x grows along both axes, so every max bin takes the
    # value of its bottom-right cell: an explicit check of index c*n*n + y*n + x.
    chans, h, w = 3, 4, 6
    c, y, xx = torch.meshgrid(torch.arange(chans), torch.arange(h), torch.arange(w), indexing="ij")
    x = (100 * c + 10 * y + xx).to(torch.float32)[None]
    out = spatial_pyramid_pool(x, (1, 2), "max")[0]
    assert out.shape == (chans * (1 + 4),)
    for ch in range(chans):
        assert out[ch] == 100 * ch + 10 * (h - 1) + (w - 1)  # level 1 first: C * 1 entries
        for i in range(2):
            for j in range(2):
                # level 2 starts after the C entries of level 1; bin (i, j) of 2 on
                # 4 rows x 6 cols ends at row 2i+1, column 3j+2
                assert out[chans + ch * 4 + i * 2 + j] == 100 * ch + 10 * (2 * i + 1) + (3 * j + 2)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_batched_equals_one_image_at_a_time(path, mode):
    x = randn(4, 5, 9, 14, seed=2)
    out = spatial_pyramid_pool(x, PAPER, mode)
    for i in range(4):
        assert_matches(out[i : i + 1], spatial_pyramid_pool(x[i : i + 1], PAPER, mode), mode)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("view", ["transposed", "channel_slice", "spatial_slice", "channels_last", "expanded"])
def test_non_contiguous_input(path, mode, view):
    base = randn(2, 6, 11, 8, seed=3)
    if view == "transposed":
        x = base.transpose(2, 3)  # [2, 6, 8, 11]
    elif view == "channel_slice":
        x = base[:, ::2]
    elif view == "spatial_slice":
        x = base[:, :, 1::2, ::3]
    elif view == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    else:
        x = base[:1].expand(3, -1, -1, -1)
    assert not x.is_contiguous()
    assert_matches(spatial_pyramid_pool(x, PAPER, mode), pyramid_ref(x.contiguous(), PAPER, mode), mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_low_precision_dtypes(path, dtype, mode):
    # The reference runs in float32 on the same (rounded) values: max must be
    # exact, avg within the rounding of the output dtype.
    x = randn(2, 4, 10, 13, dtype=torch.float32, seed=4).to(dtype)
    out = spatial_pyramid_pool(x, PAPER, mode)
    assert out.dtype == dtype
    ref = pyramid_ref(x.float(), PAPER, mode)
    if mode == "max":
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=0)
    else:
        tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("shape", [(2, 2, 5, 7), (1, 1, 13, 13), (2, 1, 2, 3)], ids=lambda s: "x".join(map(str, s)))
def test_gradcheck_float64(path, mode, shape):
    # 2x3 and 5x7 are smaller than the finest level: cells repeat across bins and
    # their gradients must add up.
    # fast_mode (random vector-Jacobian products) keeps the bigger cases quick.
    x = randn(*shape, seed=5).requires_grad_()
    fast = x.numel() > 20
    assert torch.autograd.gradcheck(
        lambda t: spatial_pyramid_pool(t, PAPER, mode), (x,), eps=1e-6, atol=1e-6, fast_mode=fast
    )


@pytest.mark.parametrize("hw", [(13, 17), (5, 5), (1, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_max_backward_equals_reference_backward(path, hw):
    x = randn(3, 4, *hw, seed=6).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grad = randn(3, 4 * 50, seed=7)
    out, ref = spatial_pyramid_pool(x, PAPER, "max"), pyramid_ref(x_ref, PAPER, "max")
    assert_matches(out.detach(), ref.detach(), "max")  # the forward that keeps argmax
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


def test_max_backward_on_a_map_of_more_than_32767_cells():
    # The per-plane kernel keeps the argmax in int32 beyond 32,767 cells (200 x 170).
    if not _kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    x = randn(1, 2, 200, 170, seed=8).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grad = randn(1, 2 * 50, seed=9)
    out, ref = spatial_pyramid_pool(x, PAPER, "max"), pyramid_ref(x_ref, PAPER, "max")
    assert_matches(out.detach(), ref.detach(), "max")
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ non-finite values


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_non_finite_values_propagate_like_torch_pooling(path, mode):
    # Issue 7: NaN and inf propagate as torch's own adaptive pooling does --
    # only into the bins that hold them (max: NaN wins; avg: NaN, or +inf and -inf
    # together, give NaN).
    x = randn(2, 3, 11, 13, dtype=torch.float32, seed=8)
    x[0, 0, 2, 3] = float("nan")
    x[0, 1, 7, 7] = float("inf")
    x[0, 1, 8, 8] = float("-inf")
    x[1, 2, 0, 0] = float("-inf")
    x[1, 2, 10, 12] = float("nan")
    out = spatial_pyramid_pool(x, PAPER, mode)
    expected = usual_pyramid(x, PAPER, mode)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert out.isnan().any() and not out.isnan().all()  # the NaNs stay local


# ------------------------------------------------------------------ sliding bins (Sec. 2.3)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize(
    "hw,levels",
    [((13, 13), PAPER), ((12, 8), (4, 2, 1)), ((10, 10), (4,)), ((9, 11), (3, 1)), ((6, 6), (6, 3, 2, 1))],
    ids=str,
)
def test_sliding_matches_reference(path, mode, hw, levels):
    x = randn(2, 3, *hw, seed=9)
    out = spatial_pyramid_pool(x, levels, mode, bins="sliding")
    assert_matches(out, pyramid_ref(x, levels, mode, bins="sliding"), mode)


def test_sliding_differs_from_adaptive_where_the_paper_says():
    # 10 cells, 4 bins: window 3, stride 2 never reads the last column/row.
    x = torch.zeros(1, 1, 10, 10)
    x[0, 0, 9, 9] = 1.0
    assert spatial_pyramid_pool(x, 4, bins="sliding").max() == 0
    assert spatial_pyramid_pool(x, 4, bins="adaptive").max() == 1


@pytest.mark.parametrize(
    "hw,n,a,count",
    [((10, 10), 6, 10, 9), ((7, 4), 4, 7, 6), ((5, 5), 3, 5, 4), ((13, 10), 6, 10, 9)],
    ids=str,
)
def test_sliding_raises_where_the_rule_does_not_give_n_bins(hw, n, a, count):
    # The paper's own 180-px network: conv5 10x10 and n=6 gives 9 bins.
    x = torch.randn(1, 2, *hw)
    with pytest.raises(ValueError) as err:
        spatial_pyramid_pool(x, (n, 1), bins="sliding")
    msg = str(err.value)
    assert f"a={a}" in msg and f"n={n}" in msg and f"{count} bins" in msg


def test_sliding_raises_when_the_map_is_smaller_than_the_level():
    with pytest.raises(ValueError, match=r"a=2 < n=6"):
        spatial_pyramid_pool(torch.randn(1, 1, 2, 3), PAPER, bins="sliding")


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(3, 5, 5), r"4 dims\), got shape \(3, 5, 5\)"),
        (torch.randn(1, 1, 3, 5, 5), r"got shape \(1, 1, 3, 5, 5\)"),
        (torch.zeros(1, 2, 5, 5, dtype=torch.long), r"floating-point.*torch.int64"),
        ([[1.0]], r"got list"),
        (torch.randn(1, 0, 5, 5), r"C, H, W >= 1, got shape \(1, 0, 5, 5\)"),
        (torch.randn(1, 2, 0, 5), r"C, H, W >= 1, got shape \(1, 2, 0, 5\)"),
    ],
    ids=["rank3", "rank5", "int", "list", "zero_channels", "zero_height"],
)
def test_bad_input_raises_value_error(x, match):
    with pytest.raises(ValueError, match=match):
        spatial_pyramid_pool(x)


@pytest.mark.parametrize(
    "levels,match",
    [
        ((), r"levels must not be empty, got \(\)"),
        ((6, 0, 1), r"got \(6, 0, 1\)"),
        ((-2,), r"got \(-2,\)"),
        (0, r"got \(0,\)"),
        ((2.5, 1), r"got \(2.5, 1\)"),
        (True, r"got True"),
        ("6", r"'6'"),
        (None, r"got None"),
    ],
    ids=str,
)
def test_bad_levels_raise_value_error(levels, match):
    with pytest.raises(ValueError, match=match):
        spatial_pyramid_pool(torch.randn(1, 1, 4, 4), levels)
    with pytest.raises(ValueError, match=match):
        SpatialPyramidPool(levels)


def test_bad_mode_and_bins_raise_value_error():
    with pytest.raises(ValueError, match=r"mode must be one of \('max', 'avg'\), got 'min'"):
        spatial_pyramid_pool(torch.randn(1, 1, 4, 4), mode="min")
    with pytest.raises(ValueError, match=r"bins must be one of \('adaptive', 'sliding'\), got 'fixed'"):
        spatial_pyramid_pool(torch.randn(1, 1, 4, 4), bins="fixed")
    with pytest.raises(ValueError, match="'sum'"):
        SpatialPyramidPool(mode="sum")


# ------------------------------------------------------------------ module form


def test_module_output_dim_and_repr():
    spp = SpatialPyramidPool()
    assert spp.levels == PAPER and spp.num_bins == 50
    assert spp.output_dim(256) == 12_800  # ZF-5: 256 x 50 inputs to fc6
    assert pyramid_output_dim(256) == 12_800
    assert pyramid_output_dim(512, (1, 2, 3, 6)) == 25_600
    assert SpatialPyramidPool((4, 2, 1), mode="avg").output_dim(3) == 3 * 21
    text = repr(SpatialPyramidPool((1, 2, 3, 6), mode="avg", bins="sliding"))
    for part in ["SpatialPyramidPool(", "levels=(1, 2, 3, 6)", "mode='avg'", "bins='sliding'", "num_bins=50"]:
        assert part in text


@pytest.mark.parametrize("hw", [(13, 13), (10, 10), (7, 19)], ids=str)
def test_module_forward_has_a_fixed_width_for_any_size(hw):
    spp = SpatialPyramidPool((1, 2, 3, 6))
    x = randn(2, 8, *hw, dtype=torch.float32, seed=10)
    out = spp(x)
    assert out.shape == (2, spp.output_dim(8))
    torch.testing.assert_close(out, pyramid_ref(x, (1, 2, 3, 6)), rtol=0, atol=0)


def test_paths_are_the_ones_named(monkeypatch):
    # Guards the fixtures above: float32 max on CPU really goes through the numba
    # kernel, and the "torch" path really avoids it.
    if not _kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    calls = []
    real = spp_module.pyramid_max_kernel
    monkeypatch.setattr(spp_module, "pyramid_max_kernel", lambda *a, **k: calls.append(1) or real(*a, **k))
    spatial_pyramid_pool(torch.randn(1, 2, 5, 5))
    assert calls == [1]
    monkeypatch.setattr(_kernels, "HAVE_NUMBA", False)
    spatial_pyramid_pool(torch.randn(1, 2, 5, 5))
    assert calls == [1]


def test_usual_implementation_agrees_with_the_reference():
    # The benchmark's baseline (torch's adaptive pooling per level) is the same function.
    x = randn(2, 3, 13, 17, seed=11)
    torch.testing.assert_close(usual_pyramid(x, PAPER), pyramid_ref(x, PAPER), rtol=0, atol=0)
    torch.testing.assert_close(F.adaptive_max_pool2d(x, 6).flatten(1), pyramid_ref(x, (6,)), rtol=0, atol=0)
