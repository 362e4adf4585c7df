"""Data-parallel training: the sharded sampler, and 2 gloo processes under torchrun
matching one process with the same global batch."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys

import torch

from sppnet.data.synthetic import make_classification_dataset
from sppnet.engine.classify import ClassifyConfig, build_model
from sppnet.engine.common import load_weights
from sppnet.engine.distributed import ShardedEpochSampler, derive_seed


def test_shards_of_all_ranks_form_the_global_order():
    single = list(ShardedEpochSampler(10, seed=3, epoch=1))
    assert sorted(single) == list(range(10))
    assert single == list(ShardedEpochSampler(10, seed=3, epoch=1))
    assert single != list(ShardedEpochSampler(10, seed=3, epoch=2))
    ranks = [list(ShardedEpochSampler(10, seed=3, epoch=1, rank=r, world_size=2)) for r in range(2)]
    # Local batch k of every rank (2 items each) together = global batch k (4 items).
    for k in range(2):
        local = ranks[0][2 * k : 2 * k + 2] + ranks[1][2 * k : 2 * k + 2]
        assert sorted(local) == sorted(single[4 * k : 4 * k + 4])
    # 10 over 3 ranks: padded to 12 with the first indices of the order.
    three = [list(ShardedEpochSampler(10, 3, 1, r, 3)) for r in range(3)]
    assert [len(s) for s in three] == [4, 4, 4]
    assert sorted(sum(three, [])) == sorted(single + single[:2])
    # Evaluation: no padding, every index exactly once.
    evals = [list(ShardedEpochSampler(10, 0, 0, r, 3, shuffle=False, pad=False)) for r in range(3)]
    assert sorted(sum(evals, [])) == list(range(10)) and [len(e) for e in evals] == [4, 3, 3]
    # Resuming mid-epoch skips this rank's first indices.
    assert list(ShardedEpochSampler(10, 3, 1, 1, 2, start=2)) == ranks[1][2:]
    assert len(ShardedEpochSampler(10, 3, 1, 1, 2, start=2)) == 3


def test_derive_seed_is_stable_and_mixing():
    assert derive_seed(0, 1) == derive_seed(0, 1)
    assert len({derive_seed(0, e) for e in range(100)}) == 100
    assert 0 <= derive_seed(2**40, 5) < 2**63


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_gloo_processes_match_one_process(tmp_path):
    data = make_classification_dataset(
        tmp_path / "data", seed=2, train_per_class=3, val_per_class=1, test_per_class=0, min_size=48, max_size=80
    )
    # Dropout off: each process draws its own masks, so only then is the math identical.
    flags = ["--data", str(data), "--width", "0.1", "--fc-dim", "32", "--dropout", "0", "--size", "64",
             "--epochs", "2", "--schedule", "multi", "--batch-size", "8", "--lr", "0.05", "--workers", "0",
             "--device", "cpu", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    single = subprocess.run(
        [sys.executable, "-m", "sppnet", "classify", "train", "--out", str(tmp_path / "one"), *flags],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]  # fmt: skip
    ddp = subprocess.run(
        [*launcher, "-m", "sppnet", "classify", "train", "--out", str(tmp_path / "two"), *flags],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, meta_a = load_weights(tmp_path / "one" / "model.safetensors")
    b, meta_b = load_weights(tmp_path / "two" / "model.safetensors")
    assert meta_a["epoch"] == meta_b["epoch"] == 2
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=f"parameter {k}")
    torch.manual_seed(0)  # the runs' initial weights (seed 0)
    fresh = build_model(ClassifyConfig(width=0.1, fc_dim=32, dropout=0.0, size=64, schedule="multi"), 8).state_dict()
    moved = max(float((a[k] - fresh[k]).abs().max()) for k in a)
    assert moved > 1e-3, "6 SGD steps must change the weights"
    rows_a, rows_b = _metrics(tmp_path / "one" / "metrics.csv"), _metrics(tmp_path / "two" / "metrics.csv")
    assert [r["size"] for r in rows_b] == ["64", "51"]
    for ra, rb in zip(rows_a, rows_b):
        assert abs(float(ra["train_loss"]) - float(rb["train_loss"])) < 1e-4
        assert ra["train_acc"] == rb["train_acc"] and ra["val_top1"] == rb["val_top1"]
