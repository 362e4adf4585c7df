"""Issue 18, end to end: each failure as the issue describes it, and the clear behaviour now.

1. NaN is caught: a diverging run stops naming the step and lr, keeps its last
   finite checkpoint and exits non-zero; a NaN model is refused at load.
2. One writer per run folder: two trainings into one ``--out`` at once, exactly one runs.
3. Size / aspect-ratio guards on every image path, each with its flag.
4. Degenerate data and bad settings are refused before the first proposal.
5. A batch of predictions survives its bad members.
6. The messages: ImageSets encoding, ``--out`` a file, the bomb flag, the one
   resume command after Ctrl-C, the pretraining lr step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sppnet.cli.main import main
from sppnet.data import CLASSES, VOCDetection, make_detection_dataset, write_voc_annotation
from sppnet.data.limits import get_image_limits, set_image_limits
from sppnet.data.synthetic import make_classification_dataset
from sppnet.data.transforms import resize_short_side
from sppnet.engine.classify import ClassifyConfig, load_classifier, train, training
from sppnet.engine.common import load_state, load_weights, save_weights
from sppnet.engine.config import merge_overrides
from sppnet.engine.detect import DetectConfig, build_detector, pretrain_config
from sppnet.engine.detect import train as detect_train
from sppnet.engine.detect.bbox_regression import train_box_regressors
from sppnet.engine.detect.data import training_data
from sppnet.engine.detect.model import load_detector_file, save_detector
from sppnet.engine.detect.svm import train_svms
from sppnet.models import get_model
from sppnet.utils import LOCK_NAME, NonFiniteError, RunLock, RunLockError, StaleLockWarning, non_finite_tensors

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def default_limits():
    previous = set_image_limits()
    yield
    set_image_limits(previous)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _all_finite(run: Path) -> bool:
    """Every checkpoint of a run folder (caches aside) holds finite tensors only."""
    for path in run.rglob("*.safetensors"):
        if "cache" in path.relative_to(run).parts:
            continue
        state = load_state(path)
        flat = [(k, v) for k, v in _walk(state)]
        if non_finite_tensors(flat):
            return False
    return True


def _walk(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{prefix}[{i}]")


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr + the warnings emitted)``: a skipped file may be named in either."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err + "".join(f"\n{w.message}" for w in caught)


# ---------------------------------------------------------------- data and runs

CLS_FLAGS = ["--width", "0.1", "--fc-dim", "32", "--size", "64", "--batch-size", "8", "--lr-steps", ""]
CLS_FLAGS += ["--workers", "0", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    return make_classification_dataset(
        tmp_path_factory.mktemp("cls") / "shapes",
        seed=4,
        train_per_class=2,
        val_per_class=1,
        test_per_class=0,
        min_size=48,
        max_size=64,
    )


def cls_cfg(data, **kw) -> ClassifyConfig:
    base = {"width": 0.1, "fc_dim": 32, "size": 64, "epochs": 1, "batch_size": 8, "lr_steps": ()}
    return ClassifyConfig(**{**base, "workers": 0, "device": "cpu", "data": str(data), **kw})


@pytest.fixture(scope="module")
def cls_run(cls_data, tmp_path_factory):
    """One epoch through the CLI, into a folder whose lock a dead writer left behind."""
    out = tmp_path_factory.mktemp("runs") / "cls"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 7, "host": "gone", "argv": ["sppnet"]}) + "\n")
    with pytest.warns(StaleLockWarning, match=r"taking over the lock of a writer that is gone \(PID 4194311"):
        code = main(["classify", "train", "--data", str(cls_data), "--out", str(out), "--epochs", "1", *CLS_FLAGS])
    assert code == 0
    return out


def det_root_with(root: Path, seed: int = 3, num_train: int = 6) -> Path:
    return make_detection_dataset(
        root,
        seed=seed,
        num_train=num_train,
        num_val=0,
        num_test=0,
        min_short_side=96,
        max_short_side=144,
        max_objects=3,
    )


TINY_DET = {
    "backbone": {"width": 0.125, "fc_dim": 32, "epochs": 1, "batch_size": 16},
    "features": {"size_factor": 0.25},
    "finetune": {"iterations": 12, "lr_steps": (), "checkpoint_every": 4},
    "proposals": {"max_proposals": 60},
    "workers": 0,
    "device": "cpu",
}


def det_cfg(root, overrides=None) -> DetectConfig:
    return DetectConfig.from_preset("small", merge_overrides(TINY_DET, overrides), data=str(root))


@pytest.fixture(scope="module")
def det_root(tmp_path_factory):
    return det_root_with(tmp_path_factory.mktemp("det") / "voc")


@pytest.fixture(scope="module")
def det_proposals(det_root, tmp_path_factory):
    """A detection run stopped after its proposals (copied by the tests that continue it)."""
    out = tmp_path_factory.mktemp("detruns") / "base"
    detect_train(det_cfg(det_root), out=out, verbose=False, stop_after="proposals")
    return out


@pytest.fixture(scope="module")
def det_model(det_root, tmp_path_factory):
    """An untrained detector saved as a finished run: enough for predict's input handling."""
    run = tmp_path_factory.mktemp("detmodel") / "run"
    run.mkdir()
    cfg = det_cfg(det_root)
    torch.manual_seed(0)
    save_detector(run / "detector.safetensors", build_detector(cfg, len(CLASSES)), CLASSES, cfg, "final")
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    return run


