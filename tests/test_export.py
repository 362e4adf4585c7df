"""Export of the SPP layer and of small SPP models with DYNAMIC height and width.

Issue 3: ONNX with dynamic H, W that runs in onnxruntime and matches eager at
sizes where adaptive pooling's output does not divide the input (10x10, 13x17,
23x9) -- which PyTorch's own adaptive pooling cannot export; ``torch.export``
and TorchScript as well. Outputs are compared with eager PyTorch by the export
functions themselves and, here, with the brute-force reference too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ops_reference import pyramid_ref
from torch import nn

import sppnet.export as export_module
import sppnet.ops.spp as spp_module
from sppnet.export import ExportMismatchError, export_onnx, export_program, export_torchscript
from sppnet.ops import SpatialPyramidPool

pytestmark = [pytest.mark.export, pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")]
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ODD_SIZES = [(10, 10), (13, 17), (23, 9)]  # n = 6, 3, 2 divide none of these sides evenly


@pytest.fixture
def flags(monkeypatch):
    """What ``_is_exporting()`` answered on each pyramid call (True: the mask formulation ran)."""
    seen = []
    real = spp_module._is_exporting
    monkeypatch.setattr(spp_module, "_is_exporting", lambda: seen.append(real()) or seen[-1])
    return seen


class TinySPPNet(nn.Module):
    """conv -> ReLU -> ceil-mode pool -> pyramid -> linear: the SPP-net shape in miniature."""

    def __init__(self, levels=(4, 2, 1)):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True))
        self.pool = SpatialPyramidPool(levels)
        self.fc = nn.Linear(self.pool.output_dim(8), 5)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)))


def images(n, c, h, w, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_spp_layer_onnx_dynamo_dynamic_hw(tmp_path, flags):
    layer = SpatialPyramidPool((6, 3, 2, 1))
    report = export_onnx(layer, tmp_path / "spp.onnx", images(2, 8, 13, 17), verify_sizes=ODD_SIZES)
    assert report["exporter"] == "dynamo" and report["fallback_reason"] is None
    assert [v["size"] for v in report["verified"]] == ODD_SIZES
    assert all(v["max_abs_err"] <= 1e-5 for v in report["verified"])
    assert True in flags and flags[-1] is False  # mask path while exporting, eager paths after
    # The graph's input really has symbolic batch, height and width ...
    dims = onnx.load(report["path"]).graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True] and dims[1].dim_value == 8
    # ... and matches the brute-force reference, also on maps smaller than the finest level.
    for n, (h, w) in zip((1, 3, 2, 4, 1), ODD_SIZES + [(2, 3), (5, 5)]):
        x = images(n, 8, h, w, seed=h * w)
        torch.testing.assert_close(run_onnx(report["path"], x), pyramid_ref(x, (6, 3, 2, 1)), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_layer_onnx_torchscript_exporter(tmp_path, mode):
    report = export_onnx(
        SpatialPyramidPool((1, 2, 3, 6), mode=mode),
        tmp_path / f"{mode}.onnx",
        images(2, 4, 13, 13),
        verify_sizes=ODD_SIZES,
        exporter="torchscript",
    )
    assert report["exporter"] == "torchscript" and report["opset"] == 17
    for h, w in ODD_SIZES + [(1, 1), (7, 4)]:
        x = images(3, 4, h, w, seed=h + w)
        want = pyramid_ref(x, (1, 2, 3, 6), mode)
        torch.testing.assert_close(run_onnx(report["path"], x), want, rtol=1e-5, atol=1e-6)


def test_tiny_model_onnx_dynamo(tmp_path):
    model = TinySPPNet()
    model.train()
    report = export_onnx(model, tmp_path / "tiny.onnx", (32, 40), verify_sizes=ODD_SIZES + [(64, 48)])
    assert model.training  # the training flag is restored
    assert report["exporter"] == "dynamo" and report["output_names"] == ["output"]
    assert all(v["max_abs_err"] <= 1e-5 for v in report["verified"])
    x = images(2, 3, 23, 9, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(report["path"], x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_auto_falls_back_to_torchscript_and_says_why(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo exporter unavailable in this test")

    monkeypatch.setattr(export_module, "_onnx_dynamo", broken)
    report = export_onnx(SpatialPyramidPool(), tmp_path / "fb.onnx", (13, 13), in_channels=2, verify_sizes=ODD_SIZES)
    assert report["exporter"] == "torchscript"
    assert report["fallback_reason"] == "RuntimeError: dynamo exporter unavailable in this test"
    with pytest.raises(RuntimeError, match="unavailable"):
        export_onnx(SpatialPyramidPool(), tmp_path / "no.onnx", (13, 13), in_channels=2, exporter="dynamo")


class BakesItsSize(nn.Module):
    """Traces to a graph that is only right at the example's size (int() of a traced shape)."""

    def forward(self, x):
        return x.mean(dim=(2, 3)) * int(x.shape[-1])


