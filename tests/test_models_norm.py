"""The normalisation options of the Table 1 networks (``norm``, ``fc_norm``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sppnet.models import get_model
from sppnet.models.sppnet import NORMS, ChannelLRN

# The options belong to the Table 1 networks; torchvision backbones keep their own layers.
TABLE1 = ("zf5", "convnet5", "overfeat5", "overfeat7")


def small(name: str, **kwargs) -> nn.Module:
    return get_model(name, num_classes=3, width=0.0625, fc_dim=16, **kwargs)


@pytest.mark.parametrize("name", TABLE1)
@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_runs_at_two_sizes_and_backward(name, norm):
    torch.manual_seed(0)
    model = small(name, norm=norm, fc_norm=norm == "bn")
    for side in (model.min_input_size + 40, model.min_input_size + 57):
        x = torch.randn(2, 3, side, side + 9)
        model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", TABLE1)
def test_bn_replaces_lrn_after_every_conv_and_keeps_the_geometry(name):
    lrn, bn, none = small(name), small(name, norm="bn"), small(name, norm="none")
    convs = [m for m in lrn.features if isinstance(m, nn.Conv2d)]
    n_lrn = sum(isinstance(m, ChannelLRN) for m in lrn.features)
    assert n_lrn >= 1
    # "bn": every conv is followed by a BatchNorm2d of its width, then the ReLU; no LRN and no conv bias
    layers = list(bn.features)
    for i, m in enumerate(layers):
        if isinstance(m, nn.Conv2d):
            assert m.bias is None
            assert isinstance(layers[i + 1], nn.BatchNorm2d) and layers[i + 1].num_features == m.out_channels
            assert isinstance(layers[i + 2], nn.ReLU)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in layers) == len(convs)
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in bn.modules())
    # "none": the paper's layers without the LRNs
    assert len(none.features) == len(lrn.features) - n_lrn
    assert not any(isinstance(m, (nn.LocalResponseNorm, nn.BatchNorm2d)) for m in none.modules())
    for model in (bn, none):
        assert (model.stride, model.offset, model.min_input_size) == (lrn.stride, lrn.offset, lrn.min_input_size)
        assert model.feature_size(131, 97) == lrn.feature_size(131, 97)


def test_none_equals_lrn_with_the_lrn_layers_removed():
    torch.manual_seed(0)
    lrn = small("overfeat5")
    none = small("overfeat5", norm="none")
    # module indices differ (the LRNs are gone), so copy layer by layer
    lrn_convs = [m for m in lrn.features if isinstance(m, nn.Conv2d)]
    none_convs = [m for m in none.features if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for a, b in zip(lrn_convs, none_convs):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
        none.fc.load_state_dict(lrn.fc.state_dict())
        none.classifier.load_state_dict(lrn.classifier.state_dict())
    x = torch.randn(2, 3, 80, 96)
    expected = x
    for m in lrn.features:
        if not isinstance(m, ChannelLRN):
            expected = m(expected)
    torch.testing.assert_close(none.forward_features(x), expected)


def test_bn_in_eval_mode_is_the_affine_map_of_the_running_statistics():
    torch.manual_seed(0)
    model = small("zf5", norm="bn", fc_norm=True)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n))
            m.running_var.copy_(torch.rand(n) + 0.5)
            m.weight.data.copy_(torch.randn(n))
            m.bias.data.copy_(torch.randn(n))
    model.eval()
    x = torch.randn(1, 3, 90, 100)
    # brute force: conv, then (y - mean) / sqrt(var + eps) * gamma + beta per channel, by hand
    h = x
    for m in model.features:
        if isinstance(m, nn.BatchNorm2d):
            shape = (1, -1, 1, 1)
            h = (h - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)
            h = h * m.weight.view(shape) + m.bias.view(shape)
        else:
            h = m(h)
    pooled = model.pool(h)
    for m in model.fc:
        if isinstance(m, nn.BatchNorm1d):
            pooled = (pooled - m.running_mean) / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias
        else:
            pooled = m(pooled)
    torch.testing.assert_close(model(x), model.classifier(pooled))


def test_fc_norm_puts_batch_norm_after_fc6_and_fc7():
    model = small("overfeat5", fc_norm=True)
    kinds = [type(m).__name__ for m in model.fc]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 2
    assert model.fc[1].num_features == model.fc[0].out_features == 16
    assert [type(m).__name__ for m in small("overfeat5").fc] == ["Linear", "ReLU", "Dropout"] * 2


def test_config_round_trips_the_norm_options():
    model = small("convnet5", norm="bn", fc_norm=True)
    cfg = model.config()
    assert cfg["norm"] == "bn" and cfg["fc_norm"] is True
    again = get_model("convnet5", **cfg)
    again.load_state_dict(model.state_dict())  # same modules, same names
    assert "norm='bn'" in repr(again)


def test_bad_norm_is_refused():
    with pytest.raises(ValueError, match="norm must be one of lrn, bn, none, got 'batch'"):
        small("zf5", norm="batch")
