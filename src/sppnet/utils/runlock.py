"""One writer per run folder: an advisory ``flock`` on ``<run>/.lock``, held for the whole run.

Two trainings started into one ``--out`` would interleave their files (a
``config.json`` of one model next to the weights of the other). :class:`RunLock`
makes the second one stop at once with an error that names the first::

    with RunLock(out):          # raises RunLockError if another process writes there
        train(...)

How it works. The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``<run>/.lock``. The
kernel releases it when the holder's file is closed, which includes the holder
dying by ``SIGKILL`` or a crash, so a lock can never outlive its process. While
it holds the lock, the holder keeps one JSON line in the file: its PID, host,
start time and command line; a competitor reads it to say who holds the folder.
On a clean exit the file is emptied (never deleted: unlinking a locked file
lets a third process lock a new file of the same name while a second still
holds the old one). A file that is *not* empty but whose ``flock`` is free
therefore belongs to a writer that died without cleaning up: the lock is taken
over and a :class:`StaleLockWarning` names the previous PID.

Only writers lock. Readers (``val``, ``predict``) need no lock. The lock is per
open file, not per process: the same process cannot hold two :class:`RunLock`
on one folder (the second raises, naming its own PID), and under ``torchrun``
only the rank that writes the folder should take it. Children created by
``fork`` (DataLoader workers) share the holder's open file and so keep the lock
while they live; they exit with their parent.

Platforms without ``fcntl`` (Windows) get no lock: :class:`RunLock` warns once
and runs unlocked.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_NAME",
    "RunLock",
    "RunLockError",
    "StaleLockWarning",
    "read_lock_holder",
]

#: Name of the lock file inside a run folder.
LOCK_NAME = ".lock"

_warned_no_fcntl = False


class RunLockError(ValueError):
    """The run folder is held by another writer, or cannot be a run folder (an existing file).

    Attributes:
        path (Path): the run folder.
        holder (dict | None): what the holder wrote (``pid``, ``host``, ``started``,
            ``argv``), if it could be read.
    """

    def __init__(self, message: str, path: Path, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder


class StaleLockWarning(UserWarning):
    """A lock file left by a writer that died was taken over."""


def read_lock_holder(run: str | os.PathLike) -> dict[str, Any] | None:
    """What the current (or last, if it died) holder of ``run`` wrote, or ``None``.

    Returns:
        ``{"pid": int, "host": str, "started": str, "argv": list[str]}``; ``None``
        if there is no lock file, it is empty (the last writer exited cleanly) or
        unreadable.
    """
    try:
        text = (Path(run) / LOCK_NAME).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return _parse_holder(text)


def _parse_holder(text: str) -> dict[str, Any] | None:
    if not text.strip():
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "an unknown process (its lock file is empty or unreadable)"
    where = f" on {holder['host']}" if holder.get("host") else ""
    since = f" since {holder['started']}" if holder.get("started") else ""
    argv = holder.get("argv")
    command = f" ({' '.join(str(a) for a in argv)})" if isinstance(argv, list) and argv else ""
    return f"PID {holder.get('pid', '?')}{where}{since}{command}"


class RunLock:
    """Context manager that makes this process the only writer of a run folder.

    Entering creates the folder (and its parents) if needed, takes the lock and
    writes the holder's PID, host, start time and command line into
    ``<run>/.lock``; leaving empties the file and releases the lock.
    :meth:`acquire` / :meth:`release` do the same without ``with``.

    Args:
        run: the run folder (``--out``).

    Attributes:
        path (Path): the run folder.
        previous (dict | None): after acquiring, the holder record of a writer
            that died holding the folder (a stale lock that was taken over), else None.

    Raises:
        RunLockError: ``run`` (or a parent) is an existing file, the folder
            cannot be created, or another writer holds it (naming its PID).
    """

    def __init__(self, run: str | os.PathLike) -> None:
        self.path = Path(run)
        self.previous: dict[str, Any] | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def __repr__(self) -> str:
        return f"RunLock({str(self.path)!r}, held={self.held})"

    def acquire(self) -> RunLock:
        """Takes the lock (see the class docstring); returns ``self``."""
        global _warned_no_fcntl
        if self._fd is not None:
            raise RuntimeError(f"{self!r} is already held by this object")
        self._make_folder()
        if fcntl is None:
            if not _warned_no_fcntl:
                _warned_no_fcntl = True
                warnings.warn(
                    "run-folder locking needs fcntl (POSIX); running without a lock",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return self
        lock_file = self.path / LOCK_NAME
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunLockError(f"cannot open the lock file {lock_file}: {exc}", self.path) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse_holder(_read_fd(fd))
            # a holder writes its record just after taking the lock: a loser of a close race
            # can find the file still empty, so it waits for the record briefly
            deadline = time.monotonic() + 1.0
            while holder is None and time.monotonic() < deadline:
                time.sleep(0.01)
                holder = _parse_holder(_read_fd(fd))
            os.close(fd)
            raise RunLockError(
                f"{self.path} is in use by another writer: {_describe(holder)}. Wait for it to finish, "
                f"stop it, or choose another --out",
                self.path,
                holder,
            ) from None
        except OSError as exc:
            os.close(fd)
            raise RunLockError(f"cannot lock {lock_file}: {exc}", self.path) from exc

        self.previous = _parse_holder(_read_fd(fd))
        if self.previous is not None:
            warnings.warn(
                f"{self.path}: taking over the lock of a writer that is gone ({_describe(self.previous)} "
                f"stopped without releasing it)",
                StaleLockWarning,
                stacklevel=2,
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": list(sys.argv),
        }
        _write_fd(fd, json.dumps(record) + "\n")
        self._fd = fd
        return self

    def release(self) -> None:
        """Empties the lock file and releases the lock (no-op if not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            _write_fd(fd, "")  # a clean exit: the next writer sees no stale holder
        finally:
            os.close(fd)  # releases the flock

    def _make_folder(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunLockError(
                f"{self.path} is an existing file, not a run folder; choose another --out",
                self.path,
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise RunLockError(
                f"cannot create the run folder {self.path}: a part of the path is an existing file "
                f"({exc.filename or exc}); choose another --out",
                self.path,
            ) from exc
        except OSError as exc:
            raise RunLockError(f"cannot create the run folder {self.path}: {exc}", self.path) from exc

    def __enter__(self) -> RunLock:  # noqa: PYI034
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:  # dropped without release: close, so the kernel frees the lock
            try:
                os.close(fd)
            except OSError:
                pass


def _read_fd(fd: int) -> str:
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 4096, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        if offset > 1 << 16:  # a holder record is one short line; ignore garbage beyond
            break
    return b"".join(chunks).decode("utf-8", errors="replace")


def _write_fd(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    data = text.encode("utf-8")
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], written)
    os.fsync(fd)
