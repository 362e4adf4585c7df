"""Pictures: training curves, detections, feature maps, pyramid bins (matplotlib, Agg), annotated videos.

The names below are imported on first use (matplotlib and OpenCV load only then)::

    from sppnet.viz import draw_detections, VideoWriter, annotate_frame, write_annotated_video
"""

import importlib

_EXPORTS = {
    "draw_detections": "sppnet.viz.detections",
    "VideoWriter": "sppnet.viz.video",
    "annotate_frame": "sppnet.viz.video",
    "write_annotated_video": "sppnet.viz.video",
}

__all__ = ["VideoWriter", "annotate_frame", "draw_detections", "write_annotated_video"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sppnet.viz' has no attribute {name!r}")
