"""``--compile`` (engine/compile.py): torch.compile of the conv layers, its eager fallback, and
saved weights without ``_orig_mod.`` keys.

The fast tests replace Inductor with Dynamo's ``eager`` backend (tracing only, no C++
build) or with a ``torch.compile`` that fails; the ``slow`` ones build real Inductor
graphs on the CPU (1-2.5 minutes each on 2 shared cores with a cold Inductor cache,
seconds with a warm one).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny_detect import make_tiny_voc, tiny_flags
from torch import nn

from sppnet.cli.main import main
from sppnet.data.synthetic import make_classification_dataset
from sppnet.engine.classify import ClassifyConfig, load_classifier, train
from sppnet.engine.common import load_weights
from sppnet.engine.compile import (
    COMPILE_CHOICES,
    CompiledModule,
    CompileWarning,
    compile_conv_layers,
    maybe_compile,
)
from sppnet.engine.detect.model import load_detector_file
from sppnet.models import get_model
from sppnet.models.detector import SPPDetector

pytestmark = pytest.mark.usefixtures("one_thread")

_REAL_COMPILE = torch.compile


def _tiny_net(**kw) -> nn.Module:
    torch.manual_seed(0)
    return get_model("overfeat5", num_classes=3, width=0.1, fc_dim=16, norm="bn", **kw)


@pytest.fixture
def eager_backend(monkeypatch):
    """``torch.compile`` with Dynamo's tracing but no code generation (seconds, no C++ compiler)."""
    calls = []

    def compile_eager(module, *, mode=None, dynamic=None, **kw):
        calls.append({"mode": mode, "dynamic": dynamic})
        return _REAL_COMPILE(module, backend="eager", dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", compile_eager)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if issubclass(w.category, CompileWarning)]


# --------------------------------------------------------------- the fallback


def test_none_is_the_module_itself_and_unknown_modes_are_named():
    layer = nn.Conv2d(3, 4, 3)
    assert maybe_compile(layer, "none") is layer
    assert COMPILE_CHOICES[0] == "none"
    with pytest.raises(
        ValueError, match="compile must be one of none, default, reduce-overhead, max-autotune, got 'fast'"
    ):
        maybe_compile(layer, "fast")
    with pytest.raises(ValueError, match="got 'fast'"):
        compile_conv_layers(_tiny_net(), "fast")


def test_torch_compile_raising_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", broken)
    layer = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 9, 11)
    wrapped, caught = _warnings_of(lambda: maybe_compile(layer, "default", "test conv"))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "test conv" in message and "RuntimeError: Dynamo is not supported on this Python" in message
    assert not wrapped.active and wrapped.error.startswith("RuntimeError")
    out, again = _warnings_of(lambda: wrapped(x))
    assert not again
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0)


def test_failure_at_the_first_call_falls_back_once_and_for_good(monkeypatch):
    """torch.compile is lazy: a missing C++ compiler shows at the first call, not at torch.compile()."""
    attempts = []

    def lazy(module, **kwargs):
        def compiled(*args):
            attempts.append(1)
            raise OSError("InvalidCxxCompiler: No working C++ compiler found\nlong traceback follows")

        return compiled

    monkeypatch.setattr(torch, "compile", lazy)
    layer = nn.Conv2d(3, 4, 3)
    wrapped = maybe_compile(layer, "max-autotune", "conv layers of tiny")
    assert isinstance(wrapped, CompiledModule) and wrapped.active
    x1, x2 = torch.randn(1, 3, 12, 12), torch.randn(2, 3, 7, 9)
    (y1, y2), caught = _warnings_of(lambda: (wrapped(x1), wrapped(x2)))
    assert len(caught) == 1 and len(attempts) == 1
    message = str(caught[0].message)
    assert message.startswith(
        "torch.compile (mode 'max-autotune') of the conv layers of tiny failed, running them eagerly"
    )
    assert "OSError: InvalidCxxCompiler: No working C++ compiler found" in message and "\n" not in message
    torch.testing.assert_close(y1, layer(x1), rtol=0, atol=0)
    torch.testing.assert_close(y2, layer(x2), rtol=0, atol=0)


def test_an_error_of_the_input_is_the_modules_own_and_compiling_stays_on(monkeypatch):
    def lazy(module, **kwargs):
        def compiled(*args):
            raise RuntimeError("compiled: shape mismatch")

        return compiled

    monkeypatch.setattr(torch, "compile", lazy)
    wrapped = maybe_compile(nn.Conv2d(3, 4, 3), "default")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        with pytest.raises(RuntimeError, match="expected input.* to have 3 channels"):
            wrapped(torch.randn(1, 5, 8, 8))
    assert wrapped.active


# ------------------------------------------------- wiring: models, state dicts


