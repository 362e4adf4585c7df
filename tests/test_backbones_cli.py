"""torchvision backbones through the CLI: ``classify train`` / ``detect train --model NAME``,
``--weights FILE|NAME``, ``--freeze``, the normalisation saved with the run, and refused files.

Nothing downloads: reference weights are torchvision's networks with ``weights=None``
(random, seeded) saved to a temporary file; the one weights-name test replaces
torchvision's download function. Networks are tiny (``--width``) except where a
weights file needs torchvision's own widths (AlexNet's conv layers at 64 px).
"""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from tiny_detect import tiny_flags, tiny_voc_fixture
from torch import nn

from sppnet.cli.main import main
from sppnet.data.synthetic import make_classification_dataset
from sppnet.engine.classify import ClassifyConfig, load_classifier
from sppnet.engine.common import load_state, load_weights
from sppnet.engine.config import ConfigError
from sppnet.engine.detect import DetectConfig
from sppnet.engine.detect.model import load_detector
from sppnet.models import get_model
from sppnet.models.detector import SPPDetector
from sppnet.models.freeze import feature_stages
from sppnet.utils import load_json

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CLASSIFY = ["--fc-dim", "16", "--size", "64", "--epochs", "1", "--batch-size", "8", "--workers", "0"]
CLASSIFY += ["--device", "cpu", "--quiet"]
DETECT = tiny_flags(ft_iterations=8, max_proposals=60, fc_dim=16, width=None)  # --width per backbone
# the narrowest widths that keep every conv layer (and ResNet's bottlenecks) at >= 2 channels
TINY_WIDTH = {"alexnet": "0.0625", "vgg16": "0.0625", "resnet50": "0.03125"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_classification_dataset(
        tmp_path_factory.mktemp("shapes"),
        seed=2,
        train_per_class=2,
        val_per_class=1,
        test_per_class=1,
        min_size=48,
        max_size=96,
    )


voc = tiny_voc_fixture("voc", seed=5, num_train=6, num_test=2, max_short_side=128, max_objects=2)


@pytest.fixture(scope="module")
def alexnet_conv(tmp_path_factory):
    """torchvision's AlexNet (random, seeded) and its conv layers' state dict as a .pth file."""
    torch.manual_seed(3)
    tv = torchvision.models.alexnet(weights=None).eval()
    path = tmp_path_factory.mktemp("weights") / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in tv.features.state_dict().items()}, path)  # conv only: 10 MB
    return tv, path


