"""Validate before work: everything about the data that can be checked before a proposal is computed.

A detection run spends minutes (here) or hours (on VOC) on selective search and
backbone pretraining before it first looks at a box, so a mistake in the data
must be found before that: an annotation ``<size>`` that disagrees with its
image, an empty annotation list, a COCO file whose boxes are all crowd, a
classification folder with one class. The two functions here take what the
data sets produce and return one report of what will be used, what was
skipped and why, and what is suspicious::

    report = check_detection_data(data.records, data.class_names, split="train",
                                  skipped=[data.skipped_images, data.skipped_objects])
    print(report.summary(), file=sys.stderr)
    records = report.records          # the images that passed

Degenerate data is an error (:class:`DataError`, a ``ValueError`` whose message
holds the summary); data that can still train but will give a poor model is a
warning (:class:`~sppnet.data.images.DataWarning`, also listed in the summary),
an error with ``strict=True``. Nothing is silent.

What is checked, detection (:func:`check_detection_data`):

* at least one class, unique non-blank names; every label is a valid index;
* the split has images, and after skipping it still has some;
* each image's header (read without decoding its pixels): readable, within the
  size limits of :mod:`sppnet.data.limits` (and selective search's, when its
  parameters are given), and the size its annotation states (EXIF orientation
  applied, as :func:`~sppnet.data.images.load_image` does); a mismatch is
  skipped, because the boxes were drawn on another picture;
* there are objects at all (an empty annotation list is an error), and positives
  (non-difficult, non-crowd objects: SPP-net Sec. 4 trains its SVMs on the
  ground-truth boxes, difficult ones left out); a class without positives is a
  warning.

Classification (:func:`check_classification_data`): at least two classes (one
class gives accuracy 1.0 by construction), non-empty splits, labels in range,
every class has a training image (warning otherwise), the validation set uses
the training classes.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sppnet.data.images import DataWarning, ImageError, SkipCounter, read_image_size
from sppnet.data.limits import ImageLimits, get_image_limits
from sppnet.data.safety import validate_class_names

__all__ = ["DataError", "DataReport", "check_classification_data", "check_detection_data"]


class DataError(ValueError):
    """The data cannot train a model; the message ends with the summary of what was found.

    Attributes:
        report (DataReport): what was counted before the check failed.
    """

    def __init__(self, problem: str, report: DataReport) -> None:
        self.problem = problem
        self.report = report
        super().__init__(f"{problem}\n{report.summary()}")


@dataclasses.dataclass
class DataReport:
    """What a check found, for one split.

    Attributes:
        what: the split's name in messages (``"detection split 'train'"``).
        classes: class names in label order.
        images: images listed (before skipping).
        records: the detection records that passed (empty for classification).
        objects: objects of the kept images (detection), 0 otherwise.
        difficult: of which difficult / crowd.
        per_class: per class name, positives (detection: non-difficult objects)
            or images (classification); ``None`` if the data set cannot tell.
        skipped: image-level skips found by the check (a :class:`SkipCounter`).
        earlier: one-line summaries of skips made earlier, while the data set
            was read (its own counters), repeated in the summary.
        warnings: the problems that do not stop training.
    """

    what: str
    classes: list[str]
    images: int = 0
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    objects: int = 0
    difficult: int = 0
    per_class: dict[str, int] | None = None
    skipped: SkipCounter = dataclasses.field(default_factory=lambda: SkipCounter("images"))
    earlier: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def kept(self) -> int:
        """Images that passed the check."""
        return self.images - len(self.skipped)

    def summary(self) -> str:
        """A few lines: counts, per-class counts, skips by reason, warnings."""
        head = f"{self.what}: {self.kept} of {self.images} images kept, {len(self.classes)} classes"
        if self.records or self.objects:
            head += f", {self.objects} objects ({self.difficult} difficult or crowd)"
        lines = [head]
        if self.per_class is not None:
            label = "positives per class" if self.records or self.objects else "images per class"
            lines.append(f"  {label}: " + ", ".join(f"{c} {n}" for c, n in self.per_class.items()))
        lines.append("  check: " + self.skipped.summary(self.images))
        lines += [f"  while reading: {line}" for line in self.earlier]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _warn(report: DataReport, message: str, strict: bool) -> None:
    if strict:
        raise DataError(f"{message} (strict mode)", report)
    report.warnings.append(message)
    warnings.warn(f"{report.what}: {message}", DataWarning, stacklevel=3)


def _earlier(skipped: Iterable[SkipCounter] | None) -> list[str]:
    return [counter.summary() for counter in (skipped or ()) if counter]


def check_detection_data(
    records: Sequence[Mapping[str, Any]],
    classes: Sequence[str],
    split: str = "train",
    limits: ImageLimits | None = None,
    proposals: Any = None,
    skipped: Iterable[SkipCounter] | None = None,
    check_headers: bool = True,
    strict: bool = False,
) -> DataReport:
    """Checks a detection split before any proposal is computed (see the module docstring).

    Args:
        records: the data set's records (:mod:`sppnet.data.voc` format:
            ``image_path``, ``width``, ``height``, ``boxes`` Tensor[G, 4],
            ``labels`` Tensor[G], ``difficult`` Tensor[G] bool).
        classes: class names in label order (background not included).
        split: the split's name, for messages.
        limits: image size limits (``None``: the process-wide ones).
        proposals: selective search settings (a ``SelectiveSearchParams`` or a
            mapping); when given, images that search would refuse
            (``max_search_pixels`` after ``resize_to``) are skipped now, not
            after the other images were searched.
        skipped: the data set's own skip counters (``skipped_images``,
            ``skipped_objects``), repeated in the summary.
        check_headers: read every image header (size, limits); ``False`` checks
            the annotations only.
        strict: raise on the first skipped image or warning.

    Returns:
        The :class:`DataReport`; ``report.records`` holds the records that passed.

    Raises:
        DataError: no class, invalid labels, no images (before or after
            skipping), no objects, or no positives at all; with ``strict``,
            also every skip and warning.
    """
    names = validate_class_names(classes)
    report = DataReport(f"detection split {split!r}", names, images=len(records), earlier=_earlier(skipped))
    if not records:
        raise DataError(f"{report.what} has no images", report)
    limits = get_image_limits() if limits is None else limits
    search = proposals is not None
    resize_to = _resize_to(proposals) if search else None
    per_class = dict.fromkeys(names, 0)
    objects_per_class = dict.fromkeys(names, 0)

    for record in records:
        path = record["image_path"]
        labels = [int(v) for v in record["labels"].tolist()]
        bad = [v for v in labels if not 0 <= v < len(names)]
        if bad:
            raise DataError(f"{path}: labels {bad} are not indices into the {len(names)} classes {names}", report)
        if check_headers:
            problem = _header_problem(path, record, limits, search, resize_to)
            if problem is not None:
                if strict:
                    raise DataError(f"{path}: {problem[1]}", report)
                report.skipped.skip(path, *problem)
                continue
        difficult = [bool(v) for v in record["difficult"].tolist()]
        report.records.append(dict(record))
        report.objects += len(labels)
        report.difficult += sum(difficult)
        for label, hard in zip(labels, difficult):
            objects_per_class[names[label]] += 1
            per_class[names[label]] += not hard
    report.per_class = per_class

    if not report.records:
        raise DataError(f"{report.what}: no usable image left", report)
    if report.objects == 0:
        raise DataError(
            f"{report.what} has no objects: the annotations list none (an empty annotation list, or every "
            f"object skipped); a detector cannot train on background alone",
            report,
        )
    if report.objects == report.difficult:
        raise DataError(
            f"{report.what} has no positive examples: all {report.objects} objects are difficult (VOC) or "
            f"crowd (COCO iscrowd=1), and those are left out of training",
            report,
        )
    for name, count in per_class.items():
        if count == 0:
            why = "no object" if objects_per_class[name] == 0 else f"only {objects_per_class[name]} difficult/crowd"
            _warn(report, f"class {name!r} has no positive example ({why}): it cannot be learnt", strict)
    return report


def _resize_to(proposals: Any) -> int | None:
    """``resize_to`` of selective search settings (a ``SelectiveSearchParams`` or a mapping)."""
    from sppnet.data.proposals import SelectiveSearchParams  # here: cv2 loads only when search is checked

    if isinstance(proposals, Mapping):
        proposals = SelectiveSearchParams(**proposals)
    if not isinstance(proposals, SelectiveSearchParams):
        raise ValueError(f"proposals must be a SelectiveSearchParams or a mapping, got {type(proposals).__name__}")
    return proposals.resize_to


def _header_problem(
    path: str, record: Mapping[str, Any], limits: ImageLimits, search: bool, resize_to: int | None
) -> tuple[str, str] | None:
    """``(reason, detail)`` if the image's header disqualifies it, else None."""
    try:
        width, height = read_image_size(path, limits)
    except ImageError as e:
        return e.reason, e.detail
    stated = (int(record["width"]), int(record["height"]))
    if (width, height) != stated:
        return "size mismatch", (
            f"the annotation says {stated[0]}x{stated[1]} pixels but the image is {width}x{height}; "
            f"its boxes belong to another picture"
        )
    if search:
        problem = limits.search_problem(width, height, resize_to)
        if problem is not None:
            return problem
    return None


