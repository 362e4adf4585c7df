"""Data sets: image files, the built-in shapes data, ImageFolder, Pascal VOC and COCO.

Layering: ``data`` may import ``ops`` and ``models``, never ``engine`` or ``cli``.

* :mod:`~sppnet.data.images` - ``load_image`` (upright 8-bit RGB or an
  ``ImageError`` naming the file), ``read_image_size`` (header only),
  ``pil_to_tensor``, ``SkipCounter``;
* :mod:`~sppnet.data.limits` - ``ImageLimits``: the pixel, aspect-ratio,
  short-side and selective-search limits every image path shares, with their
  CLI flags (``FLAGS``) and the process-wide setting (``set_image_limits``);
* :mod:`~sppnet.data.synthetic` - deterministic shapes data sets (no download);
* :mod:`~sppnet.data.imagefolder` - ``root/<split>/<class>/*`` classification;
* :mod:`~sppnet.data.voc`, :mod:`~sppnet.data.coco` - detection records with
  boxes ``(x1, y1, x2, y2)`` in 0-based inclusive pixels (see ``voc``);
* :mod:`~sppnet.data.safety` - refusal of names that escape their folder;
* :mod:`~sppnet.data.checks` - validation before work: ``check_detection_data``,
  ``check_classification_data`` (a ``DataReport`` of what is used and skipped,
  or a ``DataError``).
"""

from sppnet.data.checks import DataError, DataReport, check_classification_data, check_detection_data
from sppnet.data.coco import COCODetection
from sppnet.data.imagefolder import ImageFolderDataset, find_images
from sppnet.data.images import (
    IMAGE_EXTENSIONS,
    DataWarning,
    ImageError,
    SkipCounter,
    check_image_size,
    load_image,
    pil_to_tensor,
    read_image_size,
    set_max_image_pixels,
    to_rgb,
)
from sppnet.data.limits import FLAGS as IMAGE_LIMIT_FLAGS
from sppnet.data.limits import ImageLimits, get_image_limits, set_image_limits
from sppnet.data.safety import resolve_inside, validate_class_names
from sppnet.data.synthetic import (
    CLASSES,
    default_data_root,
    make_classification_dataset,
    make_detection_dataset,
)
from sppnet.data.voc import VOCDetection, parse_voc_xml, write_voc_annotation

__all__ = [
    "CLASSES",
    "IMAGE_EXTENSIONS",
    "IMAGE_LIMIT_FLAGS",
    "COCODetection",
    "DataError",
    "DataReport",
    "DataWarning",
    "ImageError",
    "ImageFolderDataset",
    "ImageLimits",
    "SkipCounter",
    "VOCDetection",
    "check_classification_data",
    "check_detection_data",
    "check_image_size",
    "default_data_root",
    "find_images",
    "get_image_limits",
    "load_image",
    "make_classification_dataset",
    "make_detection_dataset",
    "parse_voc_xml",
    "pil_to_tensor",
    "read_image_size",
    "resolve_inside",
    "set_image_limits",
    "set_max_image_pixels",
    "to_rgb",
    "validate_class_names",
    "write_voc_annotation",
]
