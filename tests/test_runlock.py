"""RunLock: one writer per run folder, across processes; stale locks of dead writers are taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sppnet.utils import runlock
from sppnet.utils.runlock import LOCK_NAME, RunLock, RunLockError, StaleLockWarning, read_lock_holder

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")

# A writer process: waits for GO, tries to lock RUN, and if it wins writes a
# "training run" (config + weights naming itself) and holds the lock until DONE.
_WRITER = r"""
import json, os, sys, time
from pathlib import Path
RunLock, RunLockError = runlock.RunLock, runlock.RunLockError
run, go, done, name = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
print("waiting", flush=True)
while not go.exists():
    time.sleep(0.005)
try:
    lock = RunLock(run).acquire()
except RunLockError as e:
    print("refused:", e, flush=True)
    sys.exit(3)
(run / "config.json").write_text(json.dumps({"writer": name}))
time.sleep(0.05)
(run / "model.txt").write_text(name)
print("won", flush=True)
while not done.exists():
    time.sleep(0.01)
lock.release()
"""


# The children load runlock.py by its path: it needs nothing else from the package,
# and importing the package (torch) would take seconds per process.
_IMPORT = (
    "import importlib.util\n"
    f"spec = importlib.util.spec_from_file_location('runlock', {str(Path(runlock.__file__))!r})\n"
    "runlock = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(runlock)\n"
)


def _python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _IMPORT + code, *kwargs.pop("args", [])],
        text=True,
        **kwargs,
    )


def _start_holder(run: Path) -> subprocess.Popen:
    """A process that takes the lock and holds it until killed (or stdin closes)."""
    code = f"import sys\nwith runlock.RunLock({str(run)!r}):\n    print('ready', flush=True)\n    sys.stdin.read()\n"
    proc = _python(code, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_second_writer_gets_an_error_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = _start_holder(run)
    try:
        with pytest.raises(RunLockError, match=rf"in use by another writer: PID {holder.pid} on ") as info:
            RunLock(run).acquire()
        assert info.value.holder["pid"] == holder.pid
        assert read_lock_holder(run)["pid"] == holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # The holder exited cleanly: the lock file is empty and the next writer gets it silently.
    assert (run / LOCK_NAME).read_text() == ""
    assert read_lock_holder(run) is None
    with RunLock(run) as lock:
        assert lock.previous is None
        assert read_lock_holder(run)["pid"] == os.getpid()


def test_killed_holder_lock_is_taken_over_with_a_message(tmp_path):
    run = tmp_path / "run"
    holder = _start_holder(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert read_lock_holder(run)["pid"] == holder.pid  # the dead writer's record is still there
    with pytest.warns(
        StaleLockWarning,
        match=rf"taking over the lock of a writer that is gone \(PID {holder.pid}",
    ):
        lock = RunLock(run).acquire()
    try:
        assert lock.previous["pid"] == holder.pid
        assert read_lock_holder(run)["pid"] == os.getpid()
    finally:
        lock.release()


def test_competing_writers_exactly_one_wins_and_the_folder_is_consistent(tmp_path):
    run, go, done = tmp_path / "run", tmp_path / "go", tmp_path / "done"
    names = [f"writer{i}" for i in range(4)]
    procs = [
        _python(
            _WRITER,
            args=[str(run), str(go), str(done), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name in names
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "waiting"
        go.touch()  # all start at once
        deadline = time.monotonic() + 60
        while sum(p.poll() == 3 for p in procs) < len(procs) - 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        losers = [p for p in procs if p.poll() == 3]
        assert len(losers) == len(procs) - 1
        winner = next(p for p in procs if p.poll() is None)
        assert winner.stdout.readline().strip() == "won"
        for p in losers:
            assert f"PID {winner.pid}" in p.stdout.read()
    finally:
        done.touch()
        for p in procs:
            p.wait(timeout=30)
    assert winner.returncode == 0
    config = json.loads((run / "config.json").read_text())
    assert (run / "model.txt").read_text() == config["writer"] == names[procs.index(winner)]


def test_same_process_cannot_lock_twice(tmp_path):
    with RunLock(tmp_path / "run"), pytest.raises(RunLockError, match=f"PID {os.getpid()}"):
        RunLock(tmp_path / "run").acquire()
    with RunLock(tmp_path / "run") as again:  # released on exit
        assert again.held
    assert not again.held


def test_out_that_is_a_file_is_a_clear_error(tmp_path):
    existing = tmp_path / "results.txt"
    existing.write_text("not a folder")
    with pytest.raises(
        RunLockError,
        match=r"results\.txt is an existing file, not a run folder; choose another --out",
    ):
        RunLock(existing).acquire()
    with pytest.raises(RunLockError, match=r"a part of the path is an existing file"):
        RunLock(existing / "sub").acquire()
    assert existing.read_text() == "not a folder"


def test_creates_missing_folders_and_records_the_holder(tmp_path):
    run = tmp_path / "a" / "b"
    with RunLock(run) as lock:
        holder = read_lock_holder(run)
        assert run.is_dir() and lock.held
        assert holder["pid"] == os.getpid() and holder["argv"] == sys.argv and holder["host"]
