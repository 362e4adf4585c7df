"""``sppnet export --run RUN --format onnx|torchscript``: the trained classifier with
DYNAMIC input height and width, verified against eager PyTorch before success."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sppnet.cli._common import add_common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained classifier to ONNX or TorchScript (dynamic input size)",
        description=(
            "Exports the classifier of a `sppnet classify train` run. SPP models keep their "
            "any-size property: ONNX graphs have dynamic height and width and are checked in "
            "onnxruntime against eager PyTorch at three input sizes before the command reports "
            "success; TorchScript modules are traced and checked the same way."
        ),
    )
    p.add_argument("--run", required=True, type=Path, help="run directory of `sppnet classify train`")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", type=Path, default=None, help="output file (default: RUN/model.onnx or RUN/model.ts)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--json", action="store_true", help="print the export report as JSON")
    add_common(p)
    p.set_defaults(func=run)


def verify_sizes(size: int, min_size: int) -> list[tuple[int, int]]:
    """Three input sizes where adaptive pooling does not divide: the crop size and two others."""
    other = max(min_size, int(size * 0.8)) | 1  # odd sides: bins overlap
    return [(size, size), (other, size + 13), (size + 29, max(min_size, int(size * 0.6)) | 1)]


def run(args: argparse.Namespace) -> int:
    from sppnet.engine.classify import load_classifier
    from sppnet.engine.common import resolve_device
    from sppnet.export import export_onnx, export_torchscript

    device = resolve_device("cpu" if args.device == "auto" else args.device)
    model, classes, cfg = load_classifier(args.run, device)
    model.eval()
    size = int(cfg.size)
    spp = bool(getattr(model, "spp", True))
    sizes = verify_sizes(size, model.min_input_size) if spp else [(size, size)]
    suffix = ".onnx" if args.format == "onnx" else ".ts"
    out = args.out or (Path(args.run) / f"model{suffix}")
    if args.format == "onnx":
        report = export_onnx(
            model, out, (size, size), dynamic_hw=spp, opset=args.opset, verify_sizes=sizes, atol=1e-4, rtol=1e-4
        )
    else:
        report = export_torchscript(model, out, (size, size), verify_sizes=sizes, atol=1e-4, rtol=1e-4)
    report["classes"] = list(classes)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        checked = ", ".join(
            f"{v['size'][0]}x{v['size'][1]} (max err {v['max_abs_err']:.1e})" for v in report["verified"]
        )
        print(f"wrote {report['path']}: {args.format}, dynamic height/width: {spp}; verified at {checked}")
    return 0
