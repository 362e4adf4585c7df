"""The tiny detection setup several CLI test files share: a tiny synthetic VOC set, the
flags of a tiny ``detect train`` and the module-scoped fixtures that build both.

Each file keeps its own sizes and seeds (they are what its assertions were written
against); the factories below take them as arguments instead of the files copying the code::

    tiny_root = tiny_voc_fixture(seed=5, num_train=8, max_short_side=144, max_objects=3)
    cli_run = tiny_detector_fixture("cli_run", tiny_flags(ft_iterations=16, max_proposals=80))
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sppnet.cli.main import main
from sppnet.data import make_detection_dataset


def tiny_flags(
    *, ft_iterations: int = 16, max_proposals: int = 80, fc_dim: int = 32, width: str | None = "0.125"
) -> list[str]:
    """``detect train`` flags for a detector that trains in seconds on the CPU (width None: the flag is left out)."""
    flags = ["--width", width] if width is not None else []
    flags += ["--fc-dim", str(fc_dim), "--size", "0.25", "--pretrain-epochs", "1"]
    flags += ["--ft-iterations", str(ft_iterations)]
    return [*flags, "--workers", "0", "--max-proposals", str(max_proposals), "--device", "cpu", "--quiet"]


def make_tiny_voc(
    parent: Path,
    *,
    seed: int,
    num_train: int = 6,
    num_test: int = 3,
    max_short_side: int = 128,
    max_objects: int = 2,
) -> Path:
    """A VOC-layout set of ``num_train`` train and ``num_test`` test images (no val split) under ``parent / 'voc'``."""
    return make_detection_dataset(
        parent / "voc",
        seed=seed,
        num_train=num_train,
        num_val=0,
        num_test=num_test,
        min_short_side=96,
        max_short_side=max_short_side,
        max_objects=max_objects,
    )


def train_tiny_detector(root: Path, out: Path, flags: list[str]) -> Path:
    """``sppnet detect train`` in this process; returns the run folder."""
    assert main(["detect", "train", "--data", str(root), "--out", str(out), *flags]) == 0
    return out


def tiny_voc_fixture(name: str = "tiny_root", **settings):
    """A module-scoped fixture called ``name`` that makes the tiny VOC set of ``make_tiny_voc(**settings)``."""

    @pytest.fixture(scope="module", name=name)
    def _voc(tmp_path_factory):
        return make_tiny_voc(tmp_path_factory.mktemp("data"), **settings)

    return _voc


def tiny_detector_fixture(name: str, flags: list[str], data: str = "tiny_root"):
    """A module-scoped fixture called ``name``: a detector trained with ``flags`` on the fixture ``data``."""

    @pytest.fixture(scope="module", name=name)
    def _run(request, tmp_path_factory):
        root = request.getfixturevalue(data)
        return train_tiny_detector(root, tmp_path_factory.mktemp("runs") / "det", flags)

    return _run
