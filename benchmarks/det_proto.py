"""Prototype of the detection recipe search (issue 14): one variant per call, through the public engine pieces.

Levers on top of ``DetectConfig.from_preset("small", **over)``:

* ``--scale-rule Q``: one image scale from the training objects' sizes
  (SPP-net Sec. 4.2's rule, "the scale at which the window is closest to
  224 x 224", applied to the data instead of each window): for every training
  object ``s_o = short_side * target / sqrt(area)`` (``target`` = the window
  target ``224 * size_factor``) is the short side at which it would match the
  target; the scale is the ``Q`` quantile of the ``s_o``, clamped to
  ``[--scale-min, --scale-max]`` (in resized pixels) and rounded to 16.
* ``--crops many``: pretrain the backbone (the engine's classification
  training, :func:`~sppnet.engine.det_backbone.pretrain_backbone`) on R-CNN
  style crops instead of the ground truth plus one background window per image:
  every ground truth, up to ``--per-object`` proposals with IoU >= 0.5 with it
  (labelled with its class: the jittered views of the object), and
  ``--bg-ratio`` background windows (IoU < 0.3 with every object) per
  foreground crop; the resulting classification run becomes ``backbone``.
* every run is tested with SVM and softmax scores, each with and without box
  regression (one detector, four numbers).

Usage::

    python benchmarks/det_proto.py --data /tmp/sets/digits-voc --out /tmp/p/d0
    python benchmarks/det_proto.py --data /tmp/sets/digits-voc --out /tmp/p/d1 --scale-rule 0.5 --crops many
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from sppnet.data.transforms import resize_side
from sppnet.engine.det_backbone import BACKGROUND, WindowCrops, pretrain_backbone
from sppnet.engine.detect import (
    DetectConfig,
    evaluate,
    load_detector,
    pretrain_config,
    split_proposals,
    train,
    training_set,
)

SHARED_PROPOSALS = Path("/tmp/detbench/propcache")


def scale_from_objects(records, target: float, q: float, lo: float, hi: float) -> int:
    """The ``q`` quantile of ``short_side * target / sqrt(area)`` over the objects, clamped, rounded to 16."""
    s = []
    for r in records:
        b = r["boxes"].double()
        if len(b) == 0:
            continue
        side = ((b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)).sqrt()
        s += (min(r["width"], r["height"]) * target / side).tolist()
    value = float(np.quantile(np.asarray(s), q)) if s else lo
    return int(round(min(max(value, lo), hi) / 16) * 16)


def many_crops(records, windows, classes, size: int, per_object: int, bg_ratio: float, seed: int) -> WindowCrops:
    """Ground truth + up to ``per_object`` proposals of IoU >= 0.5 per object + background (see the docstring)."""
    items = []
    k = len(classes)
    rng = np.random.default_rng([seed, 0xC0])
    for i, (r, w) in enumerate(zip(records, windows)):
        path = str(r["image_path"])
        fg_items = []
        for g, (box, label, difficult) in enumerate(
            zip(w.gt_boxes.tolist(), r["labels"].tolist(), r["difficult"].tolist())
        ):
            if difficult:
                continue
            fg_items.append((path, tuple(box), int(label)))
            near = ((w.gt_index == g) & (w.max_overlap >= 0.5) & ~w.is_gt).nonzero().squeeze(1)
            if len(near) > per_object:
                near = near[rng.choice(len(near), per_object, replace=False)]
            fg_items += [(path, tuple(w.boxes[j].tolist()), int(label)) for j in near.tolist()]
        items += fg_items
        bg = (w.max_overlap < 0.3).nonzero().squeeze(1)
        n_bg = min(len(bg), round(bg_ratio * max(len(fg_items), 1)))
        if n_bg:
            pick = rng.choice(len(bg), n_bg, replace=False)
            items += [(path, tuple(w.boxes[bg[j]].tolist()), k) for j in sorted(pick.tolist())]
    return WindowCrops(items, resize_side(size), [*classes, BACKGROUND])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="VOC folder or 'shapes'")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--over", default="{}", help="DetectConfig overrides (JSON)")
    ap.add_argument(
        "--scale-rule",
        type=float,
        default=None,
        help="quantile of the per-object scales",
    )
    ap.add_argument("--scale-min", type=float, default=224)
    ap.add_argument("--scale-max", type=float, default=800)
    ap.add_argument("--crops", choices=("default", "many"), default="default")
    ap.add_argument("--per-object", type=int, default=8)
    ap.add_argument("--bg-ratio", type=float, default=1.0)
    ap.add_argument(
        "--pt-epochs",
        type=int,
        default=None,
        help="epochs of the many-crops pretraining",
    )
    ap.add_argument("--pt-lr", type=float, default=None)
    ap.add_argument(
        "--share-features",
        type=Path,
        default=None,
        help="another run's cache/features (same keys)",
    )
    args = ap.parse_args()

    over = json.loads(args.over)
    data = None if args.data == "shapes" else args.data
    cfg = dataclasses.replace(DetectConfig.from_preset("small", data=data, **over), calibrate_split=None)
    out = args.out
    (out / "cache").mkdir(parents=True, exist_ok=True)
    SHARED_PROPOSALS.mkdir(parents=True, exist_ok=True)
    if not (out / "cache" / "proposals").exists():
        os.symlink(SHARED_PROPOSALS, out / "cache" / "proposals")
    if args.share_features is not None and not (out / "cache" / "features").exists():
        os.symlink(args.share_features.resolve(), out / "cache" / "features")
    t0 = time.perf_counter()
    records, windows, classes = training_set(cfg, out, verbose=False)
    t_props = time.perf_counter() - t0
    info: dict = {"data": args.data, "over": over, "proposals_s": t_props}
    t0 = time.perf_counter()
    if args.scale_rule is not None:
        s = scale_from_objects(records, cfg.window_target, args.scale_rule, args.scale_min, args.scale_max)
        cfg = dataclasses.replace(cfg, scales=(round(s / cfg.size_factor),)).resolved()
        info["scale"] = s
    if args.crops == "many":
        crops = many_crops(
            records,
            windows,
            classes,
            cfg.crop_size,
            args.per_object,
            args.bg_ratio,
            cfg.seed,
        )
        ccfg = pretrain_config(dataclasses.replace(cfg, pretrain_epochs=args.pt_epochs or cfg.pretrain_epochs,
                                                   pretrain_lr=args.pt_lr or cfg.pretrain_lr))  # fmt: skip
        n_bg = sum(1 for lab in crops.labels if lab == len(classes))
        print(
            f"pretraining on {len(crops)} crops ({n_bg} background), {ccfg.epochs} epochs",
            file=sys.stderr,
        )
        pretrain_backbone(crops, ccfg, out / "pretrain", verbose=False)
        cfg = dataclasses.replace(cfg, backbone=str(out / "pretrain")).resolved()
        info["pretrain_crops"] = len(crops)
    info["pretrain_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    train(cfg, out, verbose=False)
    info["train_s"] = time.perf_counter() - t0 + info["pretrain_s"]
    info["stages"] = json.loads((out / "stages" / "times.json").read_text())
    detector, classes, cfg = load_detector(out)
    test, props = split_proposals(cfg, out, "test", classes, verbose=False)
    for scorer in ("svm", "softmax"):
        for bb in (True, False):
            r = evaluate(detector, test, classes, props, scorer, bb, verbose=False)
            info[f"{scorer}{'+bb' if bb else ''}"] = round(r["mAP"], 4)
            info.setdefault("s_per_image", round(r["seconds_per_image"], 4))
    info["scales"] = list(cfg.image_scales)
    info["load"] = os.getloadavg()[0]
    print(json.dumps(info))


if __name__ == "__main__":
    main()
