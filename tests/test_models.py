"""The networks' building blocks against brute-force references."""

from __future__ import annotations

import pytest
import torch

from sppnet.models import get_model
from sppnet.models.sppnet import ChannelLRN


def lrn_loop(x, size, alpha, beta, k):
    """Caffe / torch LRN by its definition, one channel at a time."""
    out = torch.empty_like(x)
    channels = x.shape[1]
    for c in range(channels):
        lo, hi = max(0, c - size // 2), min(channels - 1, c + (size - 1) // 2)
        window = (x[:, lo : hi + 1] ** 2).sum(dim=1)
        out[:, c] = x[:, c] / (k + alpha / size * window) ** beta
    return out


@pytest.mark.parametrize(
    "size,alpha,beta,k",
    [(5, 1e-4, 0.75, 1.0), (3, 5e-5, 0.75, 1.0), (4, 1e-2, 0.5, 2.0), (1, 1e-1, 1.0, 1.0), (7, 1e-1, 0.75, 0.5)],
)
def test_channel_lrn_matches_the_definition_and_torch(size, alpha, beta, k):
    g = torch.Generator().manual_seed(size)
    x = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64) * 10
    lrn = ChannelLRN(size, alpha, beta, k)
    torch.testing.assert_close(lrn(x), lrn_loop(x, size, alpha, beta, k))
    torch.testing.assert_close(lrn(x), torch.nn.functional.local_response_norm(x, size, alpha, beta, k))
    # fewer channels than the window; a 3-D (N, C, L) input
    x2 = x[:, :2]
    torch.testing.assert_close(lrn(x2), lrn_loop(x2, size, alpha, beta, k))
    x3 = x[:, :, 0]
    torch.testing.assert_close(lrn(x3), torch.nn.functional.local_response_norm(x3, size, alpha, beta, k))


@pytest.mark.parametrize("beta", [0.75, 0.6])
def test_channel_lrn_gradient(beta):
    x = torch.randn(1, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ChannelLRN(3, 0.5, beta, 1.0), (x,))


def test_zf5_uses_the_fast_lrn_with_the_paper_settings():
    model = get_model("zf5", num_classes=3, width=0.25, fc_dim=32)
    lrns = [m for m in model.modules() if isinstance(m, torch.nn.LocalResponseNorm)]
    assert len(lrns) == 2 and all(isinstance(m, ChannelLRN) for m in lrns)
    assert [(m.size, m.alpha, m.beta, m.k) for m in lrns] == [(3, 5e-5, 0.75, 1.0)] * 2
