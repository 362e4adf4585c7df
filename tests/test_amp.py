"""autocast_context / grad_scaler / parse_amp: validation everywhere, no-op on the CPU, 16-bit layers on CUDA."""

from __future__ import annotations

import pytest
import torch

from sppnet.engine.amp import autocast_context, grad_scaler, parse_amp
from sppnet.ops import spatial_pyramid_pool


def test_parse_amp():
    assert parse_amp("bf16") is parse_amp("BFloat16") is torch.bfloat16
    assert parse_amp("fp16") is parse_amp(" float16 ") is torch.float16
    assert parse_amp(None) is parse_amp("none") is parse_amp("OFF") is None
    for bad in ("fp8", "", "32", 16, True):
        with pytest.raises(ValueError, match="amp must be one of bf16, fp16, none"):
            parse_amp(bad)


@pytest.mark.parametrize("amp", [None, "none", "bf16", "fp16"])
def test_cpu_is_a_no_op(amp):
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(5, 3), torch.randn(4, 5)
    with autocast_context("cpu", amp):
        y = layer(x)
        assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x @ layer.weight.T + layer.bias, rtol=0, atol=1e-6)
    scaler = grad_scaler("cpu", amp)
    assert not scaler.is_enabled()
    loss = torch.tensor(2.5)
    assert scaler.scale(loss) is loss  # disabled: passes through


def test_unknown_dtype_fails_on_every_device():
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="got 'int8'"):
            autocast_context(device, "int8")
        with pytest.raises(ValueError, match="got 'int8'"):
            grad_scaler(device, "int8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_runs_conv_and_fc_in_16_bits_and_the_pyramid_exact(amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("GPU without bfloat16")
    dtype = parse_amp(amp)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3).cuda()
    fc = torch.nn.Linear(8 * (1 + 4), 4).cuda()
    x = torch.randn(2, 3, 13, 11, device="cuda")
    with autocast_context("cuda", amp):
        maps = conv(x)
        pooled = spatial_pyramid_pool(maps, (2, 1), "max")
        scores = fc(pooled)
    assert maps.dtype == pooled.dtype == scores.dtype == dtype
    # The pyramid selects values of its 16-bit input: exactly the float32 pyramid of that input.
    exact = spatial_pyramid_pool(maps.float(), (2, 1), "max")
    assert torch.equal(pooled.float(), exact)
    # 16-bit conv and fc stay close to float32.
    ref = fc(spatial_pyramid_pool(conv(x), (2, 1), "max"))
    torch.testing.assert_close(scores.float(), ref, rtol=0.05, atol=0.05)
    assert grad_scaler("cuda", amp).is_enabled() == (amp == "fp16")