# ------------------------------------------------------------------ 1. NaN


def test_classify_loss_turning_nan_stops_and_keeps_the_last_finite_checkpoint(cls_data, tmp_path, monkeypatch):
    # Issue: the loss went NaN from epoch 5, the NaN model was saved and the run printed `done`.
    calls = {"n": 0}
    real = F.cross_entropy
    cfg = cls_cfg(cls_data, epochs=3)
    per_batch = 2 if cfg.aux_weight > 0 else 1  # the auxiliary classifier's loss is a second call

    def nan_from_third_batch(*args, **kwargs):  # 16 images, batches of 8: batch 1 of epoch 2
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * math.nan if calls["n"] > 2 * per_batch else loss

    monkeypatch.setattr(F, "cross_entropy", nan_from_third_batch)
    out = tmp_path / "run"
    with pytest.raises(
        NonFiniteError, match=r"training loss in epoch 2, batch 1 is nan at step 3 with lr [0-9.e-]+: training diverged"
    ) as e:
        train(cfg, out=out, verbose=False)
    assert f"{out / 'last.safetensors'} holds the last finite state" in str(e.value) and "lower --lr" in str(e.value)
    assert load_state(out / "last.safetensors")["epoch"] == 1
    assert load_weights(out / "model.safetensors")[1]["epoch"] == 1
    assert _all_finite(out)
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 2  # header + epoch 1


def test_classify_train_at_a_diverging_lr_exits_non_zero_and_saves_no_nan(cls_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        ["classify", "train", "--data", str(cls_data), "--out", str(out), "--epochs", "2", *CLS_FLAGS, "--lr", "1e5"]
    )
    captured = capsys.readouterr()
    assert code == 2 and "done" not in captured.out
    assert "training diverged" in captured.err and "with lr 100000" in captured.err and "Traceback" not in captured.err
    assert _all_finite(out)  # model.safetensors, if an epoch finished before the divergence, is that epoch's


