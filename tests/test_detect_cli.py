"""``sppnet detect train | val | predict`` on a tiny built-in data set, and SIGKILL + --resume."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from tiny_detect import tiny_detector_fixture, tiny_flags, tiny_voc_fixture

from sppnet.cli.main import main
from sppnet.engine.common import load_weights

TINY_FLAGS = tiny_flags(ft_iterations=16, max_proposals=80)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

tiny_root = tiny_voc_fixture(seed=5, num_train=8, max_short_side=144, max_objects=3)
cli_run = tiny_detector_fixture("cli_run", TINY_FLAGS)


def test_train_then_val_json(cli_run, capsys):
    capsys.readouterr()
    assert main(["detect", "val", "--run", str(cli_run), "--split", "test", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"mAP", "ap", "images", "seconds_per_image"}
    assert isinstance(result["mAP"], float) and 0.0 <= result["mAP"] <= 1.0
    assert result["images"] == 3 and result["seconds_per_image"] > 0
    assert all(v is None or 0.0 <= v <= 1.0 for v in result["ap"].values())
    saved = json.loads((cli_run / "config.json").read_text())
    assert saved["backbone"]["width"] == 0.125 and saved["features"]["size_factor"] == 0.25
    assert saved["preset"] == "small" and saved["finetune"]["iterations"] == 16
    # no usable val split here (the tiny set has none): the calibration stage is
    # recorded as done and predict falls back to the SVMs' 0
    assert (cli_run / "stages" / "calibrate.json").is_file()
    assert not (cli_run / "thresholds.json").exists()


def test_val_with_truncated_svd_fc(cli_run, capsys):
    # At full rank (fc_dim 32) the factorised fc6 / fc7 are the same maps: same
    # mAP. A low rank still runs; a bad rank is a user error.
    def val(*extra):
        capsys.readouterr()
        code = main(["detect", "val", "--run", str(cli_run), "--json", "--device", "cpu", *extra])
        return code, capsys.readouterr()

    code, plain = val()
    assert code == 0
    code, full = val("--svd-rank", "32")
    assert code == 0
    assert abs(json.loads(full.out)["mAP"] - json.loads(plain.out)["mAP"]) < 1e-3
    code, low = val("--svd-rank", "4", "8")
    assert code == 0 and 0.0 <= json.loads(low.out)["mAP"] <= 1.0
    code, bad = val("--svd-rank", "0")
    assert code == 2 and "--svd-rank" in bad.err and "Traceback" not in bad.err


def test_val_save_json_is_read_by_pycocotools_with_the_ap_of_metric_coco(cli_run, tmp_path, capsys):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results, truth = tmp_path / "dets.json", tmp_path / "gt.json"
    capsys.readouterr()
    argv = ["detect", "val", "--run", str(cli_run), "--metric", "coco", "--json", "--device", "cpu"]
    assert main([*argv, "--save-json", str(results), "--save-coco-gt", str(truth)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["results_json"] == str(results) and 0.0 <= printed["mAP"] <= 1.0
    saved = json.loads(results.read_text())
    assert saved and all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in saved)
    assert all(r["bbox"][2] > 0 and r["bbox"][3] > 0 for r in saved)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(truth))
        evaluator = COCOeval(gt, gt.loadRes(str(results)), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    assert len(gt.getImgIds()) == printed["images"]
    precision = evaluator.eval["precision"][:, :, :, 0, 2]  # [IoU, recall, class] at area "all", 100 detections
    names = [c["name"] for c in gt.loadCats(gt.getCatIds())]
    assert names == list(printed["ap"])
    for k, name in enumerate(names):
        p = precision[:, :, k]
        p = p[p > -1]
        expected = float(p.mean()) if p.size else None
        if expected is None:
            assert printed["ap"][name] is None
        else:
            assert printed["ap"][name] == pytest.approx(expected, abs=1e-9), name
    # the VOC07 metric is the default and gives its own number
    assert main(["detect", "val", "--run", str(cli_run), "--json", "--device", "cpu"]) == 0
    assert "AP50" not in json.loads(capsys.readouterr().out)


def test_predict_writes_a_png_and_a_json_per_image(cli_run, tiny_root, tmp_path, capsys):
    images = sorted((tiny_root / "JPEGImages").glob("*.jpg"))[-2:]
    out = tmp_path / "pred"
    capsys.readouterr()
    code = main(
        [
            "detect",
            "predict",
            "--run",
            str(cli_run),
            *map(str, images),
            "--out",
            str(out),
            "--score-threshold=-1e9",
            "--json",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed) == 2
    for image, entry in zip(images, printed):
        png, js = out / f"{image.stem}.png", out / f"{image.stem}.json"
        assert png.is_file() and js.is_file()
        with Image.open(png) as drawn, Image.open(image) as original:
            assert drawn.size == original.size
            # boxes were drawn: the picture differs from the input
            assert drawn.convert("RGB").tobytes() != original.convert("RGB").tobytes()
        saved = json.loads(js.read_text())
        assert saved["image"] == str(image) and saved["width"] == entry["width"]
        labels = [d["label_index"] for d in saved["detections"]]
        assert 0 < len(labels) and max(labels.count(c) for c in labels) <= 100  # 100 per class (spp_test.m)
        d = saved["detections"][0]
        assert set(d) == {"box", "label", "label_index", "score"} and len(d["box"]) == 4


def test_calibrate_then_predict_keeps_detections_above_each_class_threshold(cli_run, tiny_root, tmp_path, capsys):
    capsys.readouterr()
    code = main(["detect", "calibrate", "--run", str(cli_run), "--split", "test", "--json", "--device", "cpu"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((cli_run / "thresholds.json").read_text())
    assert printed == saved and saved["split"] == "test" and saved["images"] == 3 and saved["scorer"] == "svm"
    classes = list(saved["thresholds"])
    for name, point in saved["operating_points"].items():  # a class without a point keeps the SVMs' 0
        assert saved["thresholds"][name] == (point["threshold"] if point["threshold"] is not None else 0.0)

    images = sorted((tiny_root / "JPEGImages").glob("*.jpg"))[-3:]

    def predict(*extra):
        capsys.readouterr()
        code = main(
            [
                "detect",
                "predict",
                "--run",
                str(cli_run),
                *map(str, images),
                "--out",
                str(tmp_path / "p"),
                "--json",
                "--device",
                "cpu",
                *extra,
            ]
        )
        return code, capsys.readouterr()

    code, calibrated = predict()
    assert code == 0
    code, everything = predict("--score-threshold=-1e9")
    assert code == 0
    for cal, all_ in zip(json.loads(calibrated.out), json.loads(everything.out)):
        assert cal["score_threshold"] == saved["thresholds"] and all_["score_threshold"] == -1e9
        kept = {(d["label"], d["score"], tuple(d["box"])) for d in cal["detections"]}
        assert all(score > saved["thresholds"][label] for label, score, _ in kept)
        # the ones above their class's cut in the unfiltered output are all there
        above = {
            (d["label"], d["score"], tuple(d["box"]))
            for d in all_["detections"]
            if d["score"] > saved["thresholds"][d["label"]]
        }
        assert above <= kept
    # one threshold per class on the command line; a wrong count names it
    code, _ = predict("--score-threshold", *["-1000"] * len(classes))
    assert code == 0
    code, bad = predict("--score-threshold", "0", "1")
    assert code == 2 and f"one value per class ({len(classes)}" in bad.err and "Traceback" not in bad.err


def test_user_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["detect", "val", "--run", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert main(["detect", "train", "--out", str(tmp_path / "r"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--ft-lr", "nan", "argument --ft-lr: must be a finite number, got nan"),
        ("--bbox-lambda", "nan", "argument --bbox-lambda: must be a finite number, got nan"),
        ("--svm-c", "-1", "argument --svm-c: must be > 0, got -1.0"),
        ("--ft-lr", "-1", "argument --ft-lr: must be > 0, got -1.0"),
        ("--scales", "0", "argument --scales: must be >= 1, got 0"),
    ],
)
def test_bad_values_are_refused_where_they_are_parsed(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["detect", "train", "--out", str(tmp_path / "r"), flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_help_lists_the_paper_options(capsys):
    with pytest.raises(SystemExit):
        main(["detect", "train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--method",
        "--scales",
        "--size",
        "--finetune",
        "--scorer",
        "--backbone",
        "--resume",
        "--strict",
        "--calibrate-split",
        "--ft-lr",
        "--svm-c",
        "--bbox-lambda",
        "--pretrain-epochs",
        "--ft-iterations",
        "--max-proposals",
    ):
        assert flag in text
    flat = " ".join(text.split())
    assert "network (registry name) (default zf5)" in flat  # the default the presets use
    assert (
        "fine-tuning learning rate; none: 0.02 for --finetune fc, 0.003 for all or with --weights "
        "(small 0.02, paper 0.0001)" in flat
    )
    with pytest.raises(SystemExit):
        main(["detect", "calibrate", "--help"])
    assert "thresholds.json" in capsys.readouterr().out


# --------------------------------------------------------------- SIGKILL


def _train_cmd(root, out, resume=False):
    flags = tiny_flags(ft_iterations=60, max_proposals=80)
    cmd = [sys.executable, "-m", "sppnet", "detect", "train", "--data", str(root), "--out", str(out), *flags]
    return cmd + ["--seed", "3"] + (["--resume"] if resume else [])


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_same_detector(tiny_root, tmp_path):
    ref = tmp_path / "reference"
    t0 = time.monotonic()
    subprocess.run(_train_cmd(tiny_root, ref), env=_env(), check=True, capture_output=True)
    duration = time.monotonic() - t0

    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    resume = False
    for _ in range(3):
        proc = subprocess.Popen(
            _train_cmd(tiny_root, out, resume), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            proc.wait(timeout=rng.uniform(0.1, 0.8) * duration)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
        resume = (out / "config.json").is_file()
        if (out / "detector.safetensors").is_file():
            break
    if not (out / "detector.safetensors").is_file():
        subprocess.run(
            _train_cmd(tiny_root, out, resume=(out / "config.json").is_file()),
            env=_env(),
            check=True,
            capture_output=True,
        )
    assert kills >= 1
    a, _ = load_weights(ref / "detector.safetensors")
    b, _ = load_weights(out / "detector.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------------------ feature cache


def test_feature_cache_modes_and_float16_storage(cli_run):
    from sppnet.engine.detect import DetectConfig, load_detector, training_set
    from sppnet.engine.detect.features import FeatureCache

    detector, _, cfg = load_detector(cli_run, "cpu")
    records, windows, _ = training_set(cfg, cli_run, verbose=False)
    index = [torch.arange(min(len(w), 25)) for w in windows]

    def cache(mode, dtype="float32", root=None):
        return FeatureCache(detector, records, windows, root or cli_run / "cache" / "features", mode=mode, dtype=dtype)

    disk = cache("disk")
    assert disk.complete()  # filled by the run
    reference = [disk.pool5(i, index[i], flip=True) for i in range(len(records))]
    for mode in ("memory", "none"):
        c = cache(mode)
        assert c.ensure() == (len(records) if mode == "memory" else 0) and c.complete()
        for i in range(len(records)):  # the same conv5, stored elsewhere or recomputed: the same numbers
            torch.testing.assert_close(c.pool5(i, index[i], flip=True), reference[i], rtol=0, atol=0)
    # the size estimate (nothing run) is the size of the entries, float16 half of float32
    entries = [disk.compute(i) for i in range(len(records))]
    actual = sum(t.numel() * t.element_size() for e in entries for t in e.values())
    assert disk.estimate_bytes() == actual
    half = cache("memory", "float16")
    assert half.estimate_bytes() * 2 == actual
    half.ensure()
    assert sum(t.numel() * t.element_size() for e in half._lru.values() for t in e.values()) * 2 == actual
    for i in range(len(records)):
        torch.testing.assert_close(half.pool5(i, index[i], flip=True), reference[i], rtol=1e-2, atol=1e-2)
    assert half.key(0) != disk.key(0)  # float16 entries never stand in for float32 ones
    assert isinstance(DetectConfig().features.cache, str)


def test_train_without_a_feature_cache_gives_the_same_detector(cli_run, tiny_root, tmp_path):
    out = tmp_path / "nocache"
    argv = ["detect", "train", "--data", str(tiny_root), "--out", str(out), *TINY_FLAGS, "--feature-cache", "none"]
    assert main(argv) == 0
    assert not list((out / "cache" / "features").rglob("*.safetensors"))  # nothing stored
    a, _ = load_weights(cli_run / "detector.safetensors")
    b, _ = load_weights(out / "detector.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------------ mixed precision


def test_amp_is_a_no_op_on_the_cpu(cli_run, capsys):
    def val(*extra):
        capsys.readouterr()
        assert main(["detect", "val", "--run", str(cli_run), "--json", "--device", "cpu", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    plain, bf16 = val(), val("--amp", "bf16")
    assert plain["mAP"] == bf16["mAP"] and plain["ap"] == bf16["ap"]
    with pytest.raises(SystemExit):
        main(["detect", "val", "--run", str(cli_run), "--amp", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cuda_trains_and_detects_like_full_precision(amp, tiny_root, tmp_path, capsys):
    from sppnet.engine.amp import autocast_context
    from sppnet.ops import spatial_pyramid_pool

    # the pyramid runs in its input's dtype under autocast, and max pooling is exact there
    x = torch.randn(2, 8, 13, 17, device="cuda")
    with autocast_context("cuda", amp):
        pooled = spatial_pyramid_pool(x.to(torch.bfloat16 if amp == "bf16" else torch.float16), (1, 2, 3, 6))
    assert pooled.dtype == (torch.bfloat16 if amp == "bf16" else torch.float16)
    torch.testing.assert_close(pooled.float(), spatial_pyramid_pool(x, (1, 2, 3, 6)), rtol=1e-2, atol=1e-2)

    flags = [f if f != "cpu" else "cuda" for f in TINY_FLAGS]
    runs = {}
    for mode in ("none", amp):
        out = tmp_path / mode
        assert main(["detect", "train", "--data", str(tiny_root), "--out", str(out), *flags, "--amp", mode]) == 0
        capsys.readouterr()
        assert main(["detect", "val", "--run", str(out), "--json", "--device", "cuda", "--amp", mode]) == 0
        runs[mode] = json.loads(capsys.readouterr().out)
    weights, _ = load_weights(tmp_path / amp / "detector.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert abs(runs[amp]["mAP"] - runs["none"]["mAP"]) < 0.1
