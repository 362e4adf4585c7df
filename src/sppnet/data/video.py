"""Video files in, numbered RGB frames out (OpenCV ``cv2.VideoCapture``), surviving corrupt frames.

:func:`probe_video` reads a video's header (frame count, rate, size);
:func:`read_frames` decodes frames ``0, s, 2s, ...`` and reports each frame it
cannot decode through a callback instead of stopping, so one damaged frame costs
that frame only. :mod:`sppnet.data.sources` builds named items on top.

Frame numbers. After a failed read OpenCV's FFmpeg backend has already moved past
the bad frame, and ``CAP_PROP_POS_FRAMES`` then lags by one; frames are therefore
numbered by our own counter, which ``tests/test_sources.py`` checks against
frames that carry their number in their pixels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["VIDEO_EXTENSIONS", "VideoInfo", "probe_video", "read_frames"]

#: File name endings (lower case) read as videos.
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")

# A decoder that fails this many frames in a row has met the end of the usable
# data (a truncated file, or a container that over-reports its frame count).
_MAX_BAD_RUN = 8


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says.

    Attributes:
        frames (int | None): frame count (an estimate for some containers; None when unknown).
        fps (float | None): frames per second (None when unknown).
        width (int), height (int): frame size in pixels.
    """

    frames: int | None
    fps: float | None
    width: int
    height: int


def probe_video(path: str | os.PathLike) -> VideoInfo | None:
    """The header of a video file, or None when OpenCV cannot open it."""
    cap = cv2.VideoCapture(os.fspath(path))
    try:
        if not cap.isOpened():
            return None
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        cap.release()
    return VideoInfo(frames if frames > 0 else None, fps if math.isfinite(fps) and fps > 0 else None, width, height)


def read_frames(
    path: str | os.PathLike,
    info: VideoInfo,
    stride: int = 1,
    on_bad: Callable[[int | None, str, str], None] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Decodes frames ``0, stride, 2 * stride, ...`` of a video.

    Reading ends at the first failure at or after frame ``info.frames`` (at the
    first failure when the count is unknown), or after ``_MAX_BAD_RUN``
    failures in a row. Frames before ``info.frames`` that fail and are followed
    by a good one are reported one by one as ``"corrupt frame"``; failures up
    to the end as one ``"truncated video"``; a video of which no frame decodes
    as ``"unreadable video"`` (frame ``None``).

    Args:
        path: the video file.
        info: its header (:func:`probe_video`).
        stride: keep every ``stride``-th frame; the others are grabbed, not converted.
        on_bad: called as ``on_bad(frame_index, reason, detail)`` for each problem
            (it may raise to stop); None ignores them.

    Yields:
        ``(frame_index, np.ndarray[H, W, 3] uint8 RGB)``.
    """
    report = on_bad or (lambda index, reason, detail: None)
    cap = cv2.VideoCapture(os.fspath(path))
    if not cap.isOpened():  # it opened when probed: the file changed since
        report(None, "unreadable video", "OpenCV cannot open this video file")
        return
    index, read = 0, 0
    failed: list[int] = []  # the current run of frames that failed to decode
    try:
        while True:
            wanted = index % stride == 0
            ok = cap.grab()
            frame = cap.retrieve()[1] if ok and wanted else None
            if not ok or (wanted and frame is None):
                if info.frames is None or index >= info.frames:
                    break  # the end (a header that under-counts costs nothing: we read on to here)
                failed.append(index)
                if len(failed) > _MAX_BAD_RUN:
                    break
                index += 1
                continue
            for i in failed:
                if i % stride == 0:
                    report(i, "corrupt frame", "frame cannot be decoded")
            failed = []
            if wanted:
                read += 1
                yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        cap.release()
    if read == 0:
        report(None, "unreadable video", "no frame could be decoded")
    elif failed:
        report(
            failed[0],
            "truncated video",
            f"cannot be decoded from frame {failed[0]} on (the header announces {info.frames} frames)",
        )
