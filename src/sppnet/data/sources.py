"""What ``predict`` reads: image files, folders, glob patterns and video files, as one stream of RGB pictures.

A SOURCE argument is, checked in this order:

* a folder: its image files (:data:`~sppnet.data.images.IMAGE_EXTENSIONS`, any
  case, hidden entries skipped, sorted), directly in it or, with
  ``recursive=True``, in its whole tree; other files are ignored (counted);
* a file: a video if its suffix is in :data:`VIDEO_EXTENSIONS`, else an image
  (whatever the suffix: :func:`~sppnet.data.images.load_image` decides);
* a glob pattern (``*``, ``?``, ``[...]``; ``**`` spans folders): the image and
  video files it matches, sorted; other matches are ignored (counted).

Images are decoded with :func:`~sppnet.data.images.load_image` (upright 8-bit
RGB, decompression-bomb guard); video frames with OpenCV's ``cv2.VideoCapture``
(BGR converted to RGB, the same pixel limit applied to the frame size).

Names. Every item has a ``name`` and a ``stem``, unique within one call, that
stay the same from run to run (output files are named after them):

=====================  =========================  =====================================
item                   ``name``                   ``stem``
=====================  =========================  =====================================
file ``a/photo.jpg``   ``photo.jpg``              ``photo``
``folder/sub/b.png``   ``sub/b.png``              ``sub/b`` (the path inside the folder)
``data/**/*.jpg``      the path below ``data``    the same without the suffix
frame 123 of a video   ``clip.mp4#frame000123``   ``clip_frame000123``
=====================  =========================  =====================================

Two different files with the same stem (``photo.jpg`` and ``photo.png``, or
``photo.jpg`` from two folders) get ``photo`` and ``photo~2``. The same file
reached twice (a folder and a glob over it) is read once (counted as a duplicate).

Bad inputs (issue 18: a batch survives bad members). A missing path, an empty
folder, a glob that matches nothing, an unreadable video, an image that cannot
be decoded and a video frame that cannot be decoded are each skipped with a
:class:`~sppnet.data.images.DataWarning` naming them and counted in the
:class:`SourceReport`; the other inputs are still read. With ``strict=True`` the
first one raises :class:`SourceError` instead. When nothing at all can be read
:class:`SourceError` is raised in either mode, with the summary of why.

Usage::

    report = SourceReport()
    for batch in batched(iter_sources(["photos/", "clip.mp4"], report=report), 8):
        ...  # batch: list[SourceItem]
    print(report.summary())  # "read 12 images and 40 frames of 1 video; skipped 1 of 54 inputs: 1 corrupt"
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TypeVar

import numpy as np
from PIL import Image

from sppnet.data.images import IMAGE_EXTENSIONS, ImageError, SkipCounter, load_image
from sppnet.data.limits import get_image_limits
from sppnet.data.video import VIDEO_EXTENSIONS, VideoInfo, probe_video, read_frames

__all__ = [
    "VIDEO_EXTENSIONS",
    "SourceEntry",
    "SourceError",
    "SourceItem",
    "SourceReport",
    "batched",
    "iter_sources",
    "resolve_sources",
]

T = TypeVar("T")


class SourceError(ValueError):
    """A SOURCE that cannot be read (``strict``), or sources of which nothing can be read.

    Attributes:
        path (str): the source, file or ``video#frameNNNNNN``.
        reason (str): short category (``"missing"``, ``"empty folder"``, ``"unmatched glob"``,
            ``"unreadable video"``, ``"corrupt frame"``, or an
            :class:`~sppnet.data.images.ImageError` reason); ``"nothing read"`` for the
            final error.
    """

    def __init__(self, path: str, reason: str, detail: str) -> None:
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{self.path}: {detail}")


@dataclass(frozen=True)
class SourceEntry:
    """One resolved file: an image, or a video with what its header says.

    Attributes:
        path (Path): the file.
        kind (str): ``"image"`` or ``"video"``.
        name (str), stem (str): see the module docstring.
        source (str): the SOURCE argument it came from.
        frames (int | None): a video's frame count from its header (an estimate for
            some containers; None when unknown or for an image).
        fps (float | None): a video's frame rate (None when unknown or for an image).
        size (tuple[int, int] | None): a video's ``(width, height)``.
    """

    path: Path
    kind: str
    name: str
    stem: str
    source: str
    frames: int | None = None
    fps: float | None = None
    size: tuple[int, int] | None = None


@dataclass(frozen=True)
class SourceItem:
    """One picture to process.

    Attributes:
        name (str), stem (str): unique, stable names (see the module docstring).
        image (PIL.Image.Image): 8-bit RGB.
        path (Path): the image or video file.
        source (str): the SOURCE argument it came from.
        frame_index (int | None): 0-based frame number in the video (None for an image).
        timestamp (float | None): seconds from the start of the video (``frame_index / fps``).
        fps (float | None): the video's frame rate.
    """

    name: str
    stem: str
    image: Image.Image
    path: Path
    source: str
    frame_index: int | None = None
    timestamp: float | None = None
    fps: float | None = None

    @property
    def is_frame(self) -> bool:
        return self.frame_index is not None

    def array(self) -> np.ndarray:
        """The picture as ``np.ndarray[H, W, 3]`` ``uint8`` RGB."""
        return np.asarray(self.image)


@dataclass
class SourceReport:
    """What a read of the sources found; filled in by :func:`resolve_sources` and :func:`iter_sources`.

    Attributes:
        images (int): image files read.
        frames (int): video frames read.
        videos (int): videos of which at least one frame was read.
        expected (int): items the resolved files should give (video frame counts
            come from their headers, so this is an estimate; for progress bars).
        duplicates (int): files reached through more than one SOURCE (read once).
        ignored (int): files in folders or glob matches that are neither images nor videos.
        skipped (SkipCounter): each bad input, with its reason.
    """

    images: int = 0
    frames: int = 0
    videos: int = 0
    expected: int = 0
    duplicates: int = 0
    ignored: int = 0
    skipped: SkipCounter = field(default_factory=lambda: SkipCounter("inputs"))

    @property
    def read(self) -> int:
        """Items yielded (images + frames)."""
        return self.images + self.frames

    def summary(self) -> str:
        """One line, e.g. ``"read 3 images and 20 frames of 1 video; skipped 2 of 25 inputs: 1 corrupt, ..."``."""
        parts = [f"{self.images} image{'s' * (self.images != 1)}"]
        if self.frames or self.videos:
            parts.append(
                f"{self.frames} frame{'s' * (self.frames != 1)} of {self.videos} video{'s' * (self.videos != 1)}"
            )
        line = "read " + " and ".join(parts)
        if self.skipped:
            counts = ", ".join(f"{n} {_plural(reason, n)}" for reason, n in self.skipped.counts.items())
            line += f"; skipped {len(self.skipped)} of {self.read + len(self.skipped)} inputs: {counts}"
        if self.duplicates:
            line += f"; {self.duplicates} duplicate{'s' * (self.duplicates != 1)} read once"
        if self.ignored:
            line += f"; ignored {self.ignored} other file{'s' * (self.ignored != 1)}"
        return line


def _plural(reason: str, n: int) -> str:
    """``"corrupt frame"`` -> ``"corrupt frames"`` for n != 1; adjectives (``"corrupt"``) stay."""
    return reason + "s" if n != 1 and reason.rsplit(" ", 1)[-1] in ("folder", "video", "frame", "glob") else reason


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    """Consecutive lists of ``n`` items (the last one shorter), lazily.

    Raises:
        ValueError: if ``n < 1``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"batch size must be a positive int, got {n!r}")
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------- #
# Resolution: SOURCE arguments -> files (cheap: no image is decoded)
# --------------------------------------------------------------------------- #


