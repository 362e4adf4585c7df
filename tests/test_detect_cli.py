"""``sppnet detect train | val | predict`` on a tiny built-in data set, and SIGKILL + --resume."""

from __future__ import annotations

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

from sppnet.cli.main import main
from sppnet.data import make_detection_dataset
from sppnet.engine.common import load_weights

TINY_FLAGS = [
    "--width",
    "0.125",
    "--fc-dim",
    "32",
    "--size",
    "0.25",
    "--pretrain-epochs",
    "1",
    "--ft-iterations",
    "16",
    "--workers",
    "0",
    "--max-proposals",
    "80",
    "--device",
    "cpu",
    "--quiet",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_detection_dataset(
        tmp_path_factory.mktemp("data") / "voc",
        seed=5,
        num_train=8,
        num_val=0,
        num_test=3,
        min_short_side=96,
        max_short_side=144,
        max_objects=3,
    )


@pytest.fixture(scope="module")
def cli_run(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "det"
    assert main(["detect", "train", "--data", str(tiny_root), "--out", str(out), *TINY_FLAGS]) == 0
    return out


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
    assert "fine-tuning learning rate (small 0.003, paper 0.0001)" in flat
    with pytest.raises(SystemExit):
        main(["detect", "calibrate", "--help"])
    assert "thresholds.json" in capsys.readouterr().out


# --------------------------------------------------------------- SIGKILL


def _train_cmd(root, out, resume=False):
    cmd = [sys.executable, "-m", "sppnet", "detect", "train", "--data", str(root), "--out", str(out), *TINY_FLAGS]
    cmd[cmd.index("--ft-iterations") + 1] = "60"
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
