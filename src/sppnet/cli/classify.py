"""``sppnet classify train | val | predict`` (ultralytics-style)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from sppnet.cli._common import add_common, add_preset

_EPILOG = """examples:
  sppnet classify train --out runs/cls                       # built-in shapes data, small preset on CPU
  sppnet classify train --out runs/cls --schedule multi      # multi-size training (size / small size)
  sppnet classify train --data DIR --out runs/cls --epochs 30 --size 160
  sppnet classify train --out runs/cls --resume              # continue an interrupted run
  torchrun --nproc_per_node 2 -m sppnet classify train --out runs/cls   # data parallel
  sppnet classify val --run runs/cls --split test --views full --json
  sppnet classify predict --run runs/cls image1.jpg image2.png --views multi
"""

# Flags that map one-to-one onto ClassifyConfig fields (dest -> field).
_TRAIN_FIELDS = (
    "data", "model", "width", "fc_dim", "dropout", "init", "size", "small_size", "schedule", "epochs",
    "batch_size", "lr", "lr_steps", "momentum", "weight_decay", "alphastd", "seed", "workers", "cache_images",
    "device",
)  # fmt: skip


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
        "train", help="train a classifier", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an SPP-net classifier. Flags left out take the preset's value.",
    )
    t.add_argument("--data", help="ImageFolder root with train/<class>/* (and val/); default: the built-in shapes set")
    t.add_argument("--out", required=True, help="run directory (checkpoints, metrics, config)")
    add_preset(t)
    t.add_argument("--model", help="network: zf5 | convnet5 | overfeat5 | overfeat7 (default zf5)")
    t.add_argument("--no-spp", dest="spp", action="store_false", default=None,
                   help="the no-SPP baseline (fixed 6x6 pool5; one input size only)")
    t.add_argument("--width", type=float, help="channel multiplier (1.0 = the paper's Table 1)")
    t.add_argument("--fc-dim", type=int, help="width of fc6 / fc7 (paper 4096)")
    t.add_argument("--dropout", type=float, help="dropout after fc6 and fc7 (paper preset 0.5, small 0)")
    t.add_argument("--init", choices=("paper", "he"),
                   help="fc6/fc7 init: paper N(0, 0.01) or he (fan-in normal; small preset default)")
    t.add_argument("--size", type=int, help="crop side (paper 224); images are resized to short side size*256/224")
    t.add_argument("--small-size", type=int, help="second size of multi/random schedules (default size*180/224)")
    t.add_argument("--schedule", choices=("single", "multi", "random"),
                   help="single size (default), alternate size/small-size epochs, or a random size per epoch")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int, help="global batch size (split over torchrun processes)")
    t.add_argument("--lr", type=float, help="initial learning rate")
    t.add_argument("--lr-steps", type=_int_list, help="comma-separated epochs at which lr is divided by 10")
    t.add_argument("--momentum", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--alphastd", type=float, help="PCA colour-noise strength (0 disables; default 0.1)")
    t.add_argument("--seed", type=int)
    t.add_argument("--workers", type=int, help="DataLoader worker processes (turns the image cache off)")
    t.add_argument("--cache-images", action=argparse.BooleanOptionalAction, default=None,
                   help="keep decoded, resized training images in memory (small data sets; needs --workers 0)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    add_common(t)
    t.set_defaults(func=_train, device=None)

    v = sub.add_parser("val", help="evaluate a trained classifier",
                       description="Top-1 / top-5 accuracy of a run's model with the paper's test views.")
    v.add_argument("--run", required=True, help="run directory written by 'classify train'")
    v.add_argument("--data", help="ImageFolder root (default: the run's data)")
    v.add_argument("--split", default="val", help="split folder to evaluate (val | test | ...; default val)")
    _add_views(v)
    v.add_argument("--batch-size", type=int, help="images per batch (default: the run's)")
    v.add_argument("--workers", type=int, help="DataLoader worker processes (default: the run's)")
    v.add_argument("--json", action="store_true", help='print {"top1", "top5", "images", "views"} as JSON')
    add_common(v)
    v.set_defaults(func=_val)

    r = sub.add_parser("predict", help="classify image files of any size")
    r.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    r.add_argument("--run", required=True, help="run directory written by 'classify train'")
    _add_views(r)
    r.add_argument("--topk", type=int, default=5, help="classes to print per image (default 5)")
    r.add_argument("--json", action="store_true", help="print the predictions as JSON")
    add_common(r)
    r.set_defaults(func=_predict)


def _add_views(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--views", choices=("center", "ten", "full", "multi"), default="center",
        help="center crop | ten (corners + centre + flips) | full (whole image, SPP only) | "
        "multi (6 scales x 18 windows on the feature maps + 2 full views, SPP only); default center",
    )


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _train(args: argparse.Namespace) -> int:
    from sppnet.engine.classify import ClassifyConfig, train
    from sppnet.engine.common import resolve_device
    from sppnet.utils import load_json

    explicit = {f: getattr(args, f) for f in _TRAIN_FIELDS if getattr(args, f) is not None}
    if args.spp is not None:
        explicit["spp"] = args.spp
    if "data" in explicit:
        explicit["data"] = str(Path(explicit["data"]).resolve())
    out = Path(args.out)
    if args.resume:
        if not (out / "config.json").is_file():
            raise ValueError(f"nothing to resume: {out / 'config.json'} does not exist")
        saved = ClassifyConfig.from_dict(load_json(out / "config.json"))
        if args.preset is not None and args.preset != saved.preset:
            raise ValueError(f"cannot change the preset when resuming: run used {saved.preset!r}")
        cfg = dataclasses.replace(saved, **explicit)
    else:
        preset = args.preset or ("paper" if resolve_device(args.device or "auto").type == "cuda" else "small")
        cfg = ClassifyConfig.from_preset(preset, **explicit)
    train(cfg, out=out, resume=args.resume, verbose=not args.quiet)
    print(f"done: {out / 'model.safetensors'}  (metrics {out / 'metrics.csv'}, curves {out / 'curves.png'})")
    return 0


def _val(args: argparse.Namespace) -> int:
    from sppnet.engine.classify import open_image_folder, builtin_data_root, evaluate, load_classifier
    from sppnet.engine.common import resolve_device

    model, classes, cfg = load_classifier(args.run, resolve_device(args.device))
    root = Path(args.data) if args.data else (Path(cfg.data) if cfg.data else builtin_data_root())
    if not root.is_dir():
        raise ValueError(f"data folder {root} does not exist")
    dataset = open_image_folder(root, args.split, classes, verbose=True)
    changes = {k: getattr(args, k) for k in ("batch_size", "workers") if getattr(args, k) is not None}
    cfg = dataclasses.replace(cfg, **changes).resolved()
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
    from sppnet.engine.classify import load_classifier, predict
    from sppnet.engine.common import resolve_device

    model, classes, cfg = load_classifier(args.run, resolve_device(args.device))
    results = predict(model, args.images, classes, args.views, args.topk, cfg)
    if args.json:
        print(json.dumps(results))
        return 0
    for r in results:
        tops = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"])
        print(f"{r['image']}: {tops}")
    sys.stdout.flush()
    return 0