def test_a_nan_model_is_refused_at_load_and_predict_prints_no_nan(cls_run, cls_data, tmp_path, capsys):
    # Issue: `classify predict` printed nan probabilities and `--json` a bare NaN.
    state, meta = load_weights(cls_run / "model.safetensors")
    model = get_model(meta["model"], **meta["model_config"])
    model.load_state_dict(state)
    with torch.no_grad():
        model.classifier.weight[0, :3] = math.nan
    bad = tmp_path / "bad"
    bad.mkdir()
    save_weights(bad / "model.safetensors", model, meta)
    with pytest.raises(
        NonFiniteError, match=r"weights in .*model.safetensors hold NaN or inf: classifier.weight \(3 of"
    ):
        load_classifier(bad)
    image = min(p for p in (cls_data / "val").rglob("*") if p.is_file())
    assert main(["classify", "predict", "--run", str(bad), str(image), "--json", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "hold NaN or inf" in captured.err and "lower --lr" in captured.err


def test_a_nan_detector_is_refused_at_load(det_model, tmp_path):
    _, meta = load_weights(det_model / "detector.safetensors")
    detector, _ = load_detector_file(det_model / "detector.safetensors")
    with torch.no_grad():
        detector.cls_score.bias[1] = math.inf
    cfg = DetectConfig.from_dict(meta["config"])
    save_detector(tmp_path / "d.safetensors", detector, meta["classes"], cfg, "final")
    with pytest.raises(NonFiniteError, match=r"hold NaN or inf: cls_score.bias \(1 of"):
        load_detector_file(tmp_path / "d.safetensors")


def test_detect_fine_tuning_divergence_stops_before_any_nan_is_saved(det_proposals, tmp_path, monkeypatch):
    # Issue: `detect train` ended with `done` on a diverged run; only `detect val` failed later.
    out = tmp_path / "run"
    shutil.copytree(det_proposals, out)
    detect_train(None, out=out, resume=True, verbose=False, stop_after="features")
    calls = {"n": 0}
    real = F.cross_entropy

    def nan_from_sixth(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * math.nan if calls["n"] >= 6 else loss

    monkeypatch.setattr(F, "cross_entropy", nan_from_sixth)
    with pytest.raises(NonFiniteError, match=r"fine-tuning loss is nan at step 6 with lr 0.02: .*lower --ft-lr"):
        detect_train(None, out=out, resume=True, verbose=False)
    assert not (out / "stages" / "finetune.safetensors").exists() and not (out / "detector.safetensors").exists()
    assert load_state(out / "finetune_last.safetensors")["iteration"] == 4  # the last finite checkpoint
    assert _all_finite(out)


def test_svm_and_box_regression_refuse_non_finite_features():
    x = torch.randn(6, 5)
    x[2, 1] = math.nan
    with pytest.raises(NonFiniteError, match=r"the box regressor of class 0 is 20 NaN of 20 values"):
        train_box_regressors([x], [torch.randn(6, 4)], 1.0, lam=1.0)
    feats = torch.randn(4, 5)
    feats[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"the fc7 features of class 0's SVM is"):
        train_svms(1, lambda i: feats, [torch.zeros(4, 1)], [torch.tensor([0, -1, -1, -1])], 1)


@pytest.mark.parametrize(
    "command, flag, value, message",
    [
        ("classify", "--lr", "nan", "must be a finite number, got nan"),
        ("classify", "--momentum", "inf", "must be a finite number, got inf"),
        ("classify", "--max-aspect-ratio", "0.5", "must be >= 1, got 0.5"),
        ("detect", "--ft-lr", "nan", "must be a finite number, got nan"),
        ("detect", "--bbox-lambda", "nan", "must be a finite number, got nan"),
        ("detect", "--pretrain-lr", "inf", "must be a finite number, got inf"),
        ("detect", "--ft-lr", "-1", "must be > 0, got -1.0"),
        ("detect", "--svm-c", "-1", "must be > 0, got -1.0"),
        ("detect", "--max-search-pixels", "0", "must be >= 1, got 0"),
    ],
)
def test_every_float_option_is_checked_where_it_is_parsed(command, flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "train", "--out", str(tmp_path / "r"), flag, value])
    assert e.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------- 2. the lock


def test_two_trainings_into_one_folder_exactly_one_runs(cls_data, tmp_path):
    # Issue: both exited 0; config.json described one model, model.safetensors held the other.
    out = tmp_path / "shared"

    def command(fc_dim: str) -> list[str]:
        flags = [*CLS_FLAGS]
        flags[flags.index("--fc-dim") + 1] = fc_dim
        return [sys.executable, "-m", "sppnet", "classify", "train", "--data", str(cls_data), "--out", str(out)] + [
            "--epochs",
            "3",
            *flags,
        ]

    procs = {
        dim: subprocess.Popen(command(dim), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for dim in ("24", "40")
    }
    outputs = {dim: p.communicate(timeout=600) for dim, p in procs.items()}
    results = {dim: (procs[dim].returncode, *outputs[dim]) for dim in procs}
    winners = [dim for dim, (code, _, _) in results.items() if code == 0]
    assert len(winners) == 1, results
    winner = winners[0]
    loser = "40" if winner == "24" else "24"
    code, _, err = results[loser]
    assert code == 2 and f"{out} is in use by another writer: PID {procs[winner].pid}" in err
    assert "Traceback" not in err
    config = ClassifyConfig.from_dict(json.loads((out / "config.json").read_text()))
    _, meta = load_weights(out / "model.safetensors")
    assert config.fc_dim == int(winner) and ClassifyConfig.from_dict(meta["config"]) == config
    model, _, _ = load_classifier(out)
    assert model.fc[0].out_features == int(winner)
    assert (out / LOCK_NAME).read_text() == ""  # released
    assert main(["classify", "train", "--out", str(out), "--resume", "--quiet"]) == 0  # consistent: resumes


def test_a_held_folder_is_refused_naming_the_holder_and_nothing_is_written(cls_data, det_root, tmp_path):
    for name, run in (
        ("cls", lambda out: train(cls_cfg(cls_data), out=out, verbose=False)),
        ("det", lambda out: detect_train(det_cfg(det_root), out=out, verbose=False)),
    ):
        out = tmp_path / name
        refused = pytest.raises(RunLockError, match=rf"{out} is in use by another writer: PID {os.getpid()} ")
        with RunLock(out), refused:
            run(out)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


# ---------------------------------------------------------------- 3. limits


def test_detect_predict_refuses_a_thin_strip_up_front(det_model, tmp_path, capsys):
    # Issue: a 200 KB 20000x10 PNG ran selective search for over 3 minutes at 5 GB.
    strip = tmp_path / "strip.png"
    Image.new("RGB", (20000, 10), (200, 30, 30)).save(strip)
    t0 = time.monotonic()
    argv = ["detect", "predict", "--run", str(det_model), str(strip), "--out", str(tmp_path / "p"), "--device", "cpu"]
    code, _, err = _run_cli(argv, capsys)
    assert code != 0 and time.monotonic() - t0 < 60
    assert str(strip) in err and "aspect ratio 2000.0" in err and "--max-aspect-ratio" in err


def test_classify_predict_limits_follow_their_flags(cls_run, tmp_path, capsys):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (90, 30), (0, 90, 0)).save(wide)  # aspect ratio 3
    assert main(["classify", "predict", "--run", str(cls_run), str(wide), "--device", "cpu"]) == 0
    assert main(["classify", "predict", "--run", str(cls_run), str(wide), "--max-aspect-ratio", "2"]) == 2
    err = capsys.readouterr().err
    assert str(wide) in err and "exceeds the limit of 2" in err and "--max-aspect-ratio" in err
    assert get_image_limits().max_aspect_ratio == 2  # the flag set the process-wide limit


def test_the_limits_are_saved_with_the_run_and_kept_by_resume(cls_run, cls_data, tmp_path):
    assert json.loads((cls_run / "config.json").read_text())["limits"]["max_aspect_ratio"] == 20.0
    out = tmp_path / "run"
    train(cls_cfg(cls_data).with_overrides({"limits.max_aspect_ratio": 30.0}), out=out, verbose=False)
    assert get_image_limits().max_aspect_ratio == 20  # restored after the run
    saved = ClassifyConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert saved.limits.max_aspect_ratio == 30.0
    assert saved.check_resume(None).limits.max_aspect_ratio == 30.0
    raised = saved.check_resume(saved.with_overrides({"limits.max_aspect_ratio": 40.0, "epochs": 2}))
    assert (raised.limits.max_aspect_ratio, raised.epochs) == (40.0, 2)  # a limit may be raised on resume


def test_resize_short_side_uses_the_process_limit_and_names_its_flag():
    strip = Image.new("RGB", (300, 10))
    with pytest.raises(ValueError, match=r"aspect ratio 30.0, above the limit of 20; raise it with --max-aspect-ratio"):
        resize_short_side(strip, 8)
    set_image_limits(max_aspect_ratio=40)
    assert resize_short_side(strip, 8).size == (240, 8)


def _replace_image(root: Path, image_id: str, size: tuple[int, int], stated: tuple[int, int] | None = None) -> Path:
    """Swaps image ``image_id`` of a VOC tree for a plain one of ``size`` (annotation states ``stated``)."""
    path = root / "JPEGImages" / f"{image_id}.jpg"
    Image.new("RGB", size, (120, 60, 30)).save(path)
    objects = [{"name": CLASSES[0], "box": (2, 2, min(size) - 2, min(size) - 2)}]
    write_voc_annotation(root / "Annotations" / f"{image_id}.xml", path.name, stated or size, objects)
    return path


def test_a_strip_in_a_training_folder_is_skipped_by_name_before_any_proposal(tmp_path, capsys):
    # Issue: inside a training folder the strip aborted training without naming the file.
    root = det_root_with(tmp_path / "voc", seed=6)
    ids = (root / "ImageSets" / "Main" / "train.txt").read_text().split()
    strip = _replace_image(root, ids[0], (2100, 100))
    with pytest.warns(UserWarning, match=rf"{strip}.*aspect ratio 21.0 exceeds the limit of 20.*--max-aspect-ratio"):
        records, _ = training_data(det_cfg(root))
    assert len(records) == len(ids) - 1 and str(strip) not in [r["image_path"] for r in records]
    assert "1 too elongated" in capsys.readouterr().err
    cfg = det_cfg(root, {"limits": {"max_aspect_ratio": 25.0}})
    assert len(training_data(cfg, verbose=False)[0]) == len(ids)  # the flag lets it in


# ------------------------------------------------- 4. validate before work


def test_an_image_folder_with_one_class_is_an_error(tmp_path, capsys):
    # Issue: trained to `done` with accuracy 1.000.
    for i in range(3):
        (tmp_path / "data" / "train" / "cat").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(tmp_path / "data" / "train" / "cat" / f"{i}.png")
    out = tmp_path / "run"
    assert main(["classify", "train", "--data", str(tmp_path / "data"), "--out", str(out), *CLS_FLAGS]) == 2
    err = capsys.readouterr().err
    assert "a classifier needs at least 2 classes, got 1 ('cat')" in err and "accuracy is 1.0 by construction" in err
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()


def _coco(root: Path, crowd: list[int]) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (120, 100), (20, 90, 160)).save(images / name)
    data = {
        "images": [
            {"id": i + 1, "file_name": n, "width": 120, "height": 100} for i, n in enumerate(("a.jpg", "b.jpg"))
        ],
        "annotations": [
            {"id": k + 1, "image_id": k % 2 + 1, "category_id": k % 2 + 1, "bbox": [10, 10, 40, 30], "iscrowd": c}
            for k, c in enumerate(crowd)
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (root / "ann.json").write_text(json.dumps(data))
    return images, root / "ann.json"


@pytest.mark.parametrize(
    "crowd, message",
    [
        ([1, 1, 1], "no positive examples: all 3 objects are difficult (VOC) or crowd (COCO iscrowd=1)"),
        ([], "has no objects: the annotations list none"),
    ],
)
def test_degenerate_coco_data_is_an_error_before_any_proposal(crowd, message, tmp_path, capsys):
    # Issue: all-crowd boxes trained to `done` with zero SVM positives; an empty annotation
    # list was found only after proposals and backbone pretraining.
    images, ann = _coco(tmp_path, crowd)
    out = tmp_path / "run"
    argv = ["detect", "train", "--format", "coco", "--data", str(images), "--ann", str(ann), "--out", str(out)]
    assert main([*argv, "--workers", "0", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "detection split 'ann.json'" in err and "'train'" not in err  # COCO has no splits: the file is named
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # no config.json, no proposals


def test_an_annotation_size_that_disagrees_with_its_image_is_skipped_before_any_proposal(tmp_path, capsys):
    root = det_root_with(tmp_path / "voc", seed=7)
    ids = (root / "ImageSets" / "Main" / "train.txt").read_text().split()
    wrong = _replace_image(root, ids[1], (120, 100), stated=(100, 120))
    with pytest.warns(UserWarning, match=rf"{wrong}.*the annotation says 100x120 pixels but the image is 120x100"):
        records, _ = training_data(det_cfg(root))
    assert len(records) == len(ids) - 1
    assert "1 size mismatch" in capsys.readouterr().err


def test_scales_too_small_for_the_network_are_refused_before_any_proposal(det_root, tmp_path, capsys):
    # Issue: `--scales 10` failed only after proposals and backbone pretraining.
    out = tmp_path / "run"
    argv = ["detect", "train", "--data", str(det_root), "--out", str(out), "--scales", "10", "--device", "cpu"]
    assert main([*argv, "--workers", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "these settings cannot build the detector: scales must be short sides >= " in err
    assert "(image scales are --scales x --size = [5] pixels)" in err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


# ------------------------------------------------- 5. batches survive bad members


def test_classify_predict_skips_an_unreadable_image_and_writes_the_good_ones(cls_run, cls_data, tmp_path, capsys):
    # Issue: one unreadable image made `classify predict` write nothing for any of them.
    good = sorted(p for p in (cls_data / "val").rglob("*") if p.is_file())[:2]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    argv = ["classify", "predict", "--run", str(cls_run), str(good[0]), str(broken), str(good[1]), "--json"]
    code, out, err = _run_cli(argv, capsys)
    assert code == 0 and [p["image"] for p in json.loads(out)] == [str(good[0]), str(good[1])]
    assert str(broken) in err
    code, out, err = _run_cli(["classify", "predict", "--run", str(cls_run), str(broken)], capsys)
    assert code != 0 and out == "" and "broken.jpg" in err


def test_detect_predict_skips_an_unreadable_image_and_writes_the_good_ones(det_model, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.new("RGB", (60, 48), (30, 160, 60)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    out = tmp_path / "pred"
    argv = ["detect", "predict", "--run", str(det_model), str(broken), str(good), "--out", str(out), "--json"]
    code, printed, err = _run_cli(argv, capsys)
    assert code == 0 and [Path(r["image"]).name for r in json.loads(printed)] == ["good.png"]
    assert (out / "good.json").is_file() and not (out / "broken.json").exists() and str(broken) in err


# ---------------------------------------------------------------- 6. messages


def test_imagesets_encoding_problems_name_the_file(tmp_path):
    root = det_root_with(tmp_path / "voc", seed=8, num_train=3)
    listing = root / "ImageSets" / "Main" / "train.txt"
    ids = listing.read_text().split()
    listing.write_bytes(b"\xef\xbb\xbf" + "\n".join(ids).encode())  # a BOM: the first id was dropped
    assert len(VOCDetection(root, "train", classes=CLASSES).records) == len(ids)
    listing.write_bytes(b"\xff\xfe" + "\n".join(ids).encode("utf-16-le"))
    with pytest.raises(ValueError, match=rf"{listing}"):
        VOCDetection(root, "train", classes=CLASSES)


@pytest.mark.parametrize("command", ["classify", "detect"])
def test_an_existing_file_as_out_is_a_one_line_error(command, tmp_path, capsys):
    # Issue: a FileExistsError traceback.
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert main([command, "train", "--out", str(target), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{target} is an existing file, not a run folder; choose another --out" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and target.read_text() == "keep me"


def test_the_decompression_bomb_refusal_names_the_flag(cls_run, tmp_path, capsys):
    # Issue: the refusal pointed to a Python function, not a CLI flag.
    image = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(image)
    assert main(["classify", "predict", "--run", str(cls_run), str(image), "--max-image-pixels", "1000"]) == 2
    err = capsys.readouterr().err
    assert "40x40 = 1600 pixels exceeds the limit of 1000; raise it with --max-image-pixels" in err


def test_ctrl_c_in_backbone_pretraining_prints_only_the_detect_resume_command(
    det_root, det_proposals, tmp_path, capsys, monkeypatch
):
    # Issue: two resume commands, the first (`sppnet classify train --out RUN/backbone --resume`) wrong.
    out = tmp_path / "run"
    shutil.copytree(det_proposals / "cache", out / "cache")  # the same proposals, not searched again
    monkeypatch.setattr(training, "_stop_requested", lambda interrupt, ctx: True)  # Ctrl-C at the first batch
    flags = ["--width", "0.125", "--fc-dim", "32", "--size", "0.25", "--pretrain-epochs", "1", "--pretrain-batch", "2"]
    flags += ["--max-proposals", "60", "--workers", "0", "--device", "cpu", "--quiet"]
    assert main(["detect", "train", "--data", str(det_root), "--out", str(out), *flags]) == 130
    err = capsys.readouterr().err
    assert "interrupted in epoch 1 after batch 1: checkpoint written to" in err
    assert [line for line in err.splitlines() if "resume with" in line] == [
        f"resume with: sppnet detect train --out {out} --resume"
    ]
    assert (out / "backbone" / "last.safetensors").is_file()


@pytest.mark.parametrize("epochs, steps", [(1, (1, 1)), (2, (1, 1)), (6, (5, 5)), (12, (10, 11))])
def test_pretraining_never_divides_the_lr_before_its_second_epoch(epochs, steps):
    # Issue: `--pretrain-epochs 1` ran its one epoch at 1/100 of the lr (the step epoch was 0).
    cfg = pretrain_config(DetectConfig.from_preset("small", {"backbone": {"epochs": epochs}}))
    assert cfg.lr_steps == steps and cfg.lr_at(0) == cfg.lr