def _labels_of(dataset: Any) -> list[int] | None:
    """The labels of a data set without loading images (``targets`` or ``samples``), or None."""
    targets = getattr(dataset, "targets", None)
    if targets is None and getattr(dataset, "samples", None) is not None:
        targets = [label for _, label in dataset.samples]
    return None if targets is None else [int(t) for t in targets]


def check_classification_data(
    train: Any,
    classes: Sequence[str] | None = None,
    val: Any = None,
    skipped: Iterable[SkipCounter] | None = None,
    strict: bool = False,
) -> DataReport:
    """Checks classification data before training (see the module docstring).

    Args:
        train: the training set (``len()``; per-class counts from its
            ``targets`` or ``samples`` when it has them, e.g.
            :class:`~sppnet.data.imagefolder.ImageFolderDataset`).
        classes: class names in label order; ``None``: ``train.classes``.
        val: the validation set, if any (must use the same classes).
        skipped: skip counters of earlier scans (``ImageFolderDataset.scan``),
            repeated in the summary.
        strict: warnings become errors.

    Returns:
        The :class:`DataReport` of the training split (``per_class`` counts
        images; ``None`` when the data set cannot tell without loading them).

    Raises:
        DataError: fewer than two classes, an empty split, labels out of range,
            validation classes that differ from the training ones.
    """
    if classes is None:
        classes = getattr(train, "classes", None)
        if classes is None:
            raise ValueError("pass classes=[...] (names in label order) for a data set without .classes")
    names = validate_class_names(classes)
    where = f" of {train.root / train.split}" if hasattr(train, "root") and hasattr(train, "split") else ""
    report = DataReport(f"classification training split{where}", names, images=len(train), earlier=_earlier(skipped))
    if len(names) < 2:
        raise DataError(
            f"a classifier needs at least 2 classes, got {len(names)} ({', '.join(map(repr, names))}): "
            f"with one class every prediction is right and accuracy is 1.0 by construction",
            report,
        )
    if len(train) == 0:
        raise DataError(f"{report.what} is empty", report)
    labels = _labels_of(train)
    if labels is not None:
        bad = sorted({v for v in labels if not 0 <= v < len(names)})
        if bad:
            raise DataError(f"labels {bad} are not indices into the {len(names)} classes {names}", report)
        report.per_class = {name: 0 for name in names}
        for v in labels:
            report.per_class[names[v]] += 1
        for name, count in report.per_class.items():
            if count == 0:
                _warn(report, f"class {name!r} has no training image: it can never be predicted", strict)
    if val is not None:
        if len(val) == 0:
            raise DataError("the validation split is empty (remove it, or put images in it)", report)
        val_classes = getattr(val, "classes", None)
        if val_classes is not None and list(val_classes) != names:
            raise DataError(f"the validation split has classes {list(val_classes)}, training has {names}", report)
        val_labels = _labels_of(val)
        bad = sorted({v for v in val_labels or () if not 0 <= v < len(names)})
        if bad:
            raise DataError(f"validation labels {bad} are not indices into the {len(names)} classes", report)
    return report
