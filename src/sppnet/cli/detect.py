"""``sppnet detect train | val | calibrate | predict`` (ultralytics-style)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sppnet.cli._common import add_common, add_preset
from sppnet.cli._options import add_config_options, config_overrides
from sppnet.engine.detect.config import PRESETS, DetectConfig

_EPILOG = """examples:
  sppnet detect train --out runs/det                         # built-in shapes data, small preset on CPU
  sppnet detect train --out runs/det --scales 480 576 688 864 1200   # five scales (times --size)
  sppnet detect train --out runs/det-rcnn --method rcnn      # the R-CNN baseline, same everything else
  sppnet detect train --data VOCdevkit/VOC2007 --split trainval --out runs/voc --preset paper
  sppnet detect train --out runs/det --resume                # continue an interrupted run
  sppnet detect val --run runs/det --split test --json
  sppnet detect val --run runs/det --svd-rank 128            # fc6/fc7 by truncated SVD (faster fc)
  sppnet detect calibrate --run runs/det --split val          # per-class score thresholds for predict
  sppnet detect predict --run runs/det image1.jpg image2.png --out runs/det/pred
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "detect",
        help="SPP-net object detection: train, val, calibrate, predict",
        description="The SPP-net detector (conv5 once per image and scale, a pyramid per window) "
        "and its R-CNN baseline.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train a detector",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the SPP-net detector in stages (proposals, backbone, conv5 cache, fine-tuning, "
        "SVMs, box regression). Flags left out take the preset's value.",
    )
    t.add_argument("--out", required=True, help="run directory (stages, caches, metrics, config)")
    add_preset(t)
    add_config_options(t, DetectConfig, presets={name: DetectConfig.from_preset(name) for name in PRESETS})
    t.add_argument("--resume", action="store_true", help="continue the run in --out (finished stages are skipped)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    add_common(t)
    t.set_defaults(func=_train, device=None)

    v = sub.add_parser(
        "val",
        help="evaluate a trained detector (VOC07 mAP)",
        description="Scores every window, per-class NMS at 0.3, <= 100 per image; VOC07 mAP.",
    )
    _add_test_data(v, "test", "VOC split (default test)", "COCO annotation JSON")
    v.add_argument(
        "--svd-rank",
        type=int,
        nargs="+",
        metavar="R",
        help="truncated SVD of fc6 and fc7 at rank R (or R6 R7): fewer multiply-adds "
        "(Fast R-CNN Sec. 3.1); compare mAP with and without",
    )
    v.add_argument(
        "--json", action="store_true", help='print {"mAP", "ap": {class: AP}, "images", "seconds_per_image"} as JSON'
    )
    add_common(v)
    v.set_defaults(func=_val)

    c = sub.add_parser(
        "calibrate",
        help="per-class score thresholds (best F1 on a held-out split) for predict",
        description="Scores a held-out split, finds each class's best-F1 operating point and writes "
        "RUN/thresholds.json; 'detect predict' then keeps the detections above them. 'detect train' does "
        "this on its own when the data has a 'val' split that it did not train on.",
    )
    _add_test_data(
        c,
        "val",
        "VOC split (default val); not one the run trained on",
        "COCO annotation JSON of held-out images (images in the run's --data unless given)",
    )
    c.add_argument("--json", action="store_true", help="print thresholds.json")
    add_common(c)
    c.set_defaults(func=_calibrate)

    r = sub.add_parser("predict", help="detect objects in image files; writes a PNG and a JSON per image")
    r.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    r.add_argument("--run", required=True, help="run directory written by 'detect train'")
    r.add_argument("--out", help="output folder (default RUN/predict)")
    r.add_argument(
        "--score-threshold",
        type=float,
        nargs="+",
        metavar="T",
        help="keep detections above it: one value, or one per class (default: the run's calibrated "
        "per-class thresholds, else 0 for SVMs and 0.5 for softmax)",
    )
    r.add_argument("--scorer", choices=("svm", "softmax"), help="default: the run's")
    r.add_argument(
        "--svd-rank",
        type=int,
        nargs="+",
        metavar="R",
        help="truncated SVD of fc6 and fc7 at rank R (or R6 R7): fewer multiply-adds "
        "(Fast R-CNN Sec. 3.1); compare mAP with and without",
    )
    r.add_argument("--json", action="store_true", help="print the detections as JSON")
    add_common(r)
    r.set_defaults(func=_predict)


def _add_test_data(p: argparse.ArgumentParser, split: str, split_help: str, ann_help: str) -> None:
    """The run and the data to score, shared by ``val`` and ``calibrate``."""
    p.add_argument("--run", required=True, help="run directory written by 'detect train'")
    p.add_argument("--data", help="data root (default: the run's data)")
    p.add_argument("--format", choices=("voc", "coco"), help="layout of --data (default voc)")
    p.add_argument("--ann", help=ann_help)
    p.add_argument("--split", default=split, help=split_help)
    p.add_argument("--scorer", choices=("svm", "softmax"), help="default: the run's")
    p.add_argument("--workers", type=int, help="selective search worker processes")


def _train(args: argparse.Namespace) -> int:
    from sppnet.engine.common import resolve_device
    from sppnet.engine.detect import TrainingInterrupted, train
    from sppnet.utils import load_json

    overrides = config_overrides(args, DetectConfig)
    if args.device is not None:
        overrides["device"] = args.device
    out = Path(args.out)
    if args.resume:
        if not (out / "config.json").is_file():
            raise ValueError(f"nothing to resume: {out / 'config.json'} does not exist")
        saved = DetectConfig.from_dict(load_json(out / "config.json"))
        if args.preset is not None and args.preset != saved.preset:
            raise ValueError(f"cannot change the preset when resuming: run used {saved.preset!r}")
        cfg = saved.with_overrides(overrides).resolved()  # train() refuses changes it cannot resume with
    else:
        preset = args.preset or ("paper" if resolve_device(args.device or "auto").type == "cuda" else "small")
        cfg = DetectConfig.from_preset(preset, overrides)
    try:
        train(cfg, out=out, resume=args.resume, verbose=not args.quiet)
    except TrainingInterrupted:
        return 130
    print(f"done: {out / 'detector.safetensors'}  (fine-tuning {out / 'finetune.csv'}, {out / 'finetune.png'})")
    return 0


def _svd_rank(args: argparse.Namespace) -> int | tuple[int, int] | None:
    rank = getattr(args, "svd_rank", None)
    if rank is None:
        return None
    if len(rank) > 2 or any(r < 1 for r in rank):
        raise ValueError(f"--svd-rank takes one or two positive ranks (fc6, fc7), got {' '.join(map(str, rank))}")
    return rank[0] if len(rank) == 1 else (rank[0], rank[1])


def _val(args: argparse.Namespace) -> int:
    from sppnet.engine.detect import json_safe, val

    result = val(
        args.run,
        data=args.data,
        split=args.split,
        fmt=args.format,
        ann=args.ann,
        scorer=args.scorer,
        device=args.device,
        workers=args.workers,
        verbose=not args.json,
        svd_rank=_svd_rank(args),
    )
    result = json_safe(result)
    if args.json:
        print(json.dumps({k: result[k] for k in ("mAP", "ap", "images", "seconds_per_image")}))
        return 0
    print(f"{'class':<16} AP")
    for name, ap in result["ap"].items():
        print(f"{name:<16} {'-' if ap is None else f'{ap:.4f}'}")
    mean = result["mAP"]
    print(
        f"{'mAP (VOC07)':<16} {'-' if mean is None else f'{mean:.4f}'}   on {result['images']} images, "
        f"{result['seconds_per_image']:.3f} s per image ({result['scorer']} scores)"
    )
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from sppnet.engine.detect import calibrate, json_safe

    result = json_safe(
        calibrate(
            args.run,
            data=args.data,
            split=args.split,
            fmt=args.format,
            ann=args.ann,
            scorer=args.scorer,
            device=args.device,
            workers=args.workers,
            verbose=not args.json,
        )
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'class':<16} {'threshold':>10} {'F1':>6} {'prec.':>6} {'recall':>6}")
    for name, point in result["operating_points"].items():
        cells = [f"{point[k]:.3f}" if point[k] is not None else "-" for k in ("f1", "precision", "recall")]
        print(f"{name:<16} {result['thresholds'][name]:>10.4f} {cells[0]:>6} {cells[1]:>6} {cells[2]:>6}")
    print(
        f"on {result['images']} {result['split']!r} images ({result['scorer']} scores) -> "
        f"{Path(args.run) / 'thresholds.json'}"
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from sppnet.engine.detect import predict

    threshold = args.score_threshold
    if threshold is not None and len(threshold) == 1:
        threshold = threshold[0]
    results = predict(
        args.run,
        args.images,
        out=args.out,
        score_threshold=threshold,
        scorer=args.scorer,
        device=args.device,
        verbose=not args.json,
        svd_rank=_svd_rank(args),
    )
    if args.json:
        print(json.dumps(results))
        return 0
    for r in results:
        found = ", ".join(f"{d['label']} {d['score']:.2f}" for d in r["detections"][:10]) or "nothing"
        print(f"{r['image']}: {len(r['detections'])} detections ({found}) -> {r['png']}, {r['json']}")
    return 0