def images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def fail(argv: list[str], capsys) -> str:
    """Runs a CLI command that must fail as a user error; returns its one-line message."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ------------------------------------------------------------ classification


@pytest.mark.parametrize(
    "name, schedule, views", [("alexnet", "multi", "multi"), ("vgg16", "single", "full"), ("resnet50", "random", "ten")]
)
def test_classify_train_val_each_backbone(name, schedule, views, shapes, tmp_path, capsys):
    out = tmp_path / name
    argv = ["classify", "train", "--model", name, "--width", TINY_WIDTH[name], "--data", str(shapes)]
    assert main([*argv, "--out", str(out), "--schedule", schedule, *CLASSIFY]) == 0
    saved = load_json(out / "config.json")
    assert (saved["model"], saved["weights"], saved["freeze"]) == (name, None, "none")
    assert (saved["mean"], saved["std"]) == IMAGENET  # random weights: ImageNet statistics
    rows = (out / "metrics.csv").read_text().splitlines()
    first = dict(zip(rows[0].split(","), rows[1].split(","), strict=True))
    assert float(first["train_loss"]) > 0 and 0.0 <= float(first["val_top1"]) <= 1.0
    model, classes, cfg = load_classifier(out)
    assert model.name == name and cfg.mean == tuple(IMAGENET[0]) and len(classes) == 8
    capsys.readouterr()  # a test view of each kind, one per backbone (multi: on the conv5 maps)
    assert main(["classify", "val", "--run", str(out), "--split", "test", "--views", views, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 8 and 0.0 <= result["top1"] <= result["top5"] <= 1.0


@pytest.mark.slow
@pytest.mark.export
def test_export_onnx_of_a_cli_trained_backbone_has_dynamic_height_and_width(shapes, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "alex"  # (every backbone's model-level ONNX export: tests/test_backbones.py)
    argv = ["classify", "train", "--model", "alexnet", "--width", TINY_WIDTH["alexnet"], "--data", str(shapes)]
    assert main([*argv, "--out", str(out), *CLASSIFY]) == 0
    capsys.readouterr()
    assert main(["export", "--run", str(out), "--format", "onnx", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dynamic"]["height"] and report["dynamic"]["width"] and len(report["verified"]) == 3
    assert (report["mean"], report["std"]) == IMAGENET
    model, _, _ = load_classifier(out)
    x = images(1, 71, 97, seed=4)  # a size the export was not verified at
    session = ort.InferenceSession(report["path"], providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {report["input_name"]: x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)


def test_no_spp_vgg16_trains_at_its_one_size(shapes, tmp_path):
    out = tmp_path / "nospp"
    argv = ["classify", "train", "--model", "vgg16", "--width", "0.0625", "--no-spp", "--data", str(shapes)]
    assert main([*argv, "--out", str(out), *CLASSIFY, "--size", "112"]) == 0  # conv5 7x7: torchvision's pool5
    model, _, _ = load_classifier(out)
    assert not model.spp and model.input_size == 112 and model.pooled_dim == model.feature_channels * 49


def test_weights_file_reproduces_torchvisions_conv5_and_frozen_layers_stay(alexnet_conv, shapes, tmp_path):
    tv, path = alexnet_conv
    out = tmp_path / "alex"
    argv = ["classify", "train", "--model", "alexnet", "--width", "1", "--weights", str(path), "--freeze", "conv"]
    assert main([*argv, "--data", str(shapes), "--out", str(out), "--lr", "0.1", *CLASSIFY]) == 0
    saved = load_json(out / "config.json")
    assert (saved["weights"], saved["freeze"], saved["mean"], saved["std"]) == (str(path), "conv", *IMAGENET)
    model, _, cfg = load_classifier(out)  # rebuilt from the checkpoint: the config's weights are not read again
    assert cfg.weights == str(path) and "weights" not in load_weights(out / "model.safetensors")[1]["model_config"]
    x = images(2, 83, 67)
    with torch.no_grad():
        got, want = model.forward_features(x), tv.features[:12](x)
    assert (got - want).abs().max() <= 1e-5  # the trained run's conv5 is torchvision's: frozen, never updated
    # the optimiser held the trainable parameters only: fc6, fc7, the classifier
    state = load_state(out / "last.safetensors")
    held = [i for group in state["optimizer"]["param_groups"] for i in group["params"]]  # AdamW: 2 groups
    assert len(held) == sum(1 for p in model.fc.parameters()) + 2 == 6


def test_freeze_up_to_a_stage_through_the_cli(alexnet_conv, shapes, tmp_path):
    tv, path = alexnet_conv
    out = tmp_path / "alex2"
    argv = ["classify", "train", "--model", "alexnet", "--width", "1", "--weights", str(path), "--freeze", "conv2"]
    assert main([*argv, "--data", str(shapes), "--out", str(out), "--lr", "0.1", *CLASSIFY]) == 0
    model, _, _ = load_classifier(out)
    stages = feature_stages(model)
    x = images(2, 64, 64, seed=1)
    with torch.no_grad():
        conv2 = nn.Sequential(*stages["conv1"], *stages["conv2"])
        tv_conv2 = tv.features[: len(conv2)]
        assert (conv2(x) - tv_conv2(x)).abs().max() <= 1e-5  # conv1, conv2 kept
        conv3 = stages["conv3"][0]
        assert (conv3.weight - tv.features[len(conv2)].weight).abs().max() > 0  # conv3 trained


def test_weights_name_brings_its_normalisation_into_the_run(shapes, tmp_path, monkeypatch):
    """VGG-16's IMAGENET1K_FEATURES expects other statistics than ImageNet's: the run trains and saves with them."""
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    urls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: urls.append(url) or state)
    out = tmp_path / "vgg"
    argv = ["classify", "train", "--model", "vgg16", "--width", "1", "--weights", "IMAGENET1K_FEATURES"]
    small = [*CLASSIFY, "--size", "48"]  # VGG-16 at its own widths: small images
    assert main([*argv, "--freeze", "conv", "--data", str(shapes), "--out", str(out), *small]) == 0
    preset = torchvision.models.VGG16_Weights.IMAGENET1K_FEATURES.transforms()
    assert urls == [torchvision.models.VGG16_Weights.IMAGENET1K_FEATURES.url]
    saved = load_json(out / "config.json")
    assert (saved["mean"], saved["std"]) == (list(preset.mean), list(preset.std)) != IMAGENET
    model, _, cfg = load_classifier(out)
    assert model.mean == cfg.mean == tuple(preset.mean)
    # resuming reads nothing again: the checkpoint holds the weights
    assert main([*argv, "--data", str(shapes), "--out", str(out), "--resume", *small, "--epochs", "2"]) == 0
    assert len(urls) == 1 and load_json(out / "config.json")["mean"] == list(preset.mean)


class _Payload:
    """Unpickling this would create ``marker``: a pickle that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bad_weights_are_refused_through_the_cli(alexnet_conv, shapes, tmp_path, capsys):
    _, alex_path = alexnet_conv
    base = ["classify", "train", "--width", "1", "--data", str(shapes), "--out", str(tmp_path / "r"), *CLASSIFY]
    marker = tmp_path / "pwned"
    torch.save({"features.0.weight": _Payload(marker)}, tmp_path / "evil.pth")
    assert "refusing to load" in fail([*base, "--model", "alexnet", "--weights", str(tmp_path / "evil.pth")], capsys)
    assert not marker.exists()  # no code from the file ran
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    assert str(tmp_path / "junk.pth") in fail(
        [*base, "--model", "alexnet", "--weights", str(tmp_path / "junk.pth")], capsys
    )
    err = fail([*base, "--model", "vgg16", "--weights", str(alex_path)], capsys)  # AlexNet's file for VGG-16
    assert "is not a torchvision vgg16 state dict" in err and "missing" in err and "another architecture" in err
    assert "IMAGENET1K_V1" in fail([*base, "--model", "alexnet", "--weights", "IMAGENET9K_V7"], capsys)
    assert "needs --width 1" in fail(
        [*base, "--model", "alexnet", "--weights", str(alex_path), "--width", "0.5"], capsys
    )
    assert "Table 1 network" in fail([*base, "--model", "zf5", "--weights", str(alex_path)], capsys)
    err = fail([*base, "--model", "resnet50", "--freeze", "conv5"], capsys)
    assert "conv1, layer1, layer2, layer3" in err and "'conv5'" in err


