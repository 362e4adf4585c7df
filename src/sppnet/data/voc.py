"""Pascal VOC detection data: the folder layout, its XML annotations, and a writer.

Layout (as in VOCdevkit/VOC2007)::

    root/
      Annotations/<id>.xml
      JPEGImages/<id>.jpg
      ImageSets/Main/<split>.txt      # one image id per line (train, val, trainval, test)

Box convention. VOC XML stores ``xmin, ymin, xmax, ymax`` as 1-based *inclusive*
pixel indices: a box covering the top-left pixel alone is ``1 1 1 1``. Records
here hold 0-based inclusive indices, ``x1 = xmin - 1`` ... ``y2 = ymax - 1``, so the
same box is ``[0, 0, 0, 0]`` and every valid box satisfies
``0 <= x1 <= x2 <= width - 1`` and ``0 <= y1 <= y2 <= height - 1``. Widths and
areas follow the VOC devkit: ``w = x2 - x1 + 1``, ``h = y2 - y1 + 1`` (the "+1"
in SPP-net's and R-CNN's evaluation code). :func:`write_voc_annotation` takes
0-based boxes and adds the 1 back.

Record format (``VOCDetection.records[i]``, also the target of ``dataset[i]``):

* ``id`` (str): the image id from the split file;
* ``image_path`` (str), ``width`` (int), ``height`` (int) as the XML states them;
* ``boxes`` (Tensor[G, 4] float32): ``(x1, y1, x2, y2)``, 0-based inclusive pixels;
* ``labels`` (Tensor[G] int64): indices into ``class_names``;
* ``difficult`` (Tensor[G] bool), ``truncated`` (Tensor[G] bool).

Untrusted input. XML is parsed with ``defusedxml`` and anything with a DTD,
entity declarations or external references is refused outright (``ValueError``
naming the file, even when ``strict=False``): that is how "billion laughs" and
external-entity attacks start, and no real annotation needs it. Image ids and
``<filename>`` values that would resolve outside their folder are refused the
same way (see :mod:`sppnet.data.safety`). Ordinary damage - malformed XML, a box
outside its image or inverted, a missing image, an unknown class name - is
skipped with a :class:`~sppnet.data.images.DataWarning` and counted, or raises
``ValueError`` with ``strict=True``.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import defusedxml
import defusedxml.ElementTree as SafeET
import torch
from torch.utils.data import Dataset

from sppnet.data.images import SkipCounter, load_image, pil_to_tensor
from sppnet.data.safety import resolve_inside, validate_class_names

__all__ = ["VOCDetection", "parse_voc_xml", "write_voc_annotation"]

Target = dict[str, Any]


class _Skip(Exception):
    """Internal: one annotation or object is unusable (reason, detail)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a leading byte-order mark is dropped, not read as text).

    Raises:
        ValueError: the file is not UTF-8, naming it, the line and the byte.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # Windows editors start files with a BOM
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line}); "
            f"save it as UTF-8"
        ) from None
    return text.splitlines()


def _text(element: ET.Element, tag: str, required: bool = True) -> str | None:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise _Skip("malformed XML", f"<{element.tag}> has no <{tag}> value")
        return None
    return child.text.strip()


