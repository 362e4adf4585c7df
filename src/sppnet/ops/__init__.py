"""Tensor operators: tensors in, tensors out. No datasets, no config.

* :func:`spatial_pyramid_pool` / :class:`SpatialPyramidPool` -- the SPP layer.
* :func:`roi_spatial_pyramid_pool` / :class:`RoISpatialPyramidPool` -- the
  pyramid over many windows of one feature map (detection).
* :func:`map_boxes_to_features` -- image windows to feature-map cells (Appendix).
"""

from sppnet.ops.boxes import (
    batched_nms,
    box_area,
    box_iou,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    nms,
    remove_small_boxes,
    select_detections,
    validate_boxes,
)
from sppnet.ops.mapping import backbone_geometry, map_boxes_to_features
from sppnet.ops.roi_spp import RoISpatialPyramidPool, roi_spatial_pyramid_pool
from sppnet.ops.spp import SpatialPyramidPool, pyramid_output_dim, spatial_pyramid_pool

__all__ = [
    "spatial_pyramid_pool",
    "SpatialPyramidPool",
    "pyramid_output_dim",
    "roi_spatial_pyramid_pool",
    "RoISpatialPyramidPool",
    "map_boxes_to_features",
    "backbone_geometry",
    "box_area",
    "box_iou",
    "nms",
    "batched_nms",
    "select_detections",
    "encode_boxes",
    "decode_boxes",
    "clip_boxes",
    "remove_small_boxes",
    "validate_boxes",
]