class _Skip:
    """Records a bad input in ``report`` (a warning naming it), or raises :class:`SourceError` when ``strict``."""

    def __init__(self, strict: bool, report: SourceReport) -> None:
        self.strict, self.report = bool(strict), report
        self.first: list[str] = []  # the first few, for the message when nothing could be read

    def __call__(self, path: str | os.PathLike, reason: str, detail: str) -> None:
        if self.strict:
            raise SourceError(str(path), reason, detail)
        if len(self.first) < 3:
            self.first.append(f"{path}: {detail}")
        self.report.skipped.skip(path, reason, detail)


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _visible_files(folder: Path, recursive: bool) -> list[Path]:
    """Files in ``folder`` (and its sub-folders), sorted, hidden entries skipped (as ``find_images``)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        found += [Path(dirpath) / n for n in sorted(filenames) if not n.startswith(".")]
    return found


def _media_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "image" if suffix in IMAGE_EXTENSIONS else "video" if suffix in VIDEO_EXTENSIONS else None


def _glob_base(pattern: str) -> Path:
    """The folder above the first part of ``pattern`` with a wildcard (names are relative to it)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _is_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


class _Resolver:
    """Turns SOURCE arguments into :class:`SourceEntry` objects with unique names."""

    def __init__(self, recursive: bool, strict: bool, max_pixels: int | None, report: SourceReport) -> None:
        self.recursive, self.max_pixels, self.report = recursive, max_pixels, report
        self.bad = _Skip(strict, report)
        self.entries: list[SourceEntry] = []
        self._seen: set[str] = set()
        self._stems: set[str] = set()

    def add_source(self, source: str | os.PathLike) -> None:
        text = os.fspath(source)
        path = Path(text)
        if path.is_dir():
            self.add_folder(path, text)
        elif path.is_file():
            kind = "video" if path.suffix.lower() in VIDEO_EXTENSIONS else "image"
            self.add_file(path, path.name, kind, text)
        elif _is_glob(text):
            self.add_glob(text)
        elif path.exists():
            self.bad(text, "not an image", "neither a regular file nor a folder")
        else:
            self.bad(text, "missing", "no such file or folder")

    def add_folder(self, folder: Path, text: str) -> None:
        files = _visible_files(folder, self.recursive)
        found = [p for p in files if _media_kind(p) == "image"]
        others = [p for p in files if _media_kind(p) != "image"]
        if not found:
            videos = sum(_media_kind(p) == "video" for p in others)
            deeper = 0 if self.recursive else sum(_media_kind(p) == "image" for p in _visible_files(folder, True))
            hint = ""
            if videos:
                hint = f"; it holds {videos} video file{'s' * (videos != 1)}: name {'them' if videos > 1 else 'it'}"
            elif deeper:
                hint = f"; {deeper} in its sub-folders: search them recursively"
            self.bad(text, "empty folder", f"folder holds no image files{hint}")
            return
        self.report.ignored += len(others)
        for p in found:
            self.add_file(p, p.relative_to(folder).as_posix(), "image", text)

    def add_glob(self, pattern: str) -> None:
        matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True))]
        files = [p for p in matches if p.is_file() and not p.name.startswith(".")]
        media = [p for p in files if _media_kind(p) is not None]
        if not media:
            what = f"{len(files)} file{'s' * (len(files) != 1)}, none an image or video" if files else "nothing"
            self.bad(pattern, "unmatched glob", f"glob pattern matches {what}")
            return
        self.report.ignored += len(files) - len(media)
        base = _glob_base(pattern)
        for p in media:
            try:
                rel = p.relative_to(base).as_posix()
            except ValueError:
                rel = p.name
            self.add_file(p, rel, _media_kind(p), pattern)

    def unique_stem(self, stem: str) -> str:
        unique, k = stem, 2
        while unique in self._stems:
            unique, k = f"{stem}~{k}", k + 1
        self._stems.add(unique)
        return unique

    def add_file(self, path: Path, rel: str, kind: str, source: str) -> None:
        real = os.path.realpath(path)
        if real in self._seen:
            self.report.duplicates += 1
            return
        self._seen.add(real)
        rel_path = PurePosixPath(rel)
        suffix = rel_path.suffix if kind == "video" or rel_path.suffix.lower() in IMAGE_EXTENSIONS else ""
        stem = self.unique_stem(rel[: len(rel) - len(suffix)] if suffix else rel)
        name = stem + suffix
        if kind == "image":
            self.entries.append(SourceEntry(path, "image", name, stem, source))
            return
        info = probe_video(path)
        if info is None:
            self.bad(path, "unreadable video", "OpenCV cannot open this video file")
            return
        limit = get_image_limits().max_pixels if self.max_pixels is None else self.max_pixels
        if limit is not None and info.width * info.height > limit:
            self.bad(
                path,
                "too large",
                f"{info.width}x{info.height} frames exceed the limit of {limit} pixels; "
                "raise it with --max-image-pixels",
            )
            return
        size = (info.width, info.height)
        self.entries.append(SourceEntry(path, "video", name, stem, source, info.frames, info.fps, size))


