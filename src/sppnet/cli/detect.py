"""``sppnet detect train | val | calibrate | predict`` (ultralytics-style)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sppnet.cli._common import add_common, add_limits, add_preset, set_limits
from sppnet.cli._options import add_config_options, config_overrides
from sppnet.engine.detect.config import PRESETS, DetectConfig

_EPILOG = """examples:
  sppnet detect train --out runs/det                         # built-in shapes data, small preset on CPU
  sppnet detect train --out runs/det --scales 480 576 688 864 1200   # five scales (times --size)
  sppnet detect train --out runs/det-rcnn --method rcnn      # the R-CNN baseline, same everything else
  sppnet detect train --data VOCdevkit/VOC2007 --split trainval --out runs/voc --preset paper
  sppnet detect train --out runs/det --resume                # continue an interrupted run
  torchrun --nproc_per_node 2 -m sppnet detect train --out runs/det   # N processes (gloo on CPU, NCCL on GPUs)
  sppnet detect train --out runs/det --feature-cache none --cache-dtype float16   # data too large to cache
  sppnet detect val --run runs/det --split test --json
  sppnet detect val --run runs/det --metric coco --save-json dets.json --save-coco-gt gt.json
  torchrun --nproc_per_node 2 -m sppnet detect val --run-dir runs/det --json   # images shared by 2 processes
  sppnet detect val --run runs/det --svd-rank 128            # fc6/fc7 by truncated SVD (faster fc)
  sppnet detect calibrate --run runs/det --split val          # per-class score thresholds for predict
  sppnet detect predict --run runs/det image1.jpg photos/ 'more/*.png' clip.mp4 --out runs/det/pred
  sppnet detect predict --run runs/det photos/ --recursive --save-json dets.json --save-txt labels/
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
        "--metric",
        choices=("voc07", "voc12", "coco"),
        default="voc07",
        help="voc07 (11-point AP, the paper's tables), voc12 (area under the curve) or coco (AP@[.5:.95] by "
        "pycocotools, with AP50 and AP75); default voc07",
    )
    v.add_argument(
        "--save-json",
        metavar="FILE",
        help="write the detections as COCO results ([{image_id, category_id, bbox: [x, y, w, h], score}], "
        "what pycocotools' loadRes reads)",
    )
    v.add_argument(
        "--save-coco-gt",
        metavar="FILE",
        help="write the split's ground truth as a COCO annotation file with the ids of --save-json (for VOC data)",
    )
    _add_amp(v)
    v.add_argument(
        "--json", action="store_true", help='print {"mAP", "ap": {class: AP}, "images", "seconds_per_image"} as JSON'
    )
    add_limits(v)
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
    add_limits(c)
    add_common(c)
    c.set_defaults(func=_calibrate)

    r = sub.add_parser(
        "predict",
        help="detect objects in images, folders, glob patterns and videos",
        description="Detects objects in every picture the SOURCEs name, in batches: a JSON and an annotated "
        "PNG per image, a JSON (one entry per frame) and an annotated MP4 per video. Bad sources are skipped "
        "with a warning naming them; the exit status is non-zero only when nothing could be read (or with "
        "--strict).",
    )
    r.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="image files, folders (their images), glob patterns ('photos/*.jpg', 'data/**/*.png') or video files",
    )
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
    r.add_argument("--batch-size", type=_positive, default=4, help="pictures detected together (default 4)")
    r.add_argument("--recursive", action="store_true", help="folders: also their sub-folders")
    r.add_argument("--strict", action="store_true", help="stop at the first bad source instead of skipping it")
    r.add_argument(
        "--video-stride", type=_positive, default=1, metavar="N", help="every N-th frame of a video (default 1)"
    )
    r.add_argument("--save-json", metavar="FILE", help="also write every result into this one JSON file")
    r.add_argument(
        "--save-txt", metavar="DIR", help="also write 'class_index score x1 y1 x2 y2' lines per picture into DIR"
    )
    r.add_argument("--no-images", action="store_true", help="no annotated PNGs or videos (JSON only)")
    _add_amp(r)
    r.add_argument("--json", action="store_true", help="print the detections as JSON")
    add_limits(r)
    add_common(r)
    r.set_defaults(func=_predict)


