"""VideoWriter / write_annotated_video: frames read back with cv2.VideoCapture match what was drawn."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from sppnet.viz.video import VideoWriter, annotate_frame, write_annotated_video

CLASSES = ["circle", "square"]


def _clip(n: int, w: int, h: int) -> list[np.ndarray]:
    """Frame k: a smooth gradient (codec friendly) brightened by 8 k, so frames are told apart."""
    ramp = np.linspace(40, 140, w, dtype=np.float64)[None, :, None]
    return [np.broadcast_to(ramp + 8 * k, (h, w, 3)).astype(np.uint8) for k in range(n)]


def _detections(n: int) -> list[dict]:
    return [
        {
            "boxes": torch.tensor([[10.0 + 6 * k, 12.0, 60.0 + 6 * k, 70.0]]),
            "labels": torch.tensor([k % 2]),
            "scores": torch.tensor([0.5 + 0.05 * k]),
        }
        for k in range(n)
    ]


def _read_back(path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


@pytest.mark.parametrize("suffix", [".avi", ".mp4"])
def test_annotated_video_has_every_frame_drawn(tmp_path, suffix):
    frames, dets = _clip(7, 128, 96), _detections(7)
    path = write_annotated_video(tmp_path / f"out{suffix}", frames, dets, CLASSES, fps=12.5)
    back = _read_back(path)
    assert len(back) == 7 and all(b.shape == (96, 128, 3) for b in back)
    cap = cv2.VideoCapture(str(path))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(12.5, rel=1e-3)
    cap.release()
    for k, (got, raw, det) in enumerate(zip(back, frames, dets)):
        want = annotate_frame(raw, det["boxes"], det["labels"], det["scores"], CLASSES).astype(float)
        drawn = np.abs(want - raw).max(axis=2) > 0  # the pixels the boxes and tags changed
        assert drawn.sum() > 100
        got = got.astype(float)
        err = np.abs(got - want)
        # Within codec error (MJPG / MPEG-4 at OpenCV's defaults: ~4 levels) of the drawn frame ...
        assert err.mean() < 6, f"frame {k}: mean error {err.mean():.1f}"
        # ... the boxes and tags are there (the drawn pixels are far closer to them than to the raw frame) ...
        assert np.abs(got - raw)[drawn].mean() > 2 * err[drawn].mean()
        # ... and the frames are in order (frame k's background matches raw frame k, not its neighbour).
        neighbour = frames[k + 1 if k + 1 < len(frames) else k - 1]
        assert np.abs(got - raw)[~drawn].mean() < 5 < np.abs(got - neighbour)[~drawn].mean()


def test_odd_sizes_are_padded_and_other_sizes_refused(tmp_path):
    path = tmp_path / "odd.avi"
    with VideoWriter(path, fps=5) as writer:
        for frame in _clip(3, 41, 31):
            writer.write(frame)
    assert writer.frames == 3 and writer.size == (41, 31)
    back = _read_back(path)
    assert len(back) == 3 and back[0].shape == (32, 42, 3)
    np.testing.assert_allclose(back[0][:31, :41].mean(), _clip(1, 41, 31)[0].mean(), atol=2)
    with (
        pytest.raises(ValueError, match="frame 1 is 40x30, the video is 41x31"),
        VideoWriter(tmp_path / "mixed.avi", fps=5) as writer,
    ):
        writer.write(_clip(1, 41, 31)[0])
        writer.write(_clip(1, 40, 30)[0])
    # Atomic: nothing under the name, no temporary file left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.avi"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown video suffix '.gif'"):
        VideoWriter(tmp_path / "a.gif", fps=5)
    for fps in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="fps"):
            VideoWriter(tmp_path / "a.avi", fps=fps)
    with pytest.raises(ValueError, match="uint8"):
        VideoWriter(tmp_path / "a.avi", fps=5).write(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="no frame was written"):
        write_annotated_video(tmp_path / "empty.avi", [], [], CLASSES, fps=5)
    with pytest.raises(ValueError, match="detections end at frame 2"):
        write_annotated_video(tmp_path / "short.avi", _clip(3, 16, 16), _detections(2), CLASSES, fps=5)
    with pytest.raises(ValueError, match="more detections than the 2 frames"):
        write_annotated_video(tmp_path / "long.avi", _clip(2, 16, 16), _detections(3), CLASSES, fps=5)
    assert list(tmp_path.iterdir()) == []
