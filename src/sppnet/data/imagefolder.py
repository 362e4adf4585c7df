"""Classification data in the ImageFolder layout: ``root/<split>/<class>/<image>``.

The layout written by :func:`sppnet.data.synthetic.make_classification_dataset`
and used by most classification sets::

    root/train/circle/0001.png
    root/train/square/0002.jpg
    root/val/...

Class names are the sub-folders of ``root/<split>``, sorted (label ``i`` is
``classes[i]``), unless given explicitly. Images are files whose name ends in one
of :data:`~sppnet.data.images.IMAGE_EXTENSIONS` (any case), found recursively;
hidden files (starting with ``.``) are ignored.

Bad files. Construction only lists files (fast for any size). A file that turns
out unreadable raises :class:`~sppnet.data.images.ImageError` (naming it) when it
is loaded. To find them up front call :meth:`ImageFolderDataset.scan`: it decodes
every file, drops the bad ones with a warning each, and returns a
:class:`~sppnet.data.images.SkipCounter` ("skipped 2 of 3600 images: 1 corrupt,
1 not an image").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from sppnet.data.images import IMAGE_EXTENSIONS, ImageError, SkipCounter, load_image
from sppnet.data.limits import ImageLimits
from sppnet.data.safety import validate_class_names

__all__ = ["ImageFolderDataset", "find_images"]


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden entries skipped).

    Returns:
        Paths whose suffix, lower-cased, is in :data:`IMAGE_EXTENSIONS`.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return found


class ImageFolderDataset(Dataset):
    """Images and class labels from ``root/<split>/<class>/*``.

    Args:
        root: the data set folder (holding ``train``, ``val``, ``test``, ...).
        split: sub-folder to read.
        transform: applied to the RGB ``PIL.Image``; ``None`` returns the image.
        classes: class names in label order; each must be a folder of the split.
            ``None``: all sub-folders, sorted.

    Attributes:
        classes (list[str]), class_to_idx (dict[str, int]).
        samples (list[tuple[str, int]]): ``(path, label)`` per image.
        targets (list[int]): the labels of ``samples``.

    ``dataset[i]`` returns ``(transform(image) or image, label)``; the image comes from
    :func:`~sppnet.data.images.load_image` (upright 8-bit RGB). The object holds
    only paths and the transform, so it pickles for DataLoader workers.

    Raises:
        ValueError: ``root`` or the split folder is missing, it has no class
            folders, a requested class folder is missing, or a class folder
            holds no image files (each naming the path).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        if not self.root.is_dir():
            raise ValueError(f"data set root {self.root} does not exist or is not a folder")
        split_dir = self.root / split
        if not split_dir.is_dir():
            available = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise ValueError(f"split folder {split_dir} does not exist; found {available}")
        folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            if not folders:
                raise ValueError(f"split folder {split_dir} has no class folders")
            self.classes = folders
        else:
            self.classes = validate_class_names(classes)
            missing = [c for c in self.classes if c not in folders]
            if missing:
                raise ValueError(f"class folders {[str(split_dir / c) for c in missing]} do not exist")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            files = find_images(split_dir / name)
            if not files:
                raise ValueError(
                    f"class folder {split_dir / name} contains no image files "
                    f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
                )
            self.samples.extend((str(f), label) for f in files)

    @property
    def targets(self) -> list[int]:
        """The label of every sample, in order."""
        return [label for _, label in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = load_image(path)  # raises ImageError naming the file
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def scan(self, max_pixels: int | None = None, limits: ImageLimits | None = None) -> SkipCounter:
        """Decodes every image once and drops the unreadable ones and those outside the size limits.

        Each dropped file is warned about (``DataWarning``, naming it and, for a
        size limit, the flag that raises it) as it is found.

        Args:
            max_pixels: decompression-bomb limit passed to ``load_image``
                (overrides ``limits.max_pixels``).
            limits: size limits (:mod:`sppnet.data.limits`); ``None``: the
                process-wide ones.

        Returns:
            The :class:`SkipCounter`; ``counter.summary(total)`` with ``total``
            the number of files before the scan gives the one-line report.

        Raises:
            ValueError: a class is left without any readable image.
        """
        counter = SkipCounter("images")
        kept = []
        for path, label in self.samples:
            try:
                load_image(path, max_pixels=max_pixels, limits=limits)
            except ImageError as error:
                counter.skip_error(error)
                continue
            kept.append((path, label))
        empty = sorted(set(self.classes) - {self.classes[label] for _, label in kept})
        if empty:
            raise ValueError(
                f"{self.root / self.split}: no readable image left in class "
                f"folders {empty}; {counter.summary(len(self.samples))}"
            )
        self.samples = kept
        return counter

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={str(self.root)!r}, split={self.split!r}, "
            f"images={len(self)}, classes={len(self.classes)})"
        )
