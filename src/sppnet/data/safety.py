"""Checks for names that come from data files and users: paths and class lists.

An annotation file is input, not code: an id such as ``../../etc/passwd`` or a
``file_name`` that is an absolute path, or a file that is a symlink to somewhere
else, must not make a data set read outside its folder. :func:`resolve_inside`
joins a name to a folder and refuses every such escape with a ``ValueError`` that
names the offending value.

Folders themselves may be symlinks (sharing one ``JPEGImages`` between copies of
a data set is common); the check is that each *file* resolves inside the
*resolved* folder it was looked up in.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

__all__ = ["resolve_inside", "validate_class_names"]


def resolve_inside(folder: str | os.PathLike, name: str, what: str = "name", allow_subdirs: bool = False) -> Path:
    """Joins ``name`` to ``folder``, refusing names that would leave the folder.

    Args:
        folder: the directory the name is relative to.
        name: the untrusted name (an image id, a ``file_name`` field).
        what: how to call the name in error messages ("image id", "file_name").
        allow_subdirs: accept ``a/b.jpg`` (forward slashes only) instead of a
            single path component.

    Returns:
        ``Path(folder) / name``; the file need not exist.

    Raises:
        ValueError: ``name`` is empty, contains NUL or a backslash, is absolute,
            has a ``..`` component (or any ``/`` when ``allow_subdirs`` is
            False), or resolves, through symlinks, outside ``folder``.
    """
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a string, got {type(name).__name__} {name!r}")
    if not name or name.strip() != name or "\x00" in name:
        raise ValueError(f"{what} {name!r} is empty, padded with spaces or contains NUL")
    if "\\" in name or PureWindowsPath(name).drive:
        raise ValueError(f"{what} {name!r} contains a backslash or drive; refusing it")
    posix = PurePosixPath(name)
    if posix.is_absolute():
        raise ValueError(f"{what} {name!r} is an absolute path; refusing it")
    if ".." in posix.parts or name in (".", ".."):
        raise ValueError(f"{what} {name!r} points outside its folder ('..'); refusing it")
    if not allow_subdirs and "/" in name:
        raise ValueError(f"{what} {name!r} contains a path separator; refusing it")

    folder = Path(folder)
    candidate = folder / name
    base = folder.resolve()
    resolved = candidate.resolve()
    if base not in resolved.parents:  # also refuses the folder itself
        raise ValueError(
            f"{what} {name!r}: {candidate} resolves to {resolved}, outside {base} "
            f"(symlink out of the data set?); refusing it"
        )
    return candidate


def validate_class_names(classes: Sequence[str]) -> list[str]:
    """Checks a user-given class list: non-empty, unique, non-blank strings.

    Returns:
        The names as a new list, order kept (the order defines the labels).
    """
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise ValueError(f"classes must be a sequence of names, got {classes!r}")
    names = list(classes)
    if not names:
        raise ValueError("classes must not be empty")
    bad = [c for c in names if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"class names must be non-blank strings, got {bad!r}")
    duplicates = sorted(c for c, n in Counter(names).items() if n > 1)
    if duplicates:
        raise ValueError(f"class names must be unique, got duplicates {duplicates!r}")
    return names
