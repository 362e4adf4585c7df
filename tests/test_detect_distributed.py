"""``torchrun --nproc_per_node 2 -m sppnet detect train | val`` (gloo, CPU) against one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_detect import tiny_flags, tiny_voc_fixture

from sppnet.engine.common import load_weights

pytestmark = pytest.mark.slow

# --dropout 0: the dropout masks are drawn per process, everything else is the same draw
# The paper's pretraining recipe: --pretrain-recipe auto falls back (one tiny epoch stays on the
# plateau) to the batch-norm recipe, whose processes normalise by their own half batches.
FLAGS = [
    *tiny_flags(ft_iterations=12, max_proposals=60),
    *("--pretrain-batch", "8", "--ft-batch", "64", "--dropout", "0", "--pretrain-recipe", "paper"),
]


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {
        **os.environ,
        "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(n: int, *args: str) -> list[str]:
    if n == 1:
        return [sys.executable, "-m", "sppnet", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(n),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "sppnet",
        *args,
    ]


def _run(n: int, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(n, *args), check=False, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


root = tiny_voc_fixture("root", seed=11, num_train=6, max_short_side=128, max_objects=2)


@pytest.fixture(scope="module")
def runs(root, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    times = {}
    for n in (1, 2):
        t0 = time.monotonic()
        _run(n, "detect", "train", "--data", str(root), "--out", str(base / f"p{n}"), *FLAGS)
        times[n] = time.monotonic() - t0
    return base / "p1", base / "p2", times


def _assert_same_detector(a_path: Path, b_path: Path) -> None:
    a, _ = load_weights(a_path)
    b, _ = load_weights(b_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_processes_train_the_detector_of_one(runs, root):
    one, two, _ = runs
    _assert_same_detector(one / "detector.safetensors", two / "detector.safetensors")
    # every cache holds each training image once
    images = len((root / "ImageSets" / "Main" / "train.txt").read_text().split())
    for name in ("features", "proposals"):
        assert len(list((two / "cache" / name).rglob("*.safetensors"))) == images, name
        assert not [p for p in (two / "cache" / name).rglob("*") if p.is_file() and ".tmp" in p.name]
    # rank 0 wrote the run folder alone: one config, one checkpoint per stage
    assert json.loads((two / "config.json").read_text()) == json.loads((one / "config.json").read_text())
    assert sorted(p.name for p in (two / "stages").iterdir()) == sorted(p.name for p in (one / "stages").iterdir())


def test_two_processes_evaluate_like_one(runs, tmp_path):
    _, two, _ = runs
    results = {}
    for n in (1, 2):
        out = tmp_path / f"dets{n}.json"
        # --run-dir: torchrun's own parser takes a bare --run for its --run-path
        proc = _run(n, "detect", "val", "--run-dir", str(two), "--json", "--device", "cpu", "--save-json", str(out))
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1  # rank 0 reports for both
        results[n] = json.loads(lines[0]), json.loads(out.read_text())
    (m1, d1), (m2, d2) = results[1], results[2]
    assert m1["images"] == m2["images"] == 3
    assert m1["mAP"] == pytest.approx(m2["mAP"], abs=1e-6)
    assert len(d1) == len(d2)
    for x, y in zip(d1, d2):
        assert (x["image_id"], x["category_id"]) == (y["image_id"], y["category_id"])
        assert x["bbox"] == pytest.approx(y["bbox"], abs=1e-3) and x["score"] == pytest.approx(y["score"], abs=1e-4)


def test_a_killed_two_process_run_resumes_to_the_same_detector(runs, root, tmp_path):
    one, _, times = runs
    out = tmp_path / "killed"
    args = ["detect", "train", "--data", str(root), "--out", str(out), *FLAGS]
    proc = subprocess.Popen(
        _cmd(2, *args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 2 * times[2] + 60
    while not (out / "stages" / "backbone.safetensors").is_file() and proc.poll() is None:
        assert time.monotonic() < deadline, "the run never finished its backbone stage"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, in the middle of the run
    proc.wait()
    assert not (out / "detector.safetensors").exists()
    _run(2, *args, "--resume")
    _assert_same_detector(one / "detector.safetensors", out / "detector.safetensors")
