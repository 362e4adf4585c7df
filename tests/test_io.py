"""Tests for sppnet.utils: atomic writes, safe checkpoints, JSON, caches."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sppnet.utils import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    capture_rng_state,
    file_digest,
    flatten_state,
    load_cache,
    load_checkpoint,
    load_json,
    load_torch_weights_only,
    read_checkpoint,
    restore_rng_state,
    save_cache,
    save_checkpoint,
    save_json,
    unflatten_state,
)

SRC_DIR = Path(__file__).resolve().parents[1] / "src"


def _leftover_temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


# --------------------------------------------------------------------------- #
# Atomic writes
# --------------------------------------------------------------------------- #


def test_atomic_write_bytes_and_text(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"\x00\x01payload")
    assert target.read_bytes() == b"\x00\x01payload"
    atomic_write_text(target, "héllo\nworld\n")
    assert target.read_text(encoding="utf-8") == "héllo\nworld\n"
    assert _leftover_temp_files(target.parent) == []


def test_atomic_path_failure_keeps_original_and_removes_temp(tmp_path):
    target = tmp_path / "model.safetensors"
    atomic_write_bytes(target, b"original content")
    seen_tmp = []
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(target) as tmp:
            seen_tmp.append(tmp)
            assert tmp.parent == target.parent and tmp != target
            with open(tmp, "wb") as f:
                f.write(b"half of the new con")
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"original content"
    assert not seen_tmp[0].exists()
    assert _leftover_temp_files(tmp_path) == []


def test_save_checkpoint_failure_inside_writer_keeps_original(tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "ckpt.safetensors"
    save_checkpoint(target, {"w": torch.ones(3)}, {"version": 1})

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b'\x10\x00\x00\x00\x00\x00\x00\x00{"partial')
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(target, {"w": torch.zeros(3)}, {"version": 2})
    monkeypatch.undo()

    tensors, meta = read_checkpoint(target)
    assert meta == {"version": 1}
    torch.testing.assert_close(tensors["w"], torch.ones(3))
    assert _leftover_temp_files(tmp_path) == []


def test_atomic_path_requires_the_caller_to_write(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(tmp_path / "never.bin"):
            pass
    assert list(tmp_path.iterdir()) == []


# The helper process imports torch once (seconds) and then forks one writer per
# round; each writer saves 8 MB checkpoints to the same path in a loop until the
# test SIGKILLs it. Lines on stdout: "pid N", "saved V" (V complete), "reaped".
_WRITER = r"""
import os, sys, torch
from sppnet.utils import save_checkpoint
path = sys.argv[1]
numel = 2_000_000
for line in sys.stdin:
    version = int(line)
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(1)
        while True:
            version += 1
            payload = torch.full((numel,), float(version))
            save_checkpoint(path, {"payload": payload, "tail": payload[-7:].clone()},
                            {"version": version, "numel": numel})
            print("saved", version, flush=True)
    print("pid", pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def test_sigkill_during_writes_never_leaves_a_partial_checkpoint(tmp_path):
    target = tmp_path / "last.safetensors"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(SRC_DIR), env.get("PYTHONPATH")] if p)
    rng = random.Random(1234)
    helper = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        for round_ in range(6):
            helper.stdin.write(f"{round_ * 1000}\n")
            helper.stdin.flush()
            pid, saved = None, []
            while pid is None or not saved:  # a writer exists and finished one save
                line = helper.stdout.readline().split()
                assert line, "checkpoint writer died unexpectedly"
                if line[0] == "pid":
                    pid = int(line[1])
                else:
                    saved.append(int(line[1]))
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGKILL)  # at a random moment, usually mid-write
            while True:
                line = helper.stdout.readline()
                assert line, "helper process died unexpectedly"
                if line.endswith("reaped\n"):
                    # A writer killed while printing can leave "saved V" without its
                    # newline, glued to "reaped" (seen in CI): that save did complete
                    # (the line follows it), and "last announced + 1" below allows it.
                    break
                saved.append(int(line.split()[1]))

            tensors, meta = read_checkpoint(target)
            v = meta["version"]
            # The last announced save, or the one that was renamed into place just
            # before the kill landed (before its "saved" line was printed).
            assert v in (saved[-1], saved[-1] + 1), (v, saved[-3:])
            assert torch.equal(tensors["payload"], torch.full((meta["numel"],), float(v)))
            assert torch.equal(tensors["tail"], torch.full((7,), float(v)))
    finally:
        helper.stdin.close()
        helper.wait(timeout=30)
        helper.stdout.close()
    assert helper.returncode == 0


