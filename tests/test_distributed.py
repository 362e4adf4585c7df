"""Data-parallel training: the sharded sampler, and 2 gloo processes under torchrun
matching one process with the same global batch; detection plumbing (shard / gather /
fill_cache) in 2 gloo processes matching one process, each cache entry written once."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sppnet.engine.common import UserError
from sppnet.engine.distributed import (
    CacheFill,
    DistContext,
    ShardedBatchSampler,
    derive_seed,
    epoch_batches,
    fill_cache,
    gather_shards,
    init_distributed,
    shard,
    shutdown_distributed,
    split_classes,
)
from sppnet.utils import atomic_path


def _flat(lists: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(lists))


def test_epoch_batches_keep_every_sample_once_and_no_tiny_batch():
    for n in range(2, 60):
        for batch in (1, 2, 3, 4, 7, 8, 16):
            for world in (1, 2, 3):
                if n < 2 * world:
                    with pytest.raises(ValueError, match=f"{n} training sample"):
                        epoch_batches(n, batch, world)
                    continue
                bounds = epoch_batches(n, batch, world)
                assert bounds[0][0] == 0 and bounds[-1][1] == n
                assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, no gap, no overlap
                sizes = [b - a for a, b in bounds]
                assert all(s == batch for s in sizes[:-1])
                last = sizes[-1]
                if len(sizes) > 1:  # a short last batch is at least half a batch and two per process
                    assert last >= batch or (2 * last >= batch and last >= 2 * world), (n, batch, world, sizes)
                    assert last < max(2 * batch, batch + 2 * world)
    assert epoch_batches(25, 8) == [(0, 8), (8, 16), (16, 25)]  # the single leftover joins the last batch
    assert epoch_batches(28, 8) == [(0, 8), (8, 16), (16, 24), (24, 28)]  # half a batch stays a batch
    assert epoch_batches(5, 32) == [(0, 5)]


def test_sharded_batches_of_all_ranks_form_the_global_batches():
    single = ShardedBatchSampler(25, 8, seed=3, epoch=1)
    batches = list(single)
    assert [len(b) for b in batches] == single.global_sizes() == [8, 8, 9]
    assert sorted(_flat(batches)) == list(range(25))
    assert batches == list(ShardedBatchSampler(25, 8, seed=3, epoch=1))
    assert batches != list(ShardedBatchSampler(25, 8, seed=3, epoch=2))
    for world in (2, 3):
        ranks = [ShardedBatchSampler(25, 8, 3, 1, r, world) for r in range(world)]
        per_rank = [list(r) for r in ranks]
        for k, global_batch in enumerate(batches):  # local batch k of every rank together = global batch k
            local = [b[k] for b in per_rank]
            assert sorted(_flat(local)) == sorted(global_batch)
            assert max(map(len, local)) - min(map(len, local)) <= 1
        assert all(r.global_sizes() == [8, 8, 9] for r in ranks) or world == 3
    # Resuming mid-epoch skips whole batches.
    assert list(ShardedBatchSampler(25, 8, 3, 1, 1, 2, start=2)) == list(ShardedBatchSampler(25, 8, 3, 1, 1, 2))[2:]
    assert len(ShardedBatchSampler(25, 8, 3, 1, 1, 2, start=2)) == 1


def test_classify_trains_on_a_leftover_of_one_image(tmp_path):
    """A data set one image past a multiple of the batch: batch norm's fc layers never see a batch of 1."""
    from sppnet.data.synthetic import make_classification_dataset
    from sppnet.engine.classify import ClassifyConfig, train

    data = make_classification_dataset(
        tmp_path / "data", seed=4, train_per_class=2, val_per_class=1, test_per_class=0, min_size=40, max_size=56
    )
    cfg = ClassifyConfig(data=str(data), width=0.05, fc_dim=8, size=48, epochs=1, batch_size=5, workers=0, device="cpu")
    assert cfg.fc_norm and cfg.norm == "bn"  # the defaults, where a batch of one would fail
    train(cfg, out=tmp_path / "run", verbose=False)  # 16 images: batches 5, 5, 6
    with pytest.raises(UserError, match="batch_size 1 over 1 process"):
        train(dataclasses.replace(cfg, batch_size=1), out=tmp_path / "one", verbose=False)


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
    # Imported here: the spawned workers of the detection test below import this module.
    from sppnet.data.synthetic import make_classification_dataset
    from sppnet.engine.classify import ClassifyConfig, build_model
    from sppnet.engine.common import load_weights

    data = make_classification_dataset(
        tmp_path / "data", seed=2, train_per_class=4, val_per_class=1, test_per_class=0, min_size=48, max_size=80
    )
    # 25 training images, an odd number: global batches of 8, 8 and 9, the last one split 5 / 4
    # over the two processes (nothing padded, nothing dropped; the losses weighted per sample)
    for class_dir in sorted((data / "train").iterdir())[:7]:
        sorted(class_dir.glob("*.jpg"))[0].unlink()
    # Dropout off: each process draws its own masks, so only then is the math identical.
    # LRN, no batch norm: each process would normalise by its own half batch's statistics.
    # SGD: AdamW's first steps are ~lr * sign(grad), which turns the float rounding of the
    # all-reduced gradients of near-zero weights into differences of lr; the sharding is what is tested
    flags = [
        "--optimizer",
        "sgd",
        "--weight-decay",
        "5e-4",
        "--norm",
        "lrn",
        "--no-fc-norm",
        "--data",
        str(data),
        "--width",
        "0.1",
        "--fc-dim",
        "32",
        "--dropout",
        "0",
        "--size",
        "64",
        "--epochs",
        "2",
        "--schedule",
        "multi",
        "--batch-size",
        "8",
        "--lr",
        "0.05",
        "--aux-weight",
        "1",  # the auxiliary classifier trains under DDP with the network
        "--workers",
        "0",
        "--device",
        "cpu",
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    single = subprocess.run(
        [sys.executable, "-m", "sppnet", "classify", "train", "--out", str(tmp_path / "one"), *flags],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert single.returncode == 0, single.stderr
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
    ]
    ddp = subprocess.run(
        [*launcher, "-m", "sppnet", "classify", "train", "--out", str(tmp_path / "two"), *flags],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, meta_a = load_weights(tmp_path / "one" / "model.safetensors")
    b, meta_b = load_weights(tmp_path / "two" / "model.safetensors")
    assert meta_a["epoch"] == meta_b["epoch"]  # the best validation epoch, the same in both runs
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=f"parameter {k}")
    torch.manual_seed(0)  # the runs' initial weights (seed 0)
    cfg = ClassifyConfig(width=0.1, fc_dim=32, dropout=0.0, size=64, schedule="multi", norm="lrn", fc_norm=False)
    fresh = build_model(cfg, 8).state_dict()
    moved = max(float((a[k] - fresh[k]).abs().max()) for k in a)
    assert moved > 1e-3, "the SGD steps must change the weights"
    rows_a, rows_b = _metrics(tmp_path / "one" / "metrics.csv"), _metrics(tmp_path / "two" / "metrics.csv")
    assert [r["size"] for r in rows_b] == ["64", "51"]
    for ra, rb in zip(rows_a, rows_b):
        assert abs(float(ra["train_loss"]) - float(rb["train_loss"])) < 1e-4
        assert ra["train_acc"] == rb["train_acc"] and ra["val_top1"] == rb["val_top1"]


# --------------------------------------------------------------------------- #
# Detection plumbing: shard / gather_shards / split_classes / fill_cache
# --------------------------------------------------------------------------- #


def _per_image(i: int) -> list[float]:
    """A stand-in for one image's result: a small conv of a seeded image (deterministic, index-specific)."""
    g = torch.Generator().manual_seed(1000 + i)
    image = torch.rand(1, 3, 5 + i % 3, 7, generator=g)
    weight = torch.rand(2, 3, 3, 3, generator=g)
    return torch.nn.functional.conv2d(image, weight).sum(dim=(2, 3)).flatten().tolist()


def test_shard_covers_every_index_once_in_balanced_parts():
    for n in (0, 1, 5, 12, 13):
        for world in (1, 2, 3, 5):
            for strided in (False, True):
                parts = [list(shard(n, DistContext(rank=r, world_size=world), strided)) for r in range(world)]
                assert sorted(_flat(parts)) == list(range(n))
                assert max(map(len, parts)) - min(map(len, parts)) <= 1
                if not strided:  # contiguous blocks, in rank order
                    assert _flat(parts) == list(range(n))
                else:
                    assert all(p == list(range(r, n, world)) for r, p in enumerate(parts))
    assert list(split_classes(7, DistContext(rank=1, world_size=3))) == [1, 4]
    with pytest.raises(ValueError, match="n >= 0"):
        shard(-1, DistContext())


def test_gather_shards_one_process_and_length_check():
    ctx = DistContext()
    assert gather_shards(["a", "b"], 2, ctx) == ["a", "b"]
    with pytest.raises(ValueError, match="rank 0 has 1 results for its 2 indices"):
        gather_shards(["a"], 2, ctx)


def _cache_job(keys, cache_dir, log_dir, rank, stop_after=None) -> dict:
    """Runs fill_cache on files ``cache_dir/<key>``; logs each build to ``log_dir/rank<r>.log``."""
    ctx_calls = {"n": 0}

    def exists(i: int) -> bool:
        return (cache_dir / keys[i]).is_file()

    def build(i: int) -> None:
        with atomic_path(cache_dir / keys[i]) as tmp:
            tmp.write_text(json.dumps(_per_image(i)))
        with open(log_dir / f"rank{rank}.log", "a") as f:
            f.write(f"{keys[i]}\n")
        ctx_calls["n"] += 1

    def should_stop() -> bool:
        return stop_after is not None and ctx_calls["n"] >= stop_after

    return should_stop, exists, build


def _worker(rank: int, world: int, port: int, tmp: str, n: int, keys: list[str]) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": "lo",
        }
    )
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout_s=60)
    assert ctx.world_size == world and ctx.backend == "gloo"
    out = Path(tmp)
    report = {}
    for strided in (False, True):
        mine = shard(n, ctx, strided)
        report[f"mine_{strided}"] = list(mine)
        report[f"gathered_{strided}"] = gather_shards([_per_image(i) for i in mine], n, ctx, strided)
    # Rank 1 stops after one entry (an interrupt); a second call resumes.
    should_stop, exists, build = _cache_job(
        keys, out / "cache", out / "logs", rank, stop_after=1 if rank == 1 else None
    )
    first = fill_cache(keys, exists, build, ctx, should_stop=should_stop)
    _, exists, build = _cache_job(keys, out / "cache", out / "logs", rank)
    second = fill_cache(keys, exists, build, ctx)
    report["fills"] = [dataclasses.asdict(first), dataclasses.asdict(second)]
    (out / f"report{rank}.json").write_text(json.dumps(report))
    shutdown_distributed(ctx)


