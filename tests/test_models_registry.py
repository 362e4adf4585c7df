"""Every registered model: geometry by brute force, feature size and minimum input, forward / backward.

The receptive field of one conv cell is found by back-propagating from that cell
through a copy of the conv layers made linear and positive (every conv weight
``1 / fan_in``, max-pools turned into average pools of the same window, ReLU /
norms removed): the gradient is then > 0 exactly on the pixels the cell sees, so
the centre of that support is the cell's receptive-field centre. It must be
``offset + stride * j`` for every cell whose support does not touch the border
(a clipped support would move the centre), nor the last pixel any cell sees.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sppnet.models import get_model, list_models

SMALL = {"width": 0.125, "fc_dim": 16, "num_classes": 3}


@pytest.fixture(scope="module", params=list_models())
def model(request):
    torch.manual_seed(0)
    return get_model(request.param, **SMALL)


def positive_linear_copy(features: nn.Module) -> nn.Module:
    """The same windows, made linear with positive weights (see the module docstring)."""
    net = copy.deepcopy(features).double()
    for parent in list(net.modules()):
        for name, m in list(parent.named_children()):
            if isinstance(m, nn.Conv2d):
                with torch.no_grad():
                    m.weight.fill_(1.0 / m.weight[0].numel())
                    if m.bias is not None:
                        m.bias.zero_()
            elif isinstance(m, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode))
            elif isinstance(m, (nn.ReLU, nn.BatchNorm2d, nn.LocalResponseNorm)):
                setattr(parent, name, nn.Identity())
    return net


def support_centres(net: nn.Module, height: int, width: int, axis: int) -> dict[int, float]:
    """Receptive-field centre (pixels) along ``axis`` (-1: x, -2: y) of every unclipped cell on row / column 0."""
    n_cells = net(torch.zeros(1, 3, height, width, dtype=torch.float64)).shape[axis]
    x = torch.ones(n_cells, 3, height, width, dtype=torch.float64, requires_grad=True)
    out = net(x)
    idx = torch.arange(n_cells)
    picked = out[idx, :, idx, 0] if axis == -2 else out[idx, :, 0, idx]  # sample j back-propagates cell j
    picked.sum().backward()
    profiles = x.grad.sum(dim=(1, 2 if axis == -1 else 3))  # [cells, length along axis]
    # Pixels no cell sees (a floor-mode layer drops the far end) bound every support:
    # a support that reaches the first or last SEEN pixel may be clipped.
    seen = (profiles.sum(0) > 0).nonzero().flatten()
    centres = {}
    for j in range(n_cells):
        hit = (profiles[j] > 0).nonzero().flatten()
        first, last = int(hit[0]), int(hit[-1])
        if first > int(seen[0]) and last < int(seen[-1]):
            centres[j] = (first + last + 1) / 2  # pixel i covers [i, i + 1)
    return centres


def test_stride_and_offset_by_brute_force(model):
    net = positive_linear_copy(model.features)
    side = 340  # wider than the largest receptive field (ResNet-50 C4: 267 px) plus a few strides
    small = model.min_input_size
    for axis, (h, w) in ((-1, (small, side)), (-2, (side, small))):
        centres = support_centres(net, h, w, axis)
        assert len(centres) >= 2, (model.name, centres)
        for j, centre in centres.items():
            assert centre == model.offset + model.stride * j, (model.name, axis, j, centre)


def test_feature_size_and_min_input_against_a_forward_pass(model):
    model.eval()
    m = model.min_input_size
    with torch.no_grad():
        for h, w in ((m, m), (m + 5, m + 23), (97, 64)):
            maps = model.forward_features(torch.randn(1, 3, h, w))
            assert tuple(maps.shape[-2:]) == model.feature_size(h, w)
            assert maps.shape[1] == model.feature_channels
        with pytest.raises(ValueError, match=f"at least {m}x{m}"):
            model(torch.randn(1, 3, m - 1, m + 10))
        assert model.feature_size(m - 1, m - 1) == (0, 0)
        if m > 1:  # the minimum is tight: the conv layers themselves fail (or give nothing) one pixel below it
            try:
                out = model.features(torch.randn(1, 3, m - 1, m - 1))
            except RuntimeError:
                pass
            else:
                assert out.numel() == 0


def test_forward_two_sizes_and_backward(model):
    model.train()
    model.zero_grad()
    for h, w in ((64, 64), (75, 91)):  # the SPP property: any size, the same fc6 input
        out = model(torch.randn(2, 3, h, w))
        assert out.shape == (2, SMALL["num_classes"]) and torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.features[0].weight.grad.abs().sum() > 0


def test_config_rebuilds_the_model(model):
    again = get_model(model.name, **model.config())
    assert again.config() == model.config()
    assert again.load_state_dict(model.state_dict()) is not None
    x = torch.randn(1, 3, 70, 66)
    model.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_registry_names_are_unique_and_known():
    names = list_models()
    assert {"zf5", "convnet5", "overfeat5", "overfeat7", "alexnet", "vgg16", "resnet50"} <= set(names)
    assert len(names) == len(set(names))
    with pytest.raises(ValueError, match="unknown model 'vgg19'"):
        get_model("vgg19")