def resolve_sources(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    recursive: bool = False,
    strict: bool = False,
    max_pixels: int | None = None,
    report: SourceReport | None = None,
) -> list[SourceEntry]:
    """Lists the files that SOURCE arguments name, without decoding them (videos: header only).

    Call it before loading a model: a typo in a path is then reported at once.

    Args:
        sources: SOURCE arguments (see the module docstring), or one.
        recursive: folders: also their sub-folders.
        strict: raise on the first bad source instead of skipping it.
        max_pixels: largest frame ``width * height`` of a video (``None``: the
            setting of :func:`~sppnet.data.images.load_image`).
        report: filled in (``skipped``, ``duplicates``, ``ignored``).

    Returns:
        The files in the order of ``sources``, each source's files sorted.

    Raises:
        SourceError: a bad source with ``strict``, or no source names a usable file.
    """
    report = report if report is not None else SourceReport()
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise SourceError("<sources>", "nothing read", "no SOURCE given (image files, folders, globs or videos)")
    resolver = _Resolver(bool(recursive), bool(strict), max_pixels, report)
    for source in sources:
        resolver.add_source(source)
    if not resolver.entries:
        listed = ", ".join(os.fspath(s) for s in sources[:5]) + (", ..." if len(sources) > 5 else "")
        raise SourceError(listed, "nothing read", f"no image or video to read ({report.summary()})")
    return resolver.entries