# --------------------------------------------------------------------------- #
# Nested state round trip
# --------------------------------------------------------------------------- #


def _tiny_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )


def _train_steps(model, optimizer, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(3, 3, 6, 6, generator=g)
        y = torch.randint(0, 5, (3,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_model_optimizer_and_rng_round_trip(tmp_path):
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = _tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    _train_steps(model, optimizer, steps=3, seed=1)
    torch.rand(3), np.random.rand(3), random.random()  # advance every generator

    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": capture_rng_state(),
        "epoch": 7,
        "best": {"map": 0.25, "epoch": (5, "val")},
    }
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, *flatten_state(state))

    # What the original process draws next ...
    expected_torch = torch.rand(8)
    expected_numpy = np.random.rand(8)
    expected_python = [random.random() for _ in range(8)]
    # ... and the original model after one more step.
    reference = _tiny_model()
    reference.load_state_dict(model.state_dict())
    _train_steps(model, optimizer, steps=1, seed=2)

    # Scramble every generator, then resume from the file.
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 7
    assert loaded["best"] == {"map": 0.25, "epoch": (5, "val")}
    assert set(loaded["optimizer"]["state"]) == {0, 1, 2, 3, 4, 5}  # int keys survive
    assert loaded["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert loaded["model"]["1.num_batches_tracked"].dtype == torch.int64
    assert loaded["model"]["1.num_batches_tracked"].item() == 3

    restore_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(8), expected_torch)
    np.testing.assert_array_equal(np.random.rand(8), expected_numpy)
    assert [random.random() for _ in range(8)] == expected_python

    resumed = _tiny_model()
    resumed.load_state_dict(loaded["model"])
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.0)
    resumed_opt.load_state_dict(loaded["optimizer"])
    for p, q in zip(resumed.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    # Momentum buffers restored: the next step matches the uninterrupted run exactly.
    _train_steps(resumed, resumed_opt, steps=1, seed=2)
    for p, q in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_flatten_state_edge_values():
    state = {
        1: "int key",
        2.5: "float key",
        None: "none key",
        False: ["bool key"],
        "__tensor__": "a user key that looks like a tag",
        "nested": ({"a": (1, (2, 3))}, [None, False]),
        "floats": [float("nan"), float("inf"), -float("inf"), 1e-300],
        "np_scalars": [np.int64(3), np.float32(0.5), np.bool_(True)],
        "array": np.arange(6, dtype=np.int16).reshape(2, 3),
        "pcg": np.random.default_rng(3).bit_generator.state,  # 128-bit ints
        "empty": torch.empty(0, 3),
        "bf16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
    }
    tensors, meta = flatten_state(state)
    meta = json.loads(json.dumps(meta))  # what the file stores
    out = unflatten_state(tensors, meta)

    assert out[1] == "int key" and out[2.5] == "float key" and out[None] == "none key"
    assert out[False] == ["bool key"] and [k for k in out if isinstance(k, bool)] == [False]
    assert out["__tensor__"] == "a user key that looks like a tag"
    assert out["nested"] == ({"a": (1, (2, 3))}, [None, False])
    assert np.isnan(out["floats"][0]) and out["floats"][1:] == [float("inf"), -float("inf"), 1e-300]
    assert out["np_scalars"] == [3, 0.5, True]
    assert out["array"].dtype == np.int16
    np.testing.assert_array_equal(out["array"], np.arange(6).reshape(2, 3))
    assert out["pcg"] == state["pcg"]
    assert out["empty"].shape == (0, 3)
    assert torch.equal(out["bf16"], state["bf16"])


def test_flatten_state_rejects_unsupported_values_by_location():
    with pytest.raises(ValueError, match=r"state\['cfg'\]\['device'\].*dtype"):
        flatten_state({"cfg": {"device": torch.float32}})
    with pytest.raises(ValueError, match=r"dict key .*frozenset"):
        flatten_state({frozenset({1}): 1})


def test_unflatten_state_checks_tensor_references():
    tensors, meta = flatten_state({"w": torch.ones(2)})
    with pytest.raises(ValueError, match="not among"):
        unflatten_state({}, meta)
    with pytest.raises(ValueError, match="not referenced"):
        unflatten_state({**tensors, "extra": torch.zeros(1)}, meta)


def test_shared_tensors_are_saved(tmp_path):
    weight = torch.randn(4, 3)
    state = {"enc": weight, "dec": weight, "row": weight[1]}  # tied weights and a view
    save_checkpoint(tmp_path / "tied.safetensors", *flatten_state(state))
    out = load_checkpoint(tmp_path / "tied.safetensors")
    assert torch.equal(out["enc"], weight) and torch.equal(out["dec"], weight)
    assert torch.equal(out["row"], weight[1])


# --------------------------------------------------------------------------- #
# Refusing unsafe or damaged files
# --------------------------------------------------------------------------- #


def _create_marker(path: str) -> str:
    Path(path).write_text("code was executed")
    return "pwned"


class _Malicious:
    """Unpickling this object calls ``_create_marker`` (arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_create_marker, (self.marker,))


@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "pickle"])
def test_pickle_files_are_refused_without_running_code(tmp_path, writer):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    payload = {"weight": torch.ones(2), "surprise": _Malicious(marker)}
    if writer == "torch_zip":
        torch.save(payload, path)
    elif writer == "torch_legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))

    with pytest.raises(ValueError, match="is not a sppnet checkpoint .*safe format required") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)
    with pytest.raises(ValueError, match="not a sppnet checkpoint"):
        read_checkpoint(path)
    if writer != "pickle":
        refused = "refusing to load .*code/objects beyond plain tensors"
        with pytest.raises(ValueError, match=refused):
            load_torch_weights_only(path)
    assert not marker.exists()

    # The payload is live: an unrestricted load would have run it.
    torch.load(path, weights_only=False) if writer != "pickle" else pickle.loads(path.read_bytes())
    assert marker.exists()


def test_load_torch_weights_only_accepts_plain_state_dicts(tmp_path):
    sd = _tiny_model().state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    out = load_torch_weights_only(tmp_path / "plain.pt")
    assert set(out) == set(sd)
    for k in sd:
        assert torch.equal(out[k], sd[k])
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="junk.pt"):
        load_torch_weights_only(tmp_path / "junk.pt")


def test_non_safetensors_and_foreign_safetensors_files_are_refused(tmp_path):
    import safetensors.torch

    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes\.safetensors.*not a sppnet checkpoint"):
        load_checkpoint(text)
    foreign = tmp_path / "hf.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(foreign))
    with pytest.raises(ValueError, match=r"hf\.safetensors.*not a sppnet checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(ValueError, match="missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.02, 5 / 4096])
def test_truncated_checkpoint_is_refused(tmp_path, keep):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, *flatten_state({"w": torch.randn(512), "step": 3}))
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(ValueError, match=r"ckpt\.safetensors") as e:
        load_checkpoint(path)
    assert any(word in str(e.value) for word in ("corrupted", "truncated"))


def test_bit_flip_in_payload_fails_checksum(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, *flatten_state({"w": torch.zeros(256)}))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"ckpt\.safetensors.*corrupted.*SHA-256"):
        load_checkpoint(path)


def test_save_checkpoint_validates_inputs(tmp_path):
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "a.safetensors", {}, {"bad": object()})
    with pytest.raises(ValueError, match="'w' must be a Tensor, got list"):
        save_checkpoint(tmp_path / "a.safetensors", {"w": [1, 2]}, {})
    assert list(tmp_path.iterdir()) == []


def test_read_checkpoint_returns_raw_tensors_and_meta(tmp_path):
    path = tmp_path / "raw.safetensors"
    sd = {"a": torch.arange(4), "b": torch.eye(2)}
    save_checkpoint(path, sd, {"epoch": 2})
    tensors, meta = read_checkpoint(path)
    assert meta == {"epoch": 2}
    assert torch.equal(tensors["a"], sd["a"]) and torch.equal(tensors["b"], sd["b"])
    with pytest.raises(ValueError, match="not referenced by the checkpoint meta"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- #
# JSON, digests, caches
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class _Inner:
    scales: tuple[int, ...] = (480, 688)


@dataclasses.dataclass
class _Config:
    out: Path = Path("runs/x")
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    lr: float = 1e-4


def test_save_json_converts_dataclasses_paths_and_tuples(tmp_path):
    path = tmp_path / "config.json"
    save_json(path, {"cfg": _Config(), "extra": (np.float32(0.5), np.int64(2))})
    text = path.read_text()
    assert text.startswith('{\n  "cfg"') and text.endswith("\n")
    assert load_json(path) == {
        "cfg": {"out": "runs/x", "inner": {"scales": [480, 688]}, "lr": 1e-4},
        "extra": [0.5, 2],
    }
    with pytest.raises(ValueError, match=r"obj\['bad'\] has unsupported type object"):
        save_json(path, {"bad": object()})
    assert load_json(path)["cfg"]["lr"] == 1e-4  # failed write left the file intact
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        load_json(tmp_path / "broken.json")


def test_save_json_refuses_non_finite_floats_and_names_the_key(tmp_path):
    path = tmp_path / "metrics.json"
    save_json(path, {"ok": 1.0})
    cases = [
        ({"ap": {"cat": float("nan")}}, r"obj\['ap'\]\['cat'\] is nan"),
        ({"curve": [0.5, float("inf")]}, r"obj\['curve'\]\[1\] is inf"),
        ({"x": np.float32("-inf")}, r"obj\['x'\] is -inf"),
        ({"t": torch.tensor([1.0, float("nan")])}, r"obj\['t'\]\[1\] is nan"),
        ({float("nan"): 1}, r"the key nan of obj is nan"),
    ]
    for obj, message in cases:
        with pytest.raises(ValueError, match=message):
            save_json(path, obj)
    assert load_json(path) == {"ok": 1.0}  # nothing was written
    assert _leftover_temp_files(tmp_path) == []


def test_file_digest(tmp_path):
    data = b"some image bytes" * 1000
    path = tmp_path / "img.jpg"
    path.write_bytes(data)
    assert file_digest(data) == hashlib.sha256(data).hexdigest() == file_digest(path)
    assert file_digest(str(path)) == file_digest(path)
    with_params = file_digest(path, extra='{"mode": "fast"}')
    assert with_params != file_digest(path)
    assert with_params == file_digest(data, extra='{"mode": "fast"}')
    assert with_params != file_digest(path, extra='{"mode": "quality"}')
    with pytest.raises(ValueError, match="nope.jpg"):
        file_digest(tmp_path / "nope.jpg")


def test_cache_round_trip_and_invalidation(tmp_path):
    path = tmp_path / "cache" / "entry.safetensors"
    arrays = {"boxes": np.arange(12, dtype=np.float32).reshape(3, 4), "ids": torch.arange(3)}
    save_cache(path, arrays, key="abc", version=2)

    out = load_cache(path, key="abc", version=2)
    assert isinstance(out["boxes"], np.ndarray) and isinstance(out["ids"], torch.Tensor)
    np.testing.assert_array_equal(out["boxes"], arrays["boxes"])
    assert torch.equal(out["ids"], arrays["ids"])

    assert load_cache(path, key="other", version=2) is None
    assert not path.exists()  # stale entries are removed

    save_cache(path, arrays, key="abc", version=2)
    assert load_cache(path, key="abc", version=3) is None and not path.exists()

    save_cache(path, arrays, key="abc", version=2)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert load_cache(path, key="abc", version=2) is None and not path.exists()

    save_cache(path, arrays, key="abc", version=2)
    path.write_bytes(path.read_bytes()[:40])
    assert load_cache(path, key="abc", version=2) is None and not path.exists()

    path.write_bytes(b"garbage")
    assert load_cache(path, key="abc", version=2) is None and not path.exists()
    assert load_cache(tmp_path / "absent.safetensors", key="abc", version=2) is None
    with pytest.raises(ValueError, match="'names' must be a numpy.ndarray or Tensor"):
        save_cache(path, {"names": ["a", "b"]}, key="abc", version=2)