def test_two_gloo_processes_shard_gather_and_fill_each_entry_once(tmp_path):
    n = 11
    keys = [f"k{i % 9}" for i in range(n)]  # items 9 and 10 repeat the keys of 0 and 1
    (tmp_path / "cache").mkdir()
    (tmp_path / "logs").mkdir()
    (tmp_path / "cache" / "k5").write_text(json.dumps(_per_image(5)))  # present before the run: not rebuilt
    context = torch.multiprocessing.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path), n, keys), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the 2 gloo processes did not finish within 120 s")
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(2)]
    single = [_per_image(i) for i in range(n)]  # the one-process result
    for r in reports:
        for strided in ("False", "True"):
            torch.testing.assert_close(torch.tensor(r[f"gathered_{strided}"]), torch.tensor(single))
    assert reports[0]["mine_False"] == list(range(5)) and reports[1]["mine_False"] == list(range(5, 11))
    assert reports[0]["mine_True"] == list(range(0, 11, 2)) and reports[1]["mine_True"] == list(range(1, 11, 2))
    # Each missing entry built by exactly one process, over the interrupted call and its resume.
    logs = [(tmp_path / "logs" / f"rank{r}.log").read_text().split() for r in range(2)]
    built = logs[0] + logs[1]
    assert sorted(built) == sorted(set(keys) - {"k5"}) and len(built) == len(set(built)) == 8
    first0, second0 = reports[0]["fills"]
    assert first0["missing"] == 8 and first0["stopped"] and first0["built"] == 4
    assert reports[1]["fills"][0]["built"] == 1 and first0["built_all"] == 5
    assert second0["missing"] == 3 and second0["built_all"] == 3 and not second0["stopped"]
    assert reports[0]["fills"][1]["built_all"] == reports[1]["fills"][1]["built_all"]
    for key in set(keys):
        i = keys.index(key)
        torch.testing.assert_close(
            torch.tensor(json.loads((tmp_path / "cache" / key).read_text())), torch.tensor(single[i])
        )
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_fill_cache_one_process(tmp_path):
    keys = ["a", "b", "a", "c"]
    (tmp_path / "logs").mkdir()
    should_stop, exists, build = _cache_job(keys, tmp_path / "cache", tmp_path / "logs", 0)
    result = fill_cache(keys, exists, build, DistContext(), should_stop=should_stop)
    assert result == CacheFill(missing=3, built=3, built_all=3, stopped=False)
    assert (tmp_path / "logs" / "rank0.log").read_text().split() == ["a", "b", "c"]
    assert fill_cache(keys, exists, build, DistContext()) == CacheFill(0, 0, 0, False)