def test_conv_runner_serves_forward_and_stays_out_of_the_state_dict(eager_backend):
    net = _tiny_net().eval()
    keys = list(net.state_dict())
    x = torch.randn(2, 3, 70, 58)
    with torch.no_grad():
        want = net(x)
        assert compile_conv_layers(net, "default") is net
        runner = net.conv_runner
        assert eager_backend == [{"mode": "default", "dynamic": True}]
        got = net(x)
    torch.testing.assert_close(got, want)
    assert list(net.state_dict()) == keys and not any("_orig_mod" in k for k in net.state_dict())
    assert "conv_runner" not in dict(net.named_modules()) and runner.module is net.features
    compile_conv_layers(net, "default")
    assert net.conv_runner is runner and len(eager_backend) == 1, "the same mode keeps the compiled graph"
    compile_conv_layers(net, "none")
    assert "conv_runner" not in net.__dict__


def test_detector_conv5_maps_through_the_compiled_conv_layers(eager_backend):
    det = SPPDetector(_tiny_net(), num_classes=2, scales=(64, 80)).eval()
    keys = list(det.state_dict())
    image = det.normalize(torch.rand(3, 75, 97))
    with torch.no_grad():
        want, _ = det.feature_maps(image)
        compile_conv_layers(det.backbone, "reduce-overhead")
        got, _ = det.feature_maps(image)
    assert [m.shape for m in got] == [m.shape for m in want] and len(got) == 2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert list(det.state_dict()) == keys


@pytest.mark.parametrize("command", [["classify", "train"], ["detect", "train"]])
def test_bad_compile_values_are_refused_naming_them(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--out", str(tmp_path / "r"), "--compile", "fastest"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --compile: must be one of none, default, reduce-overhead, max-autotune, got 'fastest'" in err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------ Inductor, end to end


@pytest.mark.slow
def test_inductor_matches_eager_with_no_graph_per_size():
    """Inference: a square input's graph assumes H == W (Dynamo gives equal sizes one
    symbol), the first other size builds a general graph that every later size uses.
    Training: forward and backward equal eager's (Inductor specialises a training graph
    to its conv5 map size, so one size is checked)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    layers = nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(inplace=True),
    )
    torch._dynamo.reset()
    counters.clear()
    compiled = maybe_compile(layers, "default")
    layers.eval()
    with torch.no_grad():
        for size in ((64, 64), (83, 71), (72, 90)):
            x = torch.randn(3, 3, *size)
            torch.testing.assert_close(compiled(x), layers(x), rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2, "one graph for the square input, one for every other size"
    layers.train()
    x = torch.randn(3, 3, 67, 75)
    got = compiled(x)
    got.square().mean().backward()
    grads = [p.grad.clone() for p in layers.parameters()]
    layers.zero_grad()
    want = layers(x)
    want.square().mean().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, p in zip(grads, layers.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-5)
    assert compiled.active and compiled.error is None
    torch._dynamo.reset()


@pytest.mark.slow
def test_a_compiled_run_saves_the_weights_an_eager_run_saves(tmp_path):
    data = make_classification_dataset(
        tmp_path / "shapes", seed=2, train_per_class=2, val_per_class=1, test_per_class=0, min_size=48, max_size=80
    )
    tiny = {"width": 0.1, "fc_dim": 16, "size": 56, "epochs": 1, "batch_size": 8, "device": "cpu", "data": str(data)}
    runs = {}
    for mode in ("none", "default"):
        out = tmp_path / mode
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompileWarning)  # it compiles here: no fallback
            train(ClassifyConfig(**tiny, compile=mode), out=out, verbose=False)
        runs[mode], _ = load_weights(out / "model.safetensors")
    assert list(runs["default"]) == list(runs["none"])
    assert not any("_orig_mod" in k for k in runs["default"])
    for k, v in runs["default"].items():
        assert v.shape == runs["none"][k].shape and v.dtype == runs["none"][k].dtype
    model, classes, cfg = load_classifier(tmp_path / "default")
    assert cfg.compile == "default" and len(classes) == 8
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


@pytest.mark.slow
def test_a_compiled_detector_run_caches_the_same_conv5_and_saves_the_same_keys(tmp_path, monkeypatch):
    compiled = []

    def spy(module, **kwargs):
        compiled.append(kwargs)
        return _REAL_COMPILE(module, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    root = make_tiny_voc(tmp_path, seed=5, num_train=4, num_test=2, max_short_side=128)
    flags = tiny_flags(ft_iterations=4, max_proposals=30)
    for mode in ("none", "default"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompileWarning)
            assert (
                main(["detect", "train", "--data", str(root), "--out", str(tmp_path / mode), *flags, "--compile", mode])
                == 0
            )
    assert compiled == [{"mode": "default", "dynamic": True}], "one compile, kept from stage to stage"
    eager, fast = (load_file(tmp_path / mode / "detector.safetensors") for mode in ("none", "default"))
    assert list(fast) == list(eager) and not any("_orig_mod" in k for k in fast)
    load_detector_file(tmp_path / "default" / "detector.safetensors")
    entries = sorted((tmp_path / "none" / "cache" / "features").rglob("*.safetensors"))
    assert entries
    for path in entries:  # the same backbone, so the same cache keys; conv5 computed eagerly and compiled
        want = load_file(path)
        got = load_file(tmp_path / "default" / path.relative_to(tmp_path / "none"))
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
