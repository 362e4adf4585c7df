"""`sppnet export` on a trained run (dynamic H, W verified in onnxruntime) and hubconf."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sppnet.cli.main import main
from sppnet.data.synthetic import make_classification_dataset
from sppnet.engine.classify import ClassifyConfig, load_classifier, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = make_classification_dataset(
        tmp_path_factory.mktemp("shapes"),
        seed=2,
        train_per_class=2,
        val_per_class=1,
        test_per_class=1,
        min_size=48,
        max_size=80,
    )
    out = tmp_path_factory.mktemp("runs") / "cls"
    cfg = ClassifyConfig(
        width=0.1, fc_dim=32, size=64, epochs=1, batch_size=8, workers=0, device="cpu", lr_steps=(), data=str(data)
    )
    train(cfg, out=out, verbose=False)
    return out


@pytest.mark.export
def test_export_onnx_cli_runs_at_other_sizes(run, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    assert main(["export", "--run", str(run), "--format", "onnx", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["verified"]) == 3 and report["dynamic"]["height"] and report["dynamic"]["width"]
    sizes = {tuple(v["size"]) for v in report["verified"]}
    assert len(sizes) == 3
    # the exported graph really takes another size and agrees with the eager model
    model, _, _ = load_classifier(run, "cpu")
    model.eval()
    x = torch.rand(1, 3, 71, 97)
    sess = onnxruntime.InferenceSession(report["path"], providers=["CPUExecutionProvider"])
    got = sess.run(None, {report["input_name"]: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.export
def test_export_torchscript_cli(run, capsys):
    assert main(["export", "--run", str(run), "--format", "torchscript"]) == 0
    assert "verified at" in capsys.readouterr().out
    traced = torch.jit.load(str(run / "model.ts"))
    model, _, _ = load_classifier(run, "cpu")
    model.eval()
    x = torch.rand(2, 3, 83, 59)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-5)


def test_hub_builds_registered_models_and_loads_a_checkpoint(run):
    m = torch.hub.load(str(REPO), "zf5", source="local", spp=True, num_classes=7, width=0.1, fc_dim=16)
    m.eval()
    with torch.no_grad():
        assert m(torch.rand(1, 3, 64, 64)).shape == (1, 7)
        assert m(torch.rand(1, 3, 90, 140)).shape == (1, 7)
    loaded = torch.hub.load(str(REPO), "zf5", source="local", checkpoint=str(run / "model.safetensors"))
    model, classes, _ = load_classifier(run, "cpu")
    for (k1, v1), (k2, v2) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert loaded.num_classes == len(classes)