def _number(element: ET.Element, tag: str) -> float:
    text = _text(element, tag)
    try:
        value = float(text)
    except ValueError:
        raise _Skip("malformed XML", f"<{tag}> is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise _Skip("malformed XML", f"<{tag}> is not finite: {text!r}")
    return value


def _flag(element: ET.Element, tag: str) -> bool:
    text = _text(element, tag, required=False)
    if text is None:
        return False
    if text not in ("0", "1"):
        raise _Skip("malformed XML", f"<{tag}> must be 0 or 1, got {text!r}")
    return text == "1"


def _read_xml(xml_path: Path) -> ET.Element:
    """Parses one XML file safely; unsafe constructs raise ValueError, damage raises _Skip."""
    try:
        tree = SafeET.parse(xml_path, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DefusedXmlException as exc:
        raise ValueError(
            f"{xml_path}: refusing XML with a DTD, entity declaration or external reference "
            f"({type(exc).__name__}: {exc}); VOC annotations never need them"
        ) from exc
    except SafeET.ParseError as exc:
        raise _Skip("malformed XML", f"malformed XML: {exc}") from exc
    except FileNotFoundError:
        raise _Skip("missing annotation", "annotation file not found") from None
    except OSError as exc:
        raise _Skip("missing annotation", f"cannot read annotation: {exc}") from exc
    return tree.getroot()


def parse_voc_xml(xml_path: str | os.PathLike) -> dict[str, Any]:
    """Reads one VOC annotation file without judging its objects.

    Args:
        xml_path: the ``.xml`` file.

    Returns:
        ``{"filename": str | None, "width": int, "height": int, "objects": [...]}``
        where each object is ``{"name": str, "box": (x1, y1, x2, y2) 0-based
        inclusive floats, "difficult": bool, "truncated": bool}`` or, for an
        object whose own fields are unreadable, ``{"error": str}``.

    Raises:
        ValueError: the file is missing, malformed, lacks a valid ``<size>``, or
            contains a DTD / entity declaration / external reference.
    """
    xml_path = Path(xml_path)
    try:
        return _parse(xml_path)
    except _Skip as skip:
        raise ValueError(f"{xml_path}: {skip.detail}") from None


def _parse(xml_path: Path) -> dict[str, Any]:
    """Like parse_voc_xml, but damage raises _Skip (details without the path)."""
    root = _read_xml(xml_path)
    if root.tag != "annotation":
        raise _Skip("malformed XML", f"root element is <{root.tag}>, expected <annotation>")
    size = root.find("size")
    if size is None:
        raise _Skip("malformed XML", "no <size> element")
    width, height = _number(size, "width"), _number(size, "height")
    if width < 1 or height < 1 or not width.is_integer() or not height.is_integer():
        raise _Skip("malformed XML", f"image size must be positive integers, got width={width:g}, height={height:g}")
    objects = []
    for index, obj in enumerate(root.findall("object")):
        try:
            name = _text(obj, "name")
            bndbox = obj.find("bndbox")
            if bndbox is None:
                raise _Skip("malformed XML", "no <bndbox>")
            # VOC XML is 1-based inclusive; records are 0-based inclusive.
            box = tuple(_number(bndbox, tag) - 1.0 for tag in ("xmin", "ymin", "xmax", "ymax"))
            objects.append(
                {
                    "name": name,
                    "box": box,
                    "difficult": _flag(obj, "difficult"),
                    "truncated": _flag(obj, "truncated"),
                }
            )
        except _Skip as skip:
            objects.append({"error": f"object {index}: {skip.detail}"})
    return {
        "filename": _text(root, "filename", required=False),
        "width": int(width),
        "height": int(height),
        "objects": objects,
    }


def _format_coordinate(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}".rstrip("0")


def write_voc_annotation(
    path: str | os.PathLike,
    filename: str,
    size: tuple[int, int],
    objects: Iterable[Mapping[str, Any]],
    database: str = "sppnet",
) -> None:
    """Writes one Pascal VOC annotation file.

    Args:
        path: the ``.xml`` file to write (its folder must exist).
        filename: the image file name stored in ``<filename>`` (e.g. ``000001.jpg``).
        size: ``(width, height)`` of the image in pixels.
        objects: one mapping per object with ``name`` (str), ``box``
            ``(x1, y1, x2, y2)`` in 0-based inclusive pixels (written as 1-based,
            i.e. each coordinate + 1), and optional ``difficult``, ``truncated``
            (bool) and ``pose`` (str).
        database: the ``<source><database>`` text.

    Raises:
        ValueError: a box is inverted or outside the image, or the size is not positive.
    """
    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise ValueError(f"size must be positive (width, height), got {tuple(size)}")
    annotation = ET.Element("annotation")
    ET.SubElement(annotation, "folder").text = "JPEGImages"
    ET.SubElement(annotation, "filename").text = filename
    ET.SubElement(ET.SubElement(annotation, "source"), "database").text = database
    size_el = ET.SubElement(annotation, "size")
    ET.SubElement(size_el, "width").text = str(width)
    ET.SubElement(size_el, "height").text = str(height)
    ET.SubElement(size_el, "depth").text = "3"
    ET.SubElement(annotation, "segmented").text = "0"
    for index, obj in enumerate(objects):
        x1, y1, x2, y2 = (float(v) for v in obj["box"])
        if not (0 <= x1 <= x2 <= width - 1 and 0 <= y1 <= y2 <= height - 1):
            raise ValueError(
                f"object {index} ({obj['name']!r}) of {filename}: box must satisfy "
                f"0 <= x1 <= x2 <= {width - 1} and 0 <= y1 <= y2 <= {height - 1}, "
                f"got {[x1, y1, x2, y2]}"
            )
        element = ET.SubElement(annotation, "object")
        ET.SubElement(element, "name").text = str(obj["name"])
        ET.SubElement(element, "pose").text = str(obj.get("pose", "Unspecified"))
        ET.SubElement(element, "truncated").text = str(int(bool(obj.get("truncated", False))))
        ET.SubElement(element, "difficult").text = str(int(bool(obj.get("difficult", False))))
        bndbox = ET.SubElement(element, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
            ET.SubElement(bndbox, tag).text = _format_coordinate(value + 1.0)  # 1-based
    tree = ET.ElementTree(annotation)
    ET.indent(tree, space="  ")
    tree.write(path, encoding="utf-8")


def _empty_record_tensors() -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.zeros((0, 4), dtype=torch.float32),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "difficult": torch.zeros((0,), dtype=torch.bool),
        "truncated": torch.zeros((0,), dtype=torch.bool),
    }


def make_record(
    image_id: Any,
    image_path: str | os.PathLike,
    width: int,
    height: int,
    objects: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """Builds one record (format in the module docstring) from checked objects.

    Args:
        objects: mappings with ``box`` (0-based inclusive), ``label`` (int),
            ``difficult`` and ``truncated`` (bool).
    """
    record: dict[str, Any] = {
        "id": image_id,
        "image_path": str(image_path),
        "width": int(width),
        "height": int(height),
    }
    if not objects:
        record.update(_empty_record_tensors())
        return record
    record["boxes"] = torch.tensor([list(o["box"]) for o in objects], dtype=torch.float32)  # [G, 4]
    record["labels"] = torch.tensor([o["label"] for o in objects], dtype=torch.int64)
    record["difficult"] = torch.tensor([bool(o["difficult"]) for o in objects], dtype=torch.bool)
    record["truncated"] = torch.tensor([bool(o["truncated"]) for o in objects], dtype=torch.bool)
    return record


def box_problem(box: Sequence[float], width: int, height: int) -> tuple[str, str] | None:
    """Returns ``(reason, detail)`` if a 0-based inclusive box is unusable, else None."""
    x1, y1, x2, y2 = box
    if x2 < x1 or y2 < y1:
        return "invalid box", f"box (x1, y1, x2, y2) = {list(box)} has x2 < x1 or y2 < y1"
    if x1 < 0 or y1 < 0 or x2 > width - 1 or y2 > height - 1:
        return "box outside image", (
            f"box (x1, y1, x2, y2) = {list(box)} (0-based) lies outside the {width}x{height} image"
        )
    return None


def load_sample(
    record: Mapping[str, Any],
    transforms: Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]] | None,
) -> tuple[torch.Tensor, Target]:
    """Loads the image of a record and builds its target (a copy of the record)."""
    img = load_image(record["image_path"])
    if img.size != (record["width"], record["height"]):
        raise ValueError(
            f"{record['image_path']}: image is {img.size[0]}x{img.size[1]} pixels but its "
            f"annotation says {record['width']}x{record['height']}"
        )
    image = pil_to_tensor(img)  # [3, H, W]
    target = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
    if transforms is not None:
        image, target = transforms(image, target)
    return image, target


def describe_records(
    name: str,
    records: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    skipped_images: SkipCounter,
    skipped_objects: SkipCounter,
    seen_images: int,
    seen_objects: int,
) -> str:
    """Multi-line summary shared by the detection data sets."""
    num_objects = sum(len(r["labels"]) for r in records)
    num_difficult = sum(int(r["difficult"].sum()) for r in records)
    per_class = Counter()
    for r in records:
        per_class.update(r["labels"].tolist())
    lines = [
        f"{name}: {len(records)} images, {num_objects} objects ({num_difficult} difficult), {len(class_names)} classes",
        "  per class: " + ", ".join(f"{c} {per_class[i]}" for i, c in enumerate(class_names)),
        "  " + skipped_images.summary(seen_images),
        "  " + skipped_objects.summary(seen_objects),
    ]
    return "\n".join(lines)


class VOCDetection(Dataset):
    """Pascal VOC-style detection data set (VOC 2007/2012 or :mod:`sppnet.data.synthetic`).

    All annotations of the split are parsed and checked at construction; images
    are read in ``__getitem__``.

    Args:
        root: the folder holding ``Annotations``, ``JPEGImages`` and ``ImageSets``.
        split: name of ``ImageSets/Main/<split>.txt`` (``train``, ``val``,
            ``trainval``, ``test``).
        classes: class names in label order. ``None``: every name found in the
            split's annotations, sorted. When given, objects of other classes are
            skipped (warned and counted; ``ValueError`` if ``strict``).
        strict: raise ``ValueError`` on the first damaged annotation instead of
            skipping it.
        use_difficult: keep objects marked ``difficult`` (their flag is in the
            record; VOC evaluation ignores them). ``False`` drops them.
        transforms: optional ``f(image, target) -> (image, target)``.

    Attributes:
        records (list[dict]): annotations without images (module docstring).
        class_names (list[str]): label ``i`` is ``class_names[i]``.
        skipped_images, skipped_objects (SkipCounter): what was left out and why.

    ``dataset[i]`` returns ``(image, target)``: ``image`` Tensor[3, H, W] float in
    ``[0, 1]``, ``target`` a copy of ``records[i]``. An unreadable image raises
    :class:`~sppnet.data.images.ImageError` there.

    Raises:
        ValueError: missing folders or split file, unsafe ids / XML, no usable
            image, or (``strict``) any damaged annotation.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "trainval",
        classes: Sequence[str] | None = None,
        strict: bool = False,
        use_difficult: bool = True,
        transforms: Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.strict = strict
        self.use_difficult = use_difficult
        self.transforms = transforms
        self.skipped_images = SkipCounter("images")
        self.skipped_objects = SkipCounter("objects")
        self._seen_objects = 0

        annotations_dir = self.root / "Annotations"
        images_dir = self.root / "JPEGImages"
        sets_dir = self.root / "ImageSets" / "Main"
        for folder in (self.root, annotations_dir, images_dir, sets_dir):
            if not folder.is_dir():
                raise ValueError(f"VOC root {self.root}: folder {folder} does not exist")
        split_file = resolve_inside(sets_dir, f"{split}.txt", what="split file")
        if not split_file.is_file():
            available = sorted(p.stem for p in sets_dir.glob("*.txt"))
            raise ValueError(f"split file {split_file} does not exist; available splits: {available}")
        ids, self._seen_images = self._read_ids(split_file)
        if not ids:
            raise ValueError(f"split file {split_file} lists no image ids")

        parsed = []  # (id, image_path, width, height, objects)
        for image_id in ids:
            item = self._parse_image(image_id, annotations_dir, images_dir)
            if item is not None:
                parsed.append(item)

        if classes is None:
            names = {o["name"] for *_, objects in parsed for o in objects}
            self.class_names = sorted(names)
        else:
            self.class_names = validate_class_names(classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.class_names)}

        self.records: list[dict[str, Any]] = []
        for image_id, image_path, width, height, objects in parsed:
            kept = []
            for obj in objects:
                label = self.class_to_idx.get(obj["name"])
                if label is None:
                    self._skip_object(
                        obj["xml"], "unknown class", f"class {obj['name']!r} is not in classes {self.class_names}"
                    )
                    continue
                if obj["difficult"] and not use_difficult:
                    continue
                kept.append({**obj, "label": label})
            self.records.append(make_record(image_id, image_path, width, height, kept))
        if not self.records:
            raise ValueError(
                f"{self.root} split {split!r}: no usable images; {self.skipped_images.summary(self._seen_images)}"
            )

    def _read_ids(self, split_file: Path) -> tuple[list[str], int]:
        """Unique ids of the split file (first column), and the number of listed lines."""
        ids, seen, listed = [], set(), 0
        for line_no, line in enumerate(read_text_lines(split_file), 1):
            fields = line.split()
            if not fields:
                continue
            listed += 1
            image_id = fields[0]
            if image_id in seen:
                self._skip_image(split_file, "duplicate id", f"line {line_no}: image id {image_id!r} listed twice")
                continue
            seen.add(image_id)
            ids.append(image_id)
        return ids, listed

    def _skip_image(self, path: Path, reason: str, detail: str) -> None:
        if self.strict:
            raise ValueError(f"{path}: {detail}")
        self.skipped_images.skip(path, reason, detail)

    def _skip_object(self, path: Path, reason: str, detail: str) -> None:
        if self.strict:
            raise ValueError(f"{path}: {detail}")
        self.skipped_objects.skip(path, reason, detail)

    def _parse_image(
        self, image_id: str, annotations_dir: Path, images_dir: Path
    ) -> tuple[str, Path, int, int, list[dict]] | None:
        """Reads and checks one image's annotation; None if the image is skipped."""
        # Unsafe ids are refused (ValueError), whatever `strict` says.
        resolve_inside(annotations_dir, image_id, what="image id")
        xml_path = resolve_inside(annotations_dir, f"{image_id}.xml", what=f"annotation file of image id {image_id!r}")
        try:
            info = _parse(xml_path)
        except _Skip as skip:
            self._skip_image(xml_path, skip.reason, skip.detail)
            return None

        candidates = [resolve_inside(images_dir, f"{image_id}.jpg", what=f"image file of image id {image_id!r}")]
        if info["filename"] and info["filename"] != f"{image_id}.jpg":
            candidates.append(resolve_inside(images_dir, info["filename"], what=f"<filename> in {xml_path}"))
        image_path = next((p for p in candidates if p.is_file()), None)
        if image_path is None:
            self._skip_image(
                candidates[0],
                "missing image",
                f"image file not found (annotated by {xml_path}; looked for {', '.join(str(p) for p in candidates)})",
            )
            return None

        objects = []
        width, height = info["width"], info["height"]
        self._seen_objects += len(info["objects"])
        for index, obj in enumerate(info["objects"]):
            if "error" in obj:
                self._skip_object(xml_path, "malformed object", obj["error"])
                continue
            problem = box_problem(obj["box"], width, height)
            if problem is not None:
                reason, detail = problem
                self._skip_object(xml_path, reason, f"object {index} ({obj['name']!r}): {detail}")
                continue
            objects.append({**obj, "xml": xml_path})
        return image_id, image_path, width, height, objects

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        record = self.records[index]
        image, target = load_sample(record, self.transforms)
        return image, target

    @property
    def num_classes(self) -> int:
        """Number of object classes (background not included)."""
        return len(self.class_names)

    def summary(self) -> str:
        """Images, objects, difficult objects, per-class counts and what was skipped."""
        return describe_records(
            f"VOCDetection({self.root}, split={self.split!r})",
            self.records,
            self.class_names,
            self.skipped_images,
            self.skipped_objects,
            self._seen_images,
            self._seen_objects,
        )

    def __repr__(self) -> str:
        return (
            f"VOCDetection(root={str(self.root)!r}, split={self.split!r}, "
            f"images={len(self)}, classes={self.num_classes})"
        )
