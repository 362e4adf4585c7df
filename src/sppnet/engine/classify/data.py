"""Classification data: ImageFolder splits, the seeded training augmentation, the
test-view dataset and the DataLoader that serves both.

Determinism (CPU). Every training sample's augmentation is drawn from a
generator seeded by ``(seed, epoch, index)`` (:class:`AugmentedDataset`) and each
epoch's order from ``(seed, epoch)`` (``ShardedBatchSampler``), so the batches do
not depend on the number of DataLoader workers.
"""

from __future__ import annotations

import random
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from sppnet.data.images import to_rgb
from sppnet.data.transforms import TrainTransform, resize_short_side, resize_side
from sppnet.engine.distributed import derive_seed
from sppnet.engine.views import prepare_views

__all__ = ["builtin_data_root", "open_image_folder", "AugmentedDataset", "ViewDataset", "make_loader", "list_collate"]


def builtin_data_root() -> Path:
    """The built-in shapes set (generated on first use, then cached)."""
    from sppnet.data.synthetic import make_classification_dataset

    return make_classification_dataset()


def open_image_folder(root: Path, split: str, classes: Sequence[str] | None, verbose: bool):
    """An ImageFolder split with unreadable files dropped (each warned, summary printed)."""
    from sppnet.data.imagefolder import ImageFolderDataset

    ds = ImageFolderDataset(root, split, classes=classes)
    total = len(ds)
    skipped = ds.scan()
    if skipped and verbose:
        print(f"{root / split}: {skipped.summary(total)}", file=sys.stderr)
    return ds


class AugmentedDataset(Dataset):
    """``base[i] = (PIL image, label)`` -> ``(pixels, colour, label)``, seeded per sample.

    ``pixels, colour`` are :meth:`TrainTransform.geometric`'s (the crop as ``uint8``
    and its colour draws); the training loop applies them to the whole batch with
    :meth:`TrainTransform.photometric`, one vectorised call instead of a dozen small
    tensor ops per image (on 2 CPU cores those were half of an epoch).

    Args:
        base: yields ``(PIL.Image, int label)``.
        transform: the epoch's crop / flip / colour pipeline.
        seed, epoch: with the index, seed the sample's generator.
        cache: a dict shared across epochs (main process only) that keeps each
            image decoded and resized to the transform's short side, the
            deterministic part of the pipeline, so later epochs only crop, flip
            and colour it. The result is identical with and without the cache.
    """

    def __init__(self, base: Dataset, transform: TrainTransform, seed: int, epoch: int, cache: dict | None = None):
        self.base, self.transform, self.seed, self.epoch, self.cache = base, transform, seed, epoch, cache

    def __len__(self) -> int:
        return len(self.base)

    def _item(self, index: int) -> tuple[Image.Image, int]:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        img, label = self.base[index]
        if not isinstance(img, Image.Image):
            raise ValueError(
                f"training data must yield (PIL.Image, int) pairs, item {index} holds {type(img).__name__}"
            )
        if self.cache is not None:
            img = resize_short_side(to_rgb(img) if img.mode != "RGB" else img, resize_side(self.transform.size))
            self.cache[index] = (img, label)
        return img, label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        img, label = self._item(index)
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, self.epoch, index))
        return *self.transform.geometric(img, g), int(label)


class ViewDataset(Dataset):
    """``base[i]`` -> ``(prepare_views(image), label)`` for evaluation.

    Args:
        base: yields ``(PIL.Image, int label)``.
        views, size, mean, std: passed to :func:`~sppnet.engine.views.prepare_views`.
        indices: the items of ``base`` to serve (default: all), e.g. one rank's share.
        cache: a dict that keeps the prepared views across calls.
    """

    def __init__(
        self,
        base: Dataset,
        views: str,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        indices: Sequence[int] | None = None,
        cache: dict | None = None,
    ):
        self.base, self.views, self.size, self.mean, self.std = base, views, size, mean, std
        self.indices = list(range(len(base))) if indices is None else list(indices)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        img, label = self.base[index]
        if not isinstance(img, Image.Image):
            raise ValueError(f"evaluation data must yield (PIL.Image, int) pairs, got {type(img).__name__}")
        item = prepare_views(img, self.views, self.size, self.mean, self.std), int(label)
        if self.cache is not None:
            self.cache[index] = item
        return item


def _worker_init(worker_id: int) -> None:
    # Ctrl-C is for the main process (it checkpoints); workers must not die of it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32  # set by the DataLoader from its seeded generator
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    seed: int,
    sampler: Sampler | None = None,
    collate=None,
    cuda: bool = False,
    batch_sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader on its own seeded generator (never torch's global one), workers ignoring Ctrl-C.

    ``batch_sampler`` (yielding lists of indices) replaces ``batch_size`` and ``sampler``.
    """
    g = torch.Generator()
    g.manual_seed(seed)  # also keeps the DataLoader off torch's global generator
    batching: dict = (
        {"batch_sampler": batch_sampler}
        if batch_sampler is not None
        else {"batch_size": batch_size, "sampler": sampler, "shuffle": False}
    )
    return DataLoader(
        dataset,
        **batching,
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=_worker_init,
        generator=g,
        pin_memory=cuda,
        persistent_workers=False,
    )


def list_collate(batch: list) -> list:
    """Keeps a batch of prepared views as a list (their sizes differ)."""
    return batch