def test_verification_catches_a_size_specialised_export(tmp_path):
    with pytest.raises(ExportMismatchError, match=r"TorchScript disagrees with eager PyTorch at input size 10x10"):
        export_torchscript(BakesItsSize(), tmp_path / "bad.pt", (8, 8), in_channels=2, verify_sizes=[(8, 8), (10, 10)])
    with pytest.raises(ExportMismatchError, match=r"ONNX \(torchscript exporter\) disagrees .* at input size 10x10"):
        export_onnx(
            BakesItsSize(),
            tmp_path / "bad.onnx",
            (8, 8),
            in_channels=2,
            verify_sizes=[(8, 8), (10, 10)],
            exporter="torchscript",
        )


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_layer_torch_export(mode, flags):
    layer = SpatialPyramidPool((6, 3, 2, 1), mode=mode)
    program = export_program(layer, images(2, 4, 13, 17), verify_sizes=ODD_SIZES)
    assert True in flags  # traced through the mask formulation
    run = program.module()
    for n, (h, w) in zip((1, 2, 5, 3), ODD_SIZES + [(40, 7)]):
        x = images(n, 4, h, w, seed=n * h)
        torch.testing.assert_close(run(x), pyramid_ref(x, (6, 3, 2, 1), mode), rtol=1e-5, atol=1e-6)


def test_tiny_model_torch_export_and_save(tmp_path):
    model = TinySPPNet((3, 1))
    program = export_program(model, (20, 24), verify_sizes=ODD_SIZES, path=tmp_path / "tiny.pt2")
    loaded = torch.export.load(str(tmp_path / "tiny.pt2")).module()
    x = images(3, 3, 31, 17, seed=7)
    with torch.no_grad():
        want = model.eval()(x)
    torch.testing.assert_close(program.module()(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp_layer_torchscript_trace(tmp_path, mode, flags):
    layer = SpatialPyramidPool((1, 2, 3, 6), mode=mode)
    report = export_torchscript(layer, tmp_path / "spp.pt", images(2, 4, 13, 13), verify_sizes=ODD_SIZES)
    assert True in flags
    assert [v["size"] for v in report["verified"]] == ODD_SIZES
    traced = torch.jit.load(report["path"])
    for h, w in [(1, 1), (5, 5), (9, 30)]:
        x = images(2, 4, h, w, seed=h)
        torch.testing.assert_close(traced(x), pyramid_ref(x, (1, 2, 3, 6), mode), rtol=1e-5, atol=1e-6)


def test_tiny_model_torchscript_trace(tmp_path):
    model = TinySPPNet()
    report = export_torchscript(model, tmp_path / "tiny.pt", (32, 32), verify_sizes=ODD_SIZES + [(50, 70)])
    assert np.all([v["max_abs_err"] <= 1e-5 for v in report["verified"]])


def test_sliding_bins_export_only_at_a_fixed_size():
    layer = SpatialPyramidPool((6, 3, 2, 1), bins="sliding")  # window/stride depend on the size (Sec. 2.3)
    with pytest.raises(Exception, match="specialized it to be a constant"):
        export_program(layer, images(2, 4, 13, 13))
    program = export_program(layer, images(2, 4, 13, 13), dynamic_hw=False)
    x = images(3, 4, 13, 13, seed=3)
    torch.testing.assert_close(program.module()(x), pyramid_ref(x, (6, 3, 2, 1), bins="sliding"), rtol=0, atol=0)


def test_bad_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"exporter must be .* got 'tflite'"):
        export_onnx(SpatialPyramidPool(), tmp_path / "x.onnx", (8, 8), exporter="tflite")
    with pytest.raises(ValueError, match=r"H, W >= 2 .* got \(1, 8\)"):
        export_program(SpatialPyramidPool(), images(2, 1, 1, 8))
    with pytest.raises(ValueError, match=r"Tensor\[N, C, H, W\] or an \(H, W\) pair, got 'big'"):
        export_program(SpatialPyramidPool(), "big")
    with pytest.raises(ValueError, match=r"positive \(H, W\) pairs, got \(0, 4\)"):
        export_torchscript(SpatialPyramidPool(), tmp_path / "x.pt", (8, 8), verify_sizes=[(0, 4)])
