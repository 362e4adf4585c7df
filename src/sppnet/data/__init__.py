"""Data sets: image files, the built-in shapes data, ImageFolder, Pascal VOC and COCO.

Layering: ``data`` may import ``ops`` and ``models``, never ``engine`` or ``cli``.

* :mod:`~sppnet.data.images` - ``load_image`` (upright 8-bit RGB or an
  ``ImageError`` naming the file), ``pil_to_tensor``, ``SkipCounter``;
* :mod:`~sppnet.data.synthetic` - deterministic shapes data sets (no download);
* :mod:`~sppnet.data.imagefolder` - ``root/<split>/<class>/*`` classification;
* :mod:`~sppnet.data.voc`, :mod:`~sppnet.data.coco` - detection records with
  boxes ``(x1, y1, x2, y2)`` in 0-based inclusive pixels (see ``voc``);
* :mod:`~sppnet.data.safety` - refusal of names that escape their folder;
* :mod:`~sppnet.data.sources` - what ``predict`` reads: files, folders, globs and
  videos (:mod:`~sppnet.data.video`) as one stream of named pictures.
"""

from sppnet.data.coco import COCODetection
from sppnet.data.imagefolder import ImageFolderDataset, find_images
from sppnet.data.images import (
    IMAGE_EXTENSIONS,
    DataWarning,
    ImageError,
    SkipCounter,
    load_image,
    pil_to_tensor,
    set_max_image_pixels,
    to_rgb,
)
from sppnet.data.safety import resolve_inside, validate_class_names
from sppnet.data.sources import (
    VIDEO_EXTENSIONS,
    SourceEntry,
    SourceError,
    SourceItem,
    SourceReport,
    batched,
    iter_sources,
    resolve_sources,
)
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
    "VIDEO_EXTENSIONS",
    "COCODetection",
    "DataWarning",
    "ImageError",
    "ImageFolderDataset",
    "SkipCounter",
    "SourceEntry",
    "SourceError",
    "SourceItem",
    "SourceReport",
    "VOCDetection",
    "batched",
    "default_data_root",
    "find_images",
    "iter_sources",
    "load_image",
    "make_classification_dataset",
    "make_detection_dataset",
    "parse_voc_xml",
    "pil_to_tensor",
    "resolve_inside",
    "resolve_sources",
    "set_max_image_pixels",
    "to_rgb",
    "validate_class_names",
    "write_voc_annotation",
]
