"""Interrupted classification runs resume exactly (issue 7): at an epoch boundary,
mid-epoch after Ctrl-C, and after a real SIGKILL / SIGINT of the CLI process."""

from __future__ import annotations

import csv
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sppnet.engine.classify.training as training
from sppnet.data.synthetic import make_classification_dataset
from sppnet.engine.classify import ClassifyConfig, TrainingInterrupted, train
from sppnet.engine.common import UserError, load_state, load_weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_classification_dataset(
        tmp_path_factory.mktemp("data"),
        seed=4,
        train_per_class=3,
        val_per_class=1,
        test_per_class=0,
        min_size=48,
        max_size=96,
    )


def tiny(data, **kw) -> ClassifyConfig:
    """Random-size schedule, dropout and colour noise on: every RNG of the loop matters."""
    base = {
        "width": 0.1,
        "fc_dim": 32,
        "size": 64,
        "schedule": "random",
        "epochs": 3,
        "batch_size": 8,
        "lr": 0.05,
        "lr_steps": (2,),
        "workers": 0,
        "device": "cpu",
        "data": str(data),
    }
    return ClassifyConfig(**{**base, **kw})


def assert_same_weights(a: Path, b: Path) -> None:
    wa, ma = load_weights(a / "model.safetensors")
    wb, mb = load_weights(b / "model.safetensors")
    assert ma["epoch"] == mb["epoch"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


def metrics_without_time(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    train(tiny(data), out=out, verbose=False)
    return out


def test_resume_at_epoch_boundary_is_bitwise_identical(data, reference, tmp_path):
    out = tmp_path / "run"
    train(tiny(data, epochs=1), out=out, verbose=False)
    train(tiny(data), out=out, resume=True, verbose=False)  # epochs is allowed to grow
    assert_same_weights(reference, out)
    assert metrics_without_time(out) == metrics_without_time(reference)
    state = load_state(out / "last.safetensors")
    assert (state["epoch"], state["step"]) == (3, 0)
    assert state["schedule"]["sizes"] == [int(r["size"]) for r in metrics_without_time(reference)]


def test_ctrl_c_mid_epoch_checkpoints_and_resumes_exactly(data, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    calls = {"n": 0}

    def stop_on_fifth_step(interrupt, ctx):  # Ctrl-C during epoch 2 (3 steps per epoch)
        calls["n"] += 1
        return calls["n"] == 5

    monkeypatch.setattr(training, "_stop_requested", stop_on_fifth_step)
    with pytest.raises(TrainingInterrupted):
        train(tiny(data), out=out, verbose=False)
    err = capsys.readouterr().err
    assert f"resume with: sppnet classify train --out {out} --resume" in err
    state = load_state(out / "last.safetensors")
    assert (state["epoch"], state["step"]) == (1, 2)
    monkeypatch.undo()
    train(None, out=out, resume=True, verbose=False)
    assert_same_weights(reference, out)
    assert metrics_without_time(out) == metrics_without_time(reference)


def test_resume_refuses_changed_settings_and_unsafe_checkpoints(data, tmp_path):
    out = tmp_path / "run"
    train(tiny(data, epochs=1), out=out, verbose=False)
    with pytest.raises(UserError, match="cannot change these settings when resuming: width: run has 0.1, given 0.2"):
        train(tiny(data, width=0.2), out=out, resume=True, verbose=False)
    with pytest.raises(UserError, match="nothing to resume"):
        train(tiny(data), out=tmp_path / "absent", resume=True, verbose=False)
    torch.save({"model": torch.zeros(1)}, out / "last.safetensors")  # a pickle in disguise
    with pytest.raises(ValueError, match="last.safetensors"):
        train(tiny(data, epochs=2), out=out, resume=True, verbose=False)


def test_finished_run_resumes_to_a_no_op(data, reference, tmp_path):
    out = tmp_path / "run"
    train(tiny(data, epochs=1), out=out, verbose=False)
    before = (out / "model.safetensors").read_bytes()
    train(tiny(data, epochs=1), out=out, resume=True, verbose=False)
    assert (out / "model.safetensors").read_bytes() == before


# ----------------------------------------------------------- real process kills


def _cli(out: Path, data: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sppnet",
        "classify",
        "train",
        "--out",
        str(out),
        "--data",
        str(data),
        "--width",
        "0.1",
        "--fc-dim",
        "32",
        "--size",
        "64",
        "--schedule",
        "random",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--lr",
        "0.05",
        "--lr-steps",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


def _start_and_wait_for_checkpoint(cmd: list[str], out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "last.safetensors").exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited before its first checkpoint: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint within 120 s")
        time.sleep(0.02)
    return proc


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume(data, reference, tmp_path):
    delay_max = 0.5  # the two epochs left after the first checkpoint take about this long
    for attempt in range(4):
        out = tmp_path / f"run{attempt}"
        proc = _start_and_wait_for_checkpoint(_cli(out, data), out)
        delay = random.uniform(0.0, delay_max)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            break
        proc.communicate(timeout=60)
        delay_max /= 2  # finished before the kill: try again, sooner
    else:
        pytest.fail("the run always finished before it could be killed")
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_state(out / "last.safetensors")["epoch"]
    assert 1 <= killed_at <= 3
    resumed = subprocess.run(_cli(out, data, "--resume"), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, f"killed {delay:.2f}s after the first checkpoint: {resumed.stderr[-2000:]}"
    assert_same_weights(reference, out)
    assert metrics_without_time(out) == metrics_without_time(reference)
    leftovers = [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert all(p.startswith(".") for p in leftovers)  # at worst a stale hidden temp file


@pytest.mark.slow
def test_sigint_writes_a_checkpoint_and_says_how_to_resume(data, reference, tmp_path):
    out = tmp_path / "run"
    proc = _start_and_wait_for_checkpoint(_cli(out, data), out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before Ctrl-C arrived")
    assert proc.returncode == 130, err[-2000:]
    assert f"resume with: sppnet classify train --out {out} --resume" in err
    assert "Traceback" not in err
    resumed = subprocess.run(_cli(out, data, "--resume"), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_weights(reference, out)
    assert metrics_without_time(out) == metrics_without_time(reference)