# --------------------------------------------------------------------------- #
# Iteration: files -> decoded pictures
# --------------------------------------------------------------------------- #


def iter_sources(
    sources: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[SourceEntry],
    *,
    recursive: bool = False,
    strict: bool = False,
    video_stride: int = 1,
    max_pixels: int | None = None,
    report: SourceReport | None = None,
) -> Iterator[SourceItem]:
    """The pictures of SOURCE arguments, one :class:`SourceItem` at a time, in order.

    The sources are resolved now (see :func:`resolve_sources`, whose errors are
    raised by this call); pictures are decoded as the iterator is consumed.

    Args:
        sources: SOURCE arguments, or the entries :func:`resolve_sources` returned.
        recursive, strict, max_pixels: as in :func:`resolve_sources`; ``max_pixels``
            also guards every image file.
        video_stride: read every ``video_stride``-th frame of a video (frames
            ``0, s, 2s, ...``; the others are skipped without decoding them to RGB).
        report: filled in while iterating; read ``report.summary()`` at the end.

    Yields:
        SourceItem: 8-bit RGB pictures with unique names.

    Raises:
        SourceError: a bad source, image or frame with ``strict``; or (either mode)
            when the iteration ends without a single picture read.
        ValueError: ``video_stride < 1``.
    """
    if isinstance(video_stride, bool) or not isinstance(video_stride, int) or video_stride < 1:
        raise ValueError(f"video_stride must be a positive int, got {video_stride!r}")
    report = report if report is not None else SourceReport()
    given = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if given and all(isinstance(e, SourceEntry) for e in given):
        entries = given
    else:
        entries = resolve_sources(given, recursive=recursive, strict=strict, max_pixels=max_pixels, report=report)
    report.expected += sum(1 if e.kind == "image" else -(-(e.frames or 0) // video_stride) for e in entries)
    return _iterate(entries, strict, video_stride, max_pixels, report)


def _iterate(
    entries: list[SourceEntry], strict: bool, stride: int, max_pixels: int | None, report: SourceReport
) -> Iterator[SourceItem]:
    bad = _Skip(strict, report)
    for entry in entries:
        if entry.kind == "image":
            try:
                img = load_image(entry.path, max_pixels=max_pixels)
            except ImageError as e:
                bad(e.path, e.reason, e.detail)
                continue
            report.images += 1
            yield SourceItem(entry.name, entry.stem, img, entry.path, entry.source)
        else:
            yield from _frames(entry, stride, report, bad)
    if report.read == 0:
        raise SourceError(
            ", ".join(e.name for e in entries[:5]) + (", ..." if len(entries) > 5 else ""),
            "nothing read",
            f"no image or frame could be read ({report.summary()})" + "".join(f"; {m}" for m in bad.first),
        )


def _frames(entry: SourceEntry, stride: int, report: SourceReport, bad: _Skip) -> Iterator[SourceItem]:
    info = VideoInfo(entry.frames, entry.fps, *entry.size)

    def on_bad(index: int | None, reason: str, detail: str) -> None:
        bad(str(entry.path) if index is None else f"{entry.path}#frame{index:06d}", reason, detail)

    for read, (index, rgb) in enumerate(read_frames(entry.path, info, stride, on_bad)):
        report.frames += 1
        report.videos += read == 0
        yield SourceItem(
            f"{entry.name}#frame{index:06d}",
            f"{entry.stem}_frame{index:06d}",
            Image.fromarray(rgb),
            entry.path,
            entry.source,
            index,
            index / entry.fps if entry.fps else None,
            entry.fps,
        )
