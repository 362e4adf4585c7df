"""``sppnet classify train | val | predict`` (ultralytics-style)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sppnet.cli._common import add_common, add_limits, add_preset, set_limits
from sppnet.cli._options import add_config_options, config_overrides
from sppnet.engine.classify.config import PRESETS, ClassifyConfig
from sppnet.engine.views import VIEWS

_EPILOG = """examples:
  sppnet classify train --out runs/cls                       # built-in shapes data, small preset on CPU
  sppnet classify train --out runs/cls --schedule multi      # multi-size training (size / small size)
  sppnet classify train --data DIR --out runs/cls --epochs 30 --size 160
  sppnet classify train --out runs/cls --resume              # continue an interrupted run
  torchrun --nproc_per_node 2 -m sppnet classify train --out runs/cls   # data parallel
  sppnet classify val --run runs/cls --split test --views full --json
  sppnet classify predict --run runs/cls image1.jpg photos/ 'more/*.png' --views multi
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "classify",
        help="SPP-net image classification: train, val, predict",
        description="SPP-net classifiers (Table 1 networks with a spatial pyramid pooling head).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train a classifier",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an SPP-net classifier. Flags left out take the preset's value.",
    )
    t.add_argument("--out", required=True, help="run directory (checkpoints, metrics, config)")
    add_preset(t)
    add_config_options(
        t, ClassifyConfig, presets=_preset_configs(), exclude=("limits.max_search_pixels",), titles={"": "settings"}
    )
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    add_common(t)
    t.set_defaults(func=_train, device=None)

    v = sub.add_parser(
        "val",
        help="evaluate a trained classifier",
        description="Top-1 / top-5 accuracy of a run's model with the paper's test views.",
    )
    v.add_argument("--run", required=True, help="run directory written by 'classify train'")
    v.add_argument("--data", help="ImageFolder root (default: the run's data)")
    v.add_argument("--split", default="val", help="split folder to evaluate (val | test | ...; default val)")
    _add_views(v)
    v.add_argument("--batch-size", type=int, help="images per batch (default: the run's)")
    v.add_argument("--workers", type=int, help="DataLoader worker processes (default: the run's)")
    v.add_argument("--json", action="store_true", help='print {"top1", "top5", "images", "views"} as JSON')
    add_limits(v, search=False)
    add_common(v)
    v.set_defaults(func=_val)

    r = sub.add_parser(
        "predict",
        help="classify images of any size: files, folders, glob patterns, videos",
        description="Classifies every picture the SOURCEs name; bad sources are skipped with a warning naming "
        "them, and the exit status is non-zero only when nothing could be read (or with --strict).",
    )
    r.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="image files, folders (their images), glob patterns ('photos/*.jpg') or video files",
    )
    r.add_argument("--recursive", action="store_true", help="folders: also their sub-folders")
    r.add_argument("--strict", action="store_true", help="stop at the first bad source instead of skipping it")
    r.add_argument("--video-stride", type=int, default=1, metavar="N", help="every N-th frame of a video (default 1)")
    r.add_argument("--run", required=True, help="run directory written by 'classify train'")
    _add_views(r)
    r.add_argument("--topk", type=int, default=5, help="classes to print per image (default 5)")
    r.add_argument("--json", action="store_true", help="print the predictions as JSON")
    add_limits(r, search=False)
    add_common(r)
    r.set_defaults(func=_predict)


def _add_views(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--views",
        choices=VIEWS,
        default="center",
        help="center crop | ten (corners + centre + flips) | full (whole image, SPP only) | "
        "multi (6 scales x 18 windows on the feature maps + 2 full views, SPP only); default center",
    )


def _preset_configs() -> dict[str, ClassifyConfig]:
    """Each preset resolved, for the defaults that ``--help`` shows."""
    return {name: ClassifyConfig.from_preset(name) for name in PRESETS}


def _overrides(args: argparse.Namespace) -> dict:
    """The settings typed on the command line (``--data`` made absolute), as overrides."""
    overrides = config_overrides(args, ClassifyConfig)
    if args.device is not None:
        overrides["device"] = args.device
    return overrides


def _train(args: argparse.Namespace) -> int:
    from sppnet.engine.classify import train
    from sppnet.engine.common import resolve_device
    from sppnet.utils import load_json

    overrides = _overrides(args)
    out = Path(args.out)
    if args.resume:
        if not (out / "config.json").is_file():
            raise ValueError(f"nothing to resume: {out / 'config.json'} does not exist")
        saved = ClassifyConfig.from_dict(load_json(out / "config.json"))
        if args.preset is not None and args.preset != saved.preset:
            raise ValueError(f"cannot change the preset when resuming: run used {saved.preset!r}")
        cfg = saved.with_overrides(overrides)
    else:
        preset = args.preset or ("paper" if resolve_device(args.device or "auto").type == "cuda" else "small")
        if args.preset is None:
            # a preset chosen for the GPU never downloads: ImageNet weights come only when asked for
            overrides = {"weights": None, **overrides}
        cfg = ClassifyConfig.from_preset(preset, overrides)
    train(cfg, out=out, resume=args.resume, verbose=not args.quiet)
    print(f"done: {out / 'model.safetensors'}  (metrics {out / 'metrics.csv'}, curves {out / 'curves.png'})")
    return 0


def _val(args: argparse.Namespace) -> int:
    from sppnet.engine.classify import builtin_data_root, evaluate, load_classifier, open_image_folder
    from sppnet.engine.common import resolve_device

    set_limits(args)
    model, classes, cfg = load_classifier(args.run, resolve_device(args.device))
    root = Path(args.data) if args.data else (Path(cfg.data) if cfg.data else builtin_data_root())
    if not root.is_dir():
        raise ValueError(f"data folder {root} does not exist")
    dataset = open_image_folder(root, args.split, classes, verbose=True)
    changes = {k: getattr(args, k) for k in ("batch_size", "workers") if getattr(args, k) is not None}
    if changes.get("workers"):
        changes["cache_images"] = False  # the cache is a training setting; val loads in the workers
    cfg = cfg.with_overrides(changes).resolved()
    result = evaluate(model, dataset, args.views, cfg, verbose=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.run} on {root / args.split}: top-1 {100 * result['top1']:.2f}%  top-5 "
            f"{100 * result['top5']:.2f}%  ({result['images']} images, views {args.views}, "
            f"{result['views_per_image']:.1f} per image)"
        )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from sppnet.data.sources import SourceReport, resolve_sources
    from sppnet.engine.classify.inference import load_classifier, predict_sources
    from sppnet.engine.common import resolve_device
    from sppnet.utils import check_json_finite

    set_limits(args)
    report = SourceReport()
    entries = resolve_sources(args.sources, recursive=args.recursive, strict=args.strict, report=report)
    model, classes, cfg = load_classifier(args.run, resolve_device(args.device))
    results = predict_sources(
        model,
        entries,
        classes,
        args.views,
        args.topk,
        cfg,
        strict=args.strict,
        video_stride=args.video_stride,
        report=report,
    )
    if args.json:
        print(json.dumps(check_json_finite(results, "the predictions")))
    else:
        for r in results:
            tops = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"])
            print(f"{r['name'] if 'frame' in r else r['image']}: {tops}")
    sys.stdout.flush()
    print(report.summary(), file=sys.stderr)
    return 0
