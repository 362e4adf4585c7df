"""The auxiliary classifier on conv5's global max pool (``--aux-weight``, beyond the paper)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sppnet.data.synthetic import make_classification_dataset
from sppnet.engine.classify import ClassifyConfig, train
from sppnet.engine.classify.training import AuxiliaryHead
from sppnet.engine.common import load_state, load_weights
from sppnet.engine.config import ConfigError
from sppnet.models import get_model


def test_auxiliary_head_reads_the_per_channel_maximum_of_conv5():
    torch.manual_seed(0)
    model = get_model("overfeat5", num_classes=4, width=0.1, fc_dim=16, norm="bn", fc_norm=True).eval()
    head = AuxiliaryHead(model, 4).eval()
    with torch.no_grad():
        torch.nn.init.normal_(head.aux.weight)  # not the tiny init, so that a wrong input shows
        torch.nn.init.normal_(head.aux.bias)
        x = torch.randn(2, 3, 91, 123)
        logits, aux = head(x)
        assert torch.equal(logits, model(x))  # the network's own output, untouched
        maps = model.forward_features(x)  # [2, C, h, w]
        n, c, h, w = maps.shape
        assert h > 1 and w > 1
        expected = torch.empty(n, 4)
        for i in range(n):
            peak = [max(float(maps[i, ch, y, xx]) for y in range(h) for xx in range(w)) for ch in range(c)]
            for k in range(4):
                expected[i, k] = sum(head.aux.weight[k, ch] * peak[ch] for ch in range(c)) + head.aux.bias[k]
    torch.testing.assert_close(aux, expected, rtol=1e-5, atol=1e-5)


def test_aux_loss_reaches_the_conv_layers_and_only_through_the_global_max():
    torch.manual_seed(1)
    model = get_model("overfeat5", num_classes=3, width=0.1, fc_dim=16, norm="bn", fc_norm=True)
    head = AuxiliaryHead(model, 3)
    x, y = torch.randn(4, 3, 100, 100), torch.tensor([0, 1, 2, 0])
    logits, aux = head(x)
    F.cross_entropy(aux, y).backward()
    conv = next(p for p in model.features.parameters() if p.ndim == 4)
    assert conv.grad is not None and conv.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*model.fc.parameters(), *model.classifier.parameters()])


def test_aux_weight_is_checked_and_old_configs_train_without_it():
    assert ClassifyConfig.from_preset("paper").aux_weight == 0.0
    with pytest.raises(ConfigError, match="-0.5"):
        ClassifyConfig.from_preset("small", aux_weight=-0.5)
    saved = ClassifyConfig.from_preset("small", aux_weight=2.0).to_dict()
    assert ClassifyConfig.from_dict(saved).aux_weight == 2.0
    del saved["aux_weight"]  # a config.json written before the setting existed
    assert ClassifyConfig.from_dict(saved).aux_weight == 0.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_classification_dataset(
        tmp_path_factory.mktemp("data"),
        seed=5,
        train_per_class=3,
        val_per_class=1,
        test_per_class=0,
        min_size=48,
        max_size=96,
    )


def _cfg(data, **kw) -> ClassifyConfig:
    base = dict(width=0.1, fc_dim=32, size=64, epochs=2, batch_size=8, workers=0, device="cpu", data=str(data))
    return ClassifyConfig.from_preset("small", {**base, "aux_weight": 1.0, **kw})


def test_aux_layer_is_checkpointed_for_resume_but_not_saved_with_the_model(data, tmp_path):
    straight = tmp_path / "straight"
    train(_cfg(data), out=straight, verbose=False)
    weights, _ = load_weights(straight / "model.safetensors")
    assert not any("aux" in k for k in weights)
    state = load_state(straight / "last.safetensors")
    assert set(state["aux"]) == {"weight", "bias"}

    resumed = tmp_path / "resumed"
    train(_cfg(data, epochs=1), out=resumed, verbose=False)
    train(_cfg(data), out=resumed, resume=True, verbose=False)
    a, b = load_state(straight / "last.safetensors"), load_state(resumed / "last.safetensors")
    for k in a["aux"]:
        assert torch.equal(a["aux"][k], b["aux"][k]), k
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    # the auxiliary loss changes what the conv layers learn
    without = tmp_path / "without"
    train(_cfg(data, aux_weight=0.0), out=without, verbose=False)
    assert "aux" not in load_state(without / "last.safetensors")
    c = load_state(without / "last.safetensors")["model"]
    assert not torch.equal(a["model"]["features.0.weight"], c["features.0.weight"])


def test_no_aux_layer_when_every_conv_layer_is_frozen(data, tmp_path):
    out = tmp_path / "frozen"
    train(_cfg(data, freeze="conv", epochs=1), out=out, verbose=False)
    assert "aux" not in load_state(out / "last.safetensors")


def test_torchvision_backbones_keep_the_old_small_recipe():
    cfg = ClassifyConfig.from_preset("small", model="alexnet")
    assert (cfg.lr, cfg.aux_weight) == (1e-3, 0.0)
    assert ClassifyConfig.from_preset("small", model="alexnet", aux_weight=0.5).aux_weight == 0.5
    assert (ClassifyConfig.from_preset("small").lr, ClassifyConfig.from_preset("small").aux_weight) == (2e-3, 1.0)
