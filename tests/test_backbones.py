"""torchvision backbones: their own state dicts reproduce torchvision's conv features; bad files are refused.

Nothing downloads: the reference networks are torchvision's with ``weights=None``
(random, seeded), saved to a temporary file and loaded through ``weights=FILE``.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn

from sppnet.models import feature_stages, freeze, get_model
from sppnet.models.freeze import FrozenBatchNorm2d

SMALL = {"fc_dim": 8, "num_classes": 3}


def randomise_batch_norms(net: nn.Module) -> None:
    """Non-trivial running statistics and affine terms, so that loading them matters."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def torchvision_trunk(name: str, tv: nn.Module) -> nn.Module:
    """torchvision's own modules up to SPP's conv map: conv5 (+ReLU) or ResNet's C4."""
    if name == "alexnet":
        return tv.features[:12]
    if name == "vgg16":
        return tv.features[:30]
    return nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool, tv.layer1, tv.layer2, tv.layer3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """torchvision's alexnet / vgg16 / resnet50 (random) and their state dicts on disk."""
    torch.manual_seed(0)
    out = {}
    folder = tmp_path_factory.mktemp("weights")
    for name in ("alexnet", "vgg16", "resnet50"):
        if name == "vgg16":  # torchvision's VGG-16 conv layers; its 120M-parameter classifier is left out
            tv = nn.Module()
            tv.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
            state = {f"features.{k}": v for k, v in tv.features.state_dict().items()}
        else:
            tv = torchvision.models.get_model(name, weights=None)
            randomise_batch_norms(tv)
            state = tv.state_dict()
        tv.eval()
        path = folder / f"{name}.pth"
        torch.save(state, path)
        out[name] = (tv, state, path)
    return out


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "resnet50"])
def test_torchvision_state_dict_reproduces_torchvision_features(name, reference, tmp_path):
    tv, state, path = reference[name]
    x = torch.randn(2, 3, 67, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = torchvision_trunk(name, tv)(x)
        model = get_model(name, weights=path, **SMALL).eval()
        got = model.forward_features(x)
        assert (got - want).abs().max() <= 1e-5
        assert model.weights_report["source"] == str(path) and not model.weights_report["fc_loaded"]
        assert model.mean == (0.485, 0.456, 0.406) and model.std == (0.229, 0.224, 0.225)
        # the same through .safetensors
        st = tmp_path / f"{name}.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(st))
        again = get_model(name, weights=st, **SMALL).eval()
        assert (again.forward_features(x) - want).abs().max() <= 1e-5


@pytest.mark.parametrize("spp", [True, False])
def test_alexnet_fc6_fc7_load_when_the_pool5_vector_has_torchvisions_length(spp, reference):
    tv, _, path = reference["alexnet"]
    # levels=(6,) on the 13x13 conv5 map of a 224 input: the bins are torchvision's pool5 windows
    model = get_model("alexnet", spp=spp, levels=(6,), input_size=224, weights=path, num_classes=3).eval()
    assert model.weights_report["fc_loaded"] and model.weights_report["ignored"] == [
        "classifier.6.bias",
        "classifier.6.weight",
    ]
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = tv.classifier[:6](torch.flatten(tv.avgpool(tv.features(x)), 1))  # fc7 after ReLU
        got = model.forward_head(model.forward_features(x), pre_logits=True)
    assert (got - want).abs().max() <= 1e-5


def test_wrong_files_are_refused_naming_the_keys(reference, tmp_path):
    _, alex, alex_path = reference["alexnet"]
    _, res, _ = reference["resnet50"]
    with pytest.raises(
        ValueError, match=r"missing \d+ key\(s\): features.12.bias.*unexpected \d+ key\(s\): classifier.1.bias"
    ):
        get_model("vgg16", weights=alex_path, **SMALL)  # a file for another architecture
    partial = {k: v for k, v in res.items() if k != "layer3.5.conv3.weight"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): layer3.5.conv3.weight"):
        get_model("resnet50", weights=tmp_path / "partial.pth", **SMALL)
    reshaped = dict(alex, **{"features.0.weight": torch.zeros(64, 3, 7, 7)})
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(
        ValueError, match=r"features.0.weight has shape \(64, 3, 7, 7\), alexnet needs \(64, 3, 11, 11\)"
    ):
        get_model("alexnet", weights=tmp_path / "reshaped.pth", **SMALL)
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        get_model("alexnet", weights=tmp_path / "list.pth", **SMALL)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read .* as safetensors"):
        get_model("alexnet", weights=tmp_path / "junk.safetensors", **SMALL)
    with pytest.raises(ValueError, match="does not exist"):
        get_model("alexnet", weights=tmp_path / "absent.pth", **SMALL)
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        get_model("alexnet", weights="IMAGENET9K_V7", **SMALL)  # not a file, not a torchvision name
    with pytest.raises(ValueError, match="width=1.0"):
        get_model("alexnet", weights=alex_path, width=0.5, **SMALL)


class _Payload:
    """Unpickling this would create ``marker``: a pickle that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_payload_is_refused_and_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"features.0.weight": _Payload(marker)}, tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing to load"):
        get_model("alexnet", weights=tmp_path / "evil.pth", **SMALL)
    assert not marker.exists()


def test_a_torchvision_weights_name_goes_through_torchvisions_api_offline(reference, monkeypatch):
    """The download itself is replaced; what is checked: the URL, weights_only, the normalisation."""
    _, state, _ = reference["vgg16"]
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = get_model("vgg16", weights="IMAGENET1K_FEATURES", **SMALL)
    enum = torchvision.models.VGG16_Weights.IMAGENET1K_FEATURES
    assert calls == [(enum.url, {"progress": True, "check_hash": True, "weights_only": True})]
    preset = enum.transforms()
    assert model.mean == tuple(preset.mean) and model.std == tuple(preset.std)  # not ImageNet's usual values
    assert model.mean != (0.485, 0.456, 0.406)
    assert get_model(model.name, **model.config()).mean == model.mean  # kept in the config


def test_freeze_up_to_a_stage_keeps_batch_norm_statistics():
    torch.manual_seed(0)
    model = get_model("resnet50", width=0.125, **SMALL)
    fresh_keys = set(model.state_dict())
    assert freeze(model, "layer2") == ["conv1", "layer1", "layer2"]
    frozen = [model.features.conv1, model.features.bn1, model.features.layer1, model.features.layer2]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in [*model.features.layer3.parameters(), *model.fc.parameters()])
    assert all(isinstance(m, FrozenBatchNorm2d) for f in frozen for m in f.modules() if isinstance(m, nn.BatchNorm2d))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    after = model.state_dict()
    for k, v in before.items():
        changed = not torch.equal(after[k], v)
        assert changed == k.startswith("features.layer3"), k  # only the trainable stage's statistics move
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert model.features.layer3[0].conv1.weight.grad is not None
    assert set(model.state_dict()) == fresh_keys  # checkpoints load into an unfrozen model
    get_model("resnet50", width=0.125, **SMALL).load_state_dict(model.state_dict())


def test_freeze_conv_and_stage_names():
    zf5 = get_model("zf5", width=0.125, **SMALL)
    assert freeze(zf5, "conv") == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert not any(p.requires_grad for p in zf5.features.parameters())
    assert all(p.requires_grad for p in [*zf5.fc.parameters(), *zf5.classifier.parameters()])
    assert freeze(get_model("overfeat7", width=0.125, **SMALL), "none") == []
    vgg = get_model("vgg16", width=0.125, **SMALL)
    stages = feature_stages(vgg)
    convs = [sum(isinstance(m, nn.Conv2d) for m in stage) for stage in stages.values()]
    assert list(stages) == ["conv1", "conv2", "conv3", "conv4", "conv5"] and convs == [2, 2, 3, 3, 3]
    assert freeze(vgg, "conv2") == ["conv1", "conv2"]  # Fast R-CNN's VGG-16 setting
    assert [p.requires_grad for p in vgg.features.parameters()] == [False] * 8 + [True] * 18
    with pytest.raises(ValueError, match=r"stage of alexnet \(\['conv1', .*'conv5'\]\), got 'layer3'"):
        freeze(get_model("alexnet", width=0.125, **SMALL), "layer3")


@pytest.mark.export
@pytest.mark.parametrize("name", ["alexnet", "vgg16", "resnet50"])
def test_onnx_export_with_dynamic_height_and_width(name, tmp_path):
    pytest.importorskip("onnxruntime")
    from sppnet.export import export_onnx

    torch.manual_seed(0)
    model = get_model(name, width=0.125, fc_dim=16, num_classes=3)
    report = export_onnx(model, tmp_path / f"{name}.onnx", (64, 72), verify_sizes=[(64, 72), (83, 61)])
    assert [v["size"] for v in report["verified"]] == [(64, 72), (83, 61)]
    assert all(v["max_abs_err"] <= 1e-4 for v in report["verified"])
    assert report["dynamic"] == {"batch": True, "height": True, "width": True}
