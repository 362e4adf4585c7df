"""Annotated videos: detections drawn on each frame, written with OpenCV's ``cv2.VideoWriter``.

:class:`VideoWriter` takes RGB frames (arrays or Pillow images) and writes them
to a temporary file next to the destination, renamed onto it when closed, so an
interrupted run never leaves a half-written video under the final name.
:func:`annotate_frame` draws one frame's detections with
:func:`sppnet.viz.detections.draw_detections` (the same pictures as the per-image
PNGs); :func:`write_annotated_video` does both for a whole clip.

Codec by suffix: ``.avi`` / ``.mkv`` Motion-JPEG (``MJPG``), ``.mp4`` / ``.m4v`` /
``.mov`` MPEG-4 part 2 (``mp4v``); both ship with OpenCV's FFmpeg. FFmpeg's
encoders work on 2x2 blocks and silently crop an odd width or height, so odd
frames are padded by one pixel on the right / bottom (edge pixels repeated);
frames of another size than the first are refused (OpenCV would drop them
without a word).
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
from PIL import Image
from torch import Tensor
from typing_extensions import Self  # typing.Self from Python 3.11; a dependency of torch

from sppnet.viz.detections import draw_detections

__all__ = ["CODECS", "VideoWriter", "annotate_frame", "write_annotated_video"]

#: Four-character codec per file suffix.
CODECS: dict[str, str] = {".avi": "MJPG", ".mkv": "MJPG", ".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v"}


def _as_rgb_array(frame: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(frame, Image.Image):
        frame = np.asarray(frame.convert("RGB"))
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"a frame must be uint8 [H, W, 3] RGB, got {frame.dtype} {list(frame.shape)}")
    return frame


class VideoWriter:
    """RGB frames in, a video file out (atomically, see the module docstring).

    Args:
        path: destination; its suffix picks the codec (:data:`CODECS`).
        fps: frames per second (finite, > 0).
        fourcc: four-character codec instead of the suffix's.

    Attributes:
        frames (int): frames written so far.
        size (tuple[int, int] | None): ``(width, height)`` of the input frames (set by the first).

    Use it as a context manager: on a normal exit the video is finished and
    renamed onto ``path``; on an exception the temporary file is removed.

    Raises:
        ValueError: unknown suffix, bad ``fps``, or OpenCV cannot open a writer.
    """

    def __init__(self, path: str | os.PathLike, fps: float, fourcc: str | None = None) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if fourcc is None:
            if suffix not in CODECS:
                raise ValueError(f"{self.path}: unknown video suffix {suffix!r}; use one of {', '.join(CODECS)}")
            fourcc = CODECS[suffix]
        if len(fourcc) != 4:
            raise ValueError(f"fourcc must have four characters, got {fourcc!r}")
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
        self.fps, self.fourcc = float(fps), fourcc
        self.frames = 0
        self.size: tuple[int, int] | None = None
        self._tmp = self.path.parent / f".{self.path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}"
        self._writer: cv2.VideoWriter | None = None

    def write(self, frame: np.ndarray | Image.Image) -> None:
        """Appends one frame (``np.ndarray[H, W, 3]`` uint8 RGB or a Pillow image) of the first frame's size."""
        rgb = _as_rgb_array(frame)
        h, w = rgb.shape[:2]
        if self._writer is None:
            self.size = (w, h)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*self.fourcc), self.fps, self._even(w, h))
            if not writer.isOpened():
                raise ValueError(f"{self.path}: OpenCV cannot write {self.fourcc!r} video at {w}x{h}")
            self._writer = writer
        elif (w, h) != self.size:
            raise ValueError(f"{self.path}: frame {self.frames} is {w}x{h}, the video is {self.size[0]}x{self.size[1]}")
        pad_w, pad_h = self._even(w, h)[0] - w, self._even(w, h)[1] - h
        if pad_w or pad_h:
            rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        self._writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    @staticmethod
    def _even(w: int, h: int) -> tuple[int, int]:
        return w + w % 2, h + h % 2

    def close(self) -> Path:
        """Finishes the video and renames it onto ``path``.

        Raises:
            ValueError: no frame was written (nothing is created).
        """
        if self._writer is None:
            raise ValueError(f"{self.path}: no frame was written")
        self._writer.release()
        self._writer = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drops what was written (the destination is left untouched)."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def annotate_frame(
    frame: np.ndarray | Image.Image,
    boxes: Tensor | Sequence,
    labels: Tensor | Sequence,
    scores: Tensor | Sequence | None,
    class_names: Sequence[str],
) -> np.ndarray:
    """One frame with its detections drawn (as :func:`~sppnet.viz.detections.draw_detections`).

    Args:
        frame: ``np.ndarray[H, W, 3]`` uint8 RGB or a Pillow image (not modified).
        boxes: ``[D, 4]`` ``(x1, y1, x2, y2)`` inclusive pixels; labels ``[D]``; scores ``[D]`` or None.
        class_names: names of the label indices.

    Returns:
        np.ndarray[H, W, 3] uint8 RGB, a new array.
    """
    image = frame if isinstance(frame, Image.Image) else Image.fromarray(_as_rgb_array(frame))
    return np.asarray(draw_detections(image, boxes, labels, scores, class_names))


def write_annotated_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray | Image.Image],
    detections: Iterable[Mapping[str, Tensor | Sequence]],
    class_names: Sequence[str],
    fps: float,
    fourcc: str | None = None,
) -> Path:
    """Writes a clip with each frame's detections drawn on it.

    Args:
        path: the video (suffix picks the codec, see :data:`CODECS`).
        frames: RGB frames, all of one size.
        detections: one ``{"boxes", "labels", "scores"}`` dict per frame (the
            detector's output format), in the order of ``frames``.
        class_names: names of the label indices.
        fps: frames per second (the source video's, to keep its speed).
        fourcc: codec instead of the suffix's.

    Returns:
        ``path``.

    Raises:
        ValueError: ``frames`` and ``detections`` differ in length, frames differ
            in size, or no frame is given (nothing is written).
    """
    frames, detections = iter(frames), iter(detections)
    with VideoWriter(path, fps, fourcc) as writer:
        for frame in frames:
            det = next(detections, None)
            if det is None:
                raise ValueError(f"{path}: detections end at frame {writer.frames}, before the frames")
            writer.write(annotate_frame(frame, det["boxes"], det["labels"], det.get("scores"), class_names))
        if next(detections, None) is not None:
            raise ValueError(f"{path}: more detections than the {writer.frames} frames")
    return Path(path)
