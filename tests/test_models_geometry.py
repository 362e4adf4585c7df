"""``models/geometry.py`` against PyTorch itself: output sizes, refused layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sppnet.models.geometry import Window, feature_geometry


def torch_length(layer: nn.Module, a: int) -> int:
    try:
        return layer(torch.zeros(1, 1, 1, a)).shape[-1]
    except RuntimeError:  # "output size is too small" / "kernel size can't be greater than input"
        return 0


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 11])
def test_window_output_size_is_pytorchs(k):
    for s in (1, 2, 3, 4):
        for p in range(k // 2 + 1):
            for a in range(1, 30):
                for ceil in (False, True):
                    want = Window(k, s, p, 1, ceil).output_size(a)
                    assert torch_length(nn.MaxPool2d((1, k), (1, s), (0, p), ceil_mode=ceil), a) == want
                    assert torch_length(nn.AvgPool2d((1, k), (1, s), (0, p), ceil_mode=ceil), a) == want
                for d in (1, 2):
                    conv = nn.Conv2d(1, 1, (1, k), (1, s), (0, p), (1, d))
                    assert torch_length(conv, a) == Window(k, s, p, d).output_size(a), (k, s, p, d, a)


def test_a_chain_with_dilation_and_ceil_mode_matches_a_forward_pass():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 5, 2, 1),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(4, 4, 3, 1, 2, dilation=2),
        nn.BatchNorm2d(4),
        nn.AvgPool2d(2),
    )
    g = feature_geometry(net)
    assert g.stride == 8
    for h, w in ((g.min_input_size, 40), (33, 17), (64, 65)):
        assert tuple(net(torch.zeros(1, 3, h, w)).shape[-2:]) == g.output_size(h, w)
    assert g.output_size(g.min_input_size - 1, 40) == (0, 0)


def test_unknown_or_anisotropic_layers_are_refused():
    with pytest.raises(ValueError, match="AdaptiveAvgPool2d"):
        feature_geometry(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2)))
    with pytest.raises(ValueError, match="same geometry along H and W"):
        feature_geometry(nn.Sequential(nn.Conv2d(3, 4, (3, 5))))