# ------------------------------------------------------------------ detection


def test_detect_train_alexnet_from_a_weights_file(alexnet_conv, voc, tmp_path, capsys):
    """SPP-net's detection recipe on a torchvision backbone: conv5 from the file stays torchvision's throughout."""
    tv, path = alexnet_conv
    out = tmp_path / "det"
    argv = ["detect", "train", "--model", "alexnet", "--width", "1", "--weights", str(path), "--freeze", "conv"]
    assert main([*argv, "--data", str(voc), "--out", str(out), *DETECT]) == 0
    saved = load_json(out / "config.json")["backbone"]
    assert (saved["model"], saved["weights"], saved["freeze"], [saved["mean"], saved["std"]]) == (
        "alexnet",
        str(path),
        "conv",
        list(IMAGENET),
    )
    detector, _, _ = load_detector(out)
    assert detector.pixel_mean.flatten().tolist() == pytest.approx(IMAGENET[0])
    x = images(1, 90, 120)
    with torch.no_grad():
        assert (detector.backbone.forward_features(x) - tv.features[:12](x)).abs().max() <= 1e-5
    capsys.readouterr()
    assert main(["detect", "val", "--run", str(out), "--split", "test", "--json", "--device", "cpu"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["mAP"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name, method", [("vgg16", "spp"), ("resnet50", "spp"), ("vgg16", "rcnn")])
def test_detect_train_each_backbone(name, method, voc, tmp_path, capsys):
    out = tmp_path / f"{name}-{method}"
    argv = ["detect", "train", "--model", name, "--width", TINY_WIDTH[name], "--method", method]
    assert main([*argv, "--data", str(voc), "--out", str(out), *DETECT]) == 0
    detector, _, cfg = load_detector(out)
    assert detector.backbone.name == name and detector.method == method and cfg.backbone.model == name
    capsys.readouterr()
    assert main(["detect", "val", "--run", str(out), "--split", "test", "--json", "--device", "cpu"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["mAP"] <= 1.0


def test_detect_weights_with_a_backbone_run_is_refused(alexnet_conv, voc, tmp_path, capsys):
    _, path = alexnet_conv
    argv = [
        "detect",
        "train",
        "--model",
        "alexnet",
        "--width",
        "1",
        "--weights",
        str(path),
        "--backbone",
        str(tmp_path),
    ]
    assert "give one of them" in fail([*argv, "--data", str(voc), "--out", str(tmp_path / "d"), *DETECT], capsys)


# -------------------------------------------------------------------- presets


def test_paper_preset_per_backbone():
    """``--preset paper --model vgg16``: Fast R-CNN's SPPnet baseline setting (no weights are read here)."""
    vgg = DetectConfig.from_preset("paper", {"backbone": {"model": "vgg16"}})
    b = vgg.backbone
    assert (b.model, b.width, b.fc_dim, b.weights, b.freeze) == ("vgg16", 1.0, 4096, "IMAGENET1K_V1", "conv")
    assert (vgg.features.levels, vgg.image_scales, vgg.finetune.mode, vgg.scorer, vgg.bbox.enabled) == (
        (7,),
        (688,),
        "fc",
        "svm",
        True,
    )
    assert (b.mean, b.std) == (tuple(IMAGENET[0]), tuple(IMAGENET[1]))
    assert vgg.finetune.iterations == DetectConfig.from_preset("paper").finetune.iterations  # Sec. 4.1's schedule
    # the model's overrides apply under the preset; explicit settings still win
    assert DetectConfig.from_preset("paper", {"backbone.model": "alexnet"}).features.levels == (6,)
    pyramid = DetectConfig.from_preset("paper", {"backbone": {"model": "vgg16"}, "features": {"levels": (1, 2, 3, 6)}})
    assert pyramid.features.levels == (1, 2, 3, 6)
    five = DetectConfig.from_preset("paper", {"backbone.model": "vgg16", "features.scales": (480, 576, 688, 864, 1200)})
    assert five.image_scales == (480, 576, 688, 864, 1200)
    res = DetectConfig.from_preset("paper", {"backbone": {"model": "resnet50"}})
    assert (res.backbone.fc_dim, res.features.levels, res.finetune.flip) == (1024, (1, 2, 3, 6), False)
    from_run = DetectConfig.from_preset("paper", {"backbone": {"model": "vgg16", "checkpoint": "/runs/cls"}})
    assert from_run.backbone.weights is None  # a --backbone run holds its weights
    assert DetectConfig.from_preset("small", {"backbone.model": "vgg16"}).backbone.weights is None  # small: none
    assert DetectConfig.from_preset("paper").backbone.weights is None  # zf5: trained here
    cls = ClassifyConfig.from_preset("paper", model="vgg16")
    assert (cls.weights, cls.width, cls.lr, cls.size) == ("IMAGENET1K_V1", 1.0, 0.001, 224)
    assert ClassifyConfig.from_preset("paper", model="vgg16", weights="IMAGENET1K_FEATURES").mean != cls.mean
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        ClassifyConfig.from_preset("paper", model="vgg16", weights="IMAGENET9K")


# ------------------------------------------------------ detector: fc by type


def test_compress_fc_finds_fc6_fc7_by_type_with_fc_norm():
    backbone = get_model("zf5", width=0.125, fc_dim=16, num_classes=3, levels=(2, 1), fc_norm=True)
    det = SPPDetector(backbone, 2, scales=(100,), levels=(2, 1)).eval()
    x = torch.randn(7, det.pooled_dim)
    with torch.no_grad():
        ref = det.fc7(x)
        det.compress_fc(16)  # full rank: the same maps
        torch.testing.assert_close(det.fc7(x), ref, atol=1e-4, rtol=1e-4)
    kinds = [type(m).__name__ for m in det.backbone.fc]
    assert kinds[0] == kinds[4] == "Sequential" and kinds[1] == kinds[5] == "BatchNorm1d"
    with pytest.raises(ValueError, match="already compressed"):
        det.compress_fc(8)