def _is_main() -> bool:
    """Not a ``torchrun`` worker other than rank 0 (which prints for all)."""
    return os.environ.get("RANK", "0") == "0"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_amp(p: argparse.ArgumentParser) -> None:
    from sppnet.engine.amp import AMP_CHOICES

    p.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default="none",
        help="mixed precision on CUDA: bf16 or fp16 autocast for conv and fc (the pyramid stays exact in its "
        "input dtype); a no-op on the CPU (default none)",
    )


def _add_test_data(p: argparse.ArgumentParser, split: str, split_help: str, ann_help: str) -> None:
    """The run and the data to score, shared by ``val`` and ``calibrate``."""
    p.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        help="run directory written by 'detect train' (spell it --run-dir after torchrun, whose --run-path "
        "takes a bare --run)",
    )
    p.add_argument("--data", help="data root (default: the run's data)")
    p.add_argument("--format", choices=("voc", "coco"), help="layout of --data (default voc)")
    p.add_argument("--ann", help=ann_help)
    p.add_argument("--split", default=split, help=split_help)
    p.add_argument("--scorer", choices=("svm", "softmax"), help="default: the run's")
    p.add_argument("--workers", type=int, help="selective search worker processes")


def _train(args: argparse.Namespace) -> int:
    from sppnet.engine.common import resolve_device
    from sppnet.engine.config import merge_overrides
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
        if args.preset is None and "weights" not in overrides.get("backbone", {}):
            # a preset chosen for the GPU never downloads: ImageNet weights come only when asked for
            overrides = merge_overrides(overrides, {"backbone": {"weights": None}})
        cfg = DetectConfig.from_preset(preset, overrides)
    try:
        train(cfg, out=out, resume=args.resume, verbose=not args.quiet)
    except TrainingInterrupted:
        return 130
    if not _is_main():
        return 0
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

    set_limits(args)
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
        metric=args.metric,
        save_json=args.save_json,
        save_coco_gt=args.save_coco_gt,
        amp=args.amp,
    )
    result = json_safe(result)
    if not _is_main():  # under torchrun rank 0 reports
        return 0
    if args.json:
        keys = ("mAP", "ap", "AP50", "AP75", "images", "seconds_per_image", "results_json", "coco_gt_json")
        print(json.dumps({k: result[k] for k in keys if k in result}))
        return 0
    print(f"{'class':<16} AP")
    for name, ap in result["ap"].items():
        print(f"{name:<16} {'-' if ap is None else f'{ap:.4f}'}")
    mean = result["mAP"]
    print(
        f"{f'mAP ({args.metric})':<16} {'-' if mean is None else f'{mean:.4f}'}   on {result['images']} images, "
        f"{result['seconds_per_image']:.3f} s per image ({result['scorer']} scores)"
    )
    for key in ("AP50", "AP75"):
        if key in result:
            print(f"{key:<16} {'-' if result[key] is None else f'{result[key]:.4f}'}")
    for key in ("results_json", "coco_gt_json"):
        if key in result:
            print(f"wrote {result[key]}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from sppnet.engine.detect import calibrate, json_safe

    set_limits(args)
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
    import sys

    from sppnet.data.sources import SourceReport
    from sppnet.engine.detect import predict

    set_limits(args)
    threshold = args.score_threshold
    if threshold is not None and len(threshold) == 1:
        threshold = threshold[0]
    report = SourceReport()
    results = predict(
        args.run,
        args.sources,
        out=args.out,
        score_threshold=threshold,
        scorer=args.scorer,
        device=args.device,
        verbose=not args.json,
        svd_rank=_svd_rank(args),
        batch_size=args.batch_size,
        recursive=args.recursive,
        strict=args.strict,
        video_stride=args.video_stride,
        save_images=not args.no_images,
        save_json=args.save_json,
        save_txt=args.save_txt,
        amp=args.amp,
        report=report,
    )
    if args.json:
        print(json.dumps(results))
        print(report.summary(), file=sys.stderr)
        return 0
    for r in results:
        found = ", ".join(f"{d['label']} {d['score']:.2f}" for d in r["detections"][:10]) or "nothing"
        written = ", ".join(r[k] for k in ("png", "video", "json", "txt") if k in r)
        print(f"{r['name']}: {len(r['detections'])} detections ({found}) -> {written}")
    return 0
