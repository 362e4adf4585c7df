"""``sppnet demo``: the main job. Trains a small SPP classifier and the SPP-net detector on
the built-in data, compares SPP-net with R-CNN, writes ``runs/demo/report.html``."""

from __future__ import annotations

import argparse

from sppnet.cli._common import add_common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the SPP-net demo on the built-in data (CPU, minutes): report with pictures",
        description=(
            "Trains an SPP classifier with multi-size training and the SPP-net detector on "
            "sppnet's built-in shapes data, evaluates them (top-1, VOC07 mAP), times SPP-net "
            "against the R-CNN baseline and writes OUT/report.html (self-contained) plus the PNGs "
            "it shows. About 4-7 minutes on 2 CPU cores; --quick takes under 2."
        ),
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="tiny data and schedules (< 2 minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="where the built-in data sets are generated (default: OUT/data)")
    p.add_argument("--resume", action="store_true", help="reuse the finished training runs in OUT")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sppnet.engine.demo import DemoConfig, dumps, run_demo

    cfg = DemoConfig(
        out=args.out, quick=args.quick, seed=args.seed, device=args.device, data_root=args.data_root, resume=args.resume
    )
    summary = run_demo(cfg)
    if args.json:
        print(dumps(summary))
    return 0
