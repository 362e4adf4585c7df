"""SPP-net Table 9 on data this machine can reach: SPP-net vs R-CNN, row by row.

Columns (one detector each, all on the SAME pretrained backbone, the same
proposals and the same training and test images):

* SPP 1-scale -- conv5 once per image at one scale (s = 688);
* SPP 5-scale -- conv5 once per image at each of the five scales
  (480, 576, 688, 864, 1200), each window pooled at the scale where its area
  is closest to 224 x 224 (x size factor);
* SPP auto scales -- ``sppnet detect train``'s default: conv5 at the scale that
  brings the training objects closest to the window target (Sec. 4.2's rule,
  chosen by the run from its data) and at twice that scale, each window pooled
  at the one where its area is closest to the target; not multiplied by
  ``--spp-scale-multiplier``;
* R-CNN       -- every window cropped with 16/227 of context on each side
  (R-CNN Appendix A), warped to the network's input size and run through the
  conv layers on its own (``--method rcnn``).

Sizes: the preset's size factor (``small``: 0.5) scales the network's input --
the window target, R-CNN's warp, the pretraining crops -- and, in
``sppnet detect train``, the image scales too. Here the SPP columns run at the
paper's own image scales (``--spp-scale-multiplier``, default 2 = 1 / 0.5):
conv5's stride stays 16 px whatever the width, so halving the image halves the
conv5 cells under every object (at s = 344 half of the built-in objects span
fewer than 3 cells), which the paper's setting never did to SPP-net and which
R-CNN, warping every window to its input size, does not suffer.

Rows (Table 9): SVMs on ``pool5`` (no fine-tuning), on ``fc7`` (no
fine-tuning), on ``ftfc7`` (fc6-fc8 fine-tuned), and ``ftfc7 + bb`` (plus box
regression). Each cell: VOC07 mAP on the test split and seconds per test image
(features = conv + pyramid, or warp + conv, plus the row's head and NMS;
proposals excluded, as in the paper). Detections are selected as the released
``spp_test.m`` does (the runs' ``test`` settings): per-class NMS at IoU 0.3 on
the proposals' boxes and scores, at most 100 per class and image, then the
survivors' boxes regressed. The ``ftfc7 + bb`` row is also scored with the
other order (every window regressed, NMS on the regressed boxes), on the same
trained detector: ``results.json``'s ``ftfc7 + bb, other NMS order``.

The backbone is pretrained once (by the first column, as ``sppnet detect train``
does: a classifier of object and background windows, multi-size training) and
handed to the other columns with ``--backbone``: ImageNet weights cannot be had
here, and the comparison is only fair when every column starts from the same
conv layers. Proposals are computed once and shared.

Writes, to ``--out``:

* ``results.json`` -- every number (updated after each column; an interrupted
  run resumes: finished columns are skipped, a half-trained one continues);
* ``table.md``     -- mAP (%) and seconds per image, the paper's layout;
* ``table.png``    -- mAP per row and column, as bars.

Usage::

    python experiments/detection_table.py --out runs/dettable          # built-in data (200 / 100 images), about 1 h
    python experiments/detection_table.py --out runs/voc --data VOC2007   # any VOC folder (trainval / test)
    python experiments/detection_table.py --out /tmp/d --quick            # smoke test, about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sppnet.data import make_detection_dataset
from sppnet.engine import detect as D
from sppnet.engine.common import load_state, progress, save_state
from sppnet.engine.config import merge_overrides
from sppnet.engine.detect.features import load_record_image
from sppnet.engine.detect.svm import train_window_svms
from sppnet.evaluation import evaluate_detections
from sppnet.models.detector import PAPER_SCALES
from sppnet.ops import select_detections
from sppnet.utils import atomic_write_text, load_json, save_json
from sppnet.viz.plots import plot_grouped_bars

COLUMNS = {
    "SPP 1-scale": {"method": "spp", "features": {"scales": (688,)}},
    "SPP 5-scale": {"method": "spp", "features": {"scales": PAPER_SCALES}},
    "R-CNN": {"method": "rcnn", "features": {"scales": (688,)}},
    # sppnet detect train's own default: the scale that brings the training objects closest to
    # the window target (Sec. 4.2's rule), and twice it, chosen by the run from its data
    "SPP auto scales": {"method": "spp", "features": {"auto_scale": True}},
}
ROWS = ("pool5", "fc7", "ftfc7", "ftfc7 + bb")
OTHER_ORDER = "ftfc7 + bb, other NMS order"
PAPER = {  # Table 9 (VOC 2007 test, ZF-5 for SPP-net, AlexNet for R-CNN), mAP %
    "pool5": (43.0, 44.9, 44.2),
    "ftfc7": (54.5, 55.2, 54.2),
    "ftfc7 + bb": (58.0, 59.2, 58.5),
}

# --quick: a tiny data set and network; checks that every column and row runs.
QUICK_DATA = {"num_train": 12, "num_val": 2, "num_test": 6}
QUICK = {
    "backbone": {"width": 0.125, "fc_dim": 64, "epochs": 2},
    "finetune": {"iterations": 30, "lr_steps": (20,), "checkpoint_every": 20},
    "proposals": {"max_proposals": 150},
    "svm": {"retrain_limit": 300},
    "workers": 0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (runs, results.json, table.md, table.png)")
    p.add_argument("--data", help="Pascal VOC root (default: the built-in shapes set)")
    p.add_argument("--train-split", default=None, help="VOC split to train on (default: train; trainval for --data)")
    p.add_argument("--test-split", default="test")
    p.add_argument("--preset", default="small", choices=sorted(D.PRESETS))
    p.add_argument(
        "--columns",
        nargs="+",
        choices=list(COLUMNS),
        default=list(COLUMNS),
        metavar="COLUMN",
        help=f"columns to run (default: all of {list(COLUMNS)})",
    )
    p.add_argument(
        "--train-images",
        type=int,
        default=200,
        help="built-in data only: training images generated (default 200; test half as many)",
    )
    p.add_argument(
        "--spp-scale-multiplier",
        type=float,
        default=None,
        help="multiplies the SPP columns' image scales only (the 224 px window target and R-CNN's "
        "warp keep the preset's size). Default 2 (1 with --quick): with the small preset's size "
        "factor 0.5 that is the paper's own image scales, s = 688 and 480-1200 px",
    )
    p.add_argument(
        "--backbone",
        help="a pretrained backbone (classification run) for every column (default: the first column pretrains one)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny data and network: a smoke test")
    args = p.parse_args(argv)
    if args.spp_scale_multiplier is None:
        args.spp_scale_multiplier = 1.0 if args.quick else 2.0
    if not args.spp_scale_multiplier > 0:
        p.error(f"--spp-scale-multiplier must be > 0, got {args.spp_scale_multiplier}")
    return args


def column_config(args: argparse.Namespace, data: str | None, column: str, backbone: Path | None) -> D.DetectConfig:
    values: dict = {
        "data": data,
        "split": args.train_split or ("trainval" if args.data else "train"),
        "seed": args.seed,
        "device": args.device,
        "backbone.checkpoint": str(backbone) if backbone else None,
    }
    if args.workers is not None:
        values["workers"] = args.workers
    column_values = COLUMNS[column]
    fixed = {}
    if "scales" in column_values["features"]:  # fixed scales (the auto scale is the run's own choice)
        scales = column_values["features"]["scales"]
        if column_values["method"] == "spp" and args.spp_scale_multiplier != 1.0:
            scales = tuple(round(s * args.spp_scale_multiplier) for s in scales)
        fixed = {"features.scales": scales}
    overrides = merge_overrides(QUICK if args.quick else {}, column_values, values, fixed)
    return D.DetectConfig.from_preset(args.preset, overrides)


def share_proposals(run: Path, shared: Path) -> None:
    """Points ``run/cache/proposals`` at the shared cache (entries are keyed by
    image content and parameters, so sharing is safe); copies nothing."""
    link = run / "cache" / "proposals"
    if link.exists() or link.is_symlink():
        return
    shared.mkdir(parents=True, exist_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(shared.resolve(), target_is_directory=True)
    except OSError:  # no symlinks here: each column computes its own (same result)
        pass


@torch.no_grad()
def row_svms(cfg: D.DetectConfig, run: Path, verbose: bool) -> dict[str, dict]:
    """The rows without fine-tuning: SVMs on pool5 and on fc7 of the pretrained fc
    layers, trained exactly like the run's own (ft)fc7 SVMs. Saved in the run."""
    records, windows, classes = D.training_set(cfg, run, verbose=False)
    before = D.stage_detector(run, "backbone")  # fc6 / fc7 as pretrained
    cache = D.feature_cache(cfg, run, before, records, windows)  # conv5 is the same in every stage
    out = {}
    for layer in ("pool5", "fc7"):
        path = run / f"table_svm_{layer}.safetensors"
        if path.is_file():
            out[layer] = load_state(path)
            continue

        def features(i: int, layer: str = layer) -> torch.Tensor:
            pool5 = cache.pool5(i, torch.arange(len(windows[i])))
            return (pool5 if layer == "pool5" else before.fc7(pool5)).cpu()

        def wrap(it, layer: str = layer, **kw):
            return progress(it, desc=f"{kw.get('desc')} ({layer})", total=kw.get("total"), enabled=verbose)

        res = train_window_svms(features, windows, len(classes), cfg.svm, wrap)
        out[layer] = {"weight": res.weight, "bias": res.bias, "scale": torch.tensor(res.feature_scale)}
        save_state(path, out[layer])
    return out


def select(boxes: torch.Tensor, scores: torch.Tensor, per_class: torch.Tensor, test, nms_boxes: str) -> dict:
    """Detections of one image as :meth:`SPPDetector.detect` selects them with the settings ``test``.

    ``nms_boxes="proposals"``: NMS on the proposals ``boxes`` [K, 4], then the
    survivors take their class's box of ``per_class`` [K, C, 4];
    ``"regressed"``: NMS on ``per_class`` itself.
    """
    caps = {"max_per_image": test.max_per_image, "max_per_class": test.max_per_class}
    if nms_boxes == "proposals":
        det = select_detections(boxes, scores, float("-inf"), 0.3, **caps)
        det["boxes"] = per_class[det["windows"], det["labels"]]
        return det
    return select_detections(per_class, scores, float("-inf"), 0.3, **caps)


@torch.no_grad()
def evaluate_rows(cfg: D.DetectConfig, run: Path, test_split: str, svms: dict, verbose: bool) -> dict:
    """Every row of one column on the test split: pool5 once per image, then each row's head."""
    final, classes, _ = D.load_detector(run)
    before = D.stage_detector(run, "backbone")
    records, props = D.split_proposals(cfg, run, test_split, classes, verbose=False)

    def svm(layer: str, x: torch.Tensor) -> torch.Tensor:
        s = svms[layer]
        return (s["scale"] * x) @ s["weight"].T + s["bias"]

    other = "regressed" if cfg.test.nms_boxes == "proposals" else "proposals"
    preds = {row: [] for row in (*ROWS, OTHER_ORDER)}
    seconds = {row: 0.0 for row in (*ROWS, OTHER_ORDER)}
    feature_seconds = 0.0
    truths = []
    for r, p in progress(list(zip(records, props)), desc="test", total=len(records), enabled=verbose):
        image = load_record_image(r)
        boxes = torch.as_tensor(p, dtype=torch.float32)
        t0 = time.perf_counter()
        pool5 = final.window_pool5(final.normalize(image), boxes)  # conv + pyramid (SPP) or warp + conv (R-CNN)
        t_feat = time.perf_counter() - t0
        feature_seconds += t_feat
        plain = boxes[:, None, :].expand(-1, final.num_classes, 4)

        def head(row: str, pool5=pool5, boxes=boxes, plain=plain, size=tuple(image.shape[-2:])):
            """``(scores [K, C], per-class boxes [K, C, 4])`` of one Table 9 row."""
            if row == "pool5":
                return svm("pool5", pool5), plain
            if row == "fc7":
                return svm("fc7", before.fc7(pool5)), plain
            scores = final.class_scores(final.fc7(pool5), "svm")
            return scores, (final.regress_boxes(boxes, pool5, size) if row == "ftfc7 + bb" else plain)

        for row in ROWS:
            t0 = time.perf_counter()
            scores, per_class = head(row)
            t_head = time.perf_counter() - t0
            orders = [(row, cfg.test.nms_boxes)] + ([(OTHER_ORDER, other)] if row == "ftfc7 + bb" else [])
            for name, order in orders:
                t0 = time.perf_counter()
                preds[name].append(select(boxes, scores, per_class, cfg.test, order))
                seconds[name] += t_feat + t_head + time.perf_counter() - t0
        truths.append({"boxes": r["boxes"], "labels": r["labels"], "difficult": r["difficult"]})
    n = max(len(records), 1)
    result: dict = {"images": len(records), "feature_seconds_per_image": feature_seconds / n}
    for row in (*ROWS, OTHER_ORDER):
        ev = evaluate_detections(preds[row], truths, classes, 0.5, "voc07")
        result[row] = {"mAP": ev["mAP"], "ap": ev["ap"], "seconds_per_image": seconds[row] / n}
    result[OTHER_ORDER]["nms_boxes"] = other
    return result


def run_column(args, data: str | None, column: str, out: Path, backbone: Path | None) -> dict:
    run = out / "runs" / column.lower().replace(" ", "-")
    cfg = column_config(args, data, column, backbone)
    share_proposals(run, out / "shared" / "proposals")
    t0 = time.perf_counter()
    finished = (run / "detector.safetensors").is_file()
    if not finished:
        D.train(cfg, out=run, resume=(run / "config.json").is_file(), verbose=True)
    cfg = D.DetectConfig.from_dict(load_json(run / "config.json"))
    train_seconds = time.perf_counter() - t0
    svms = row_svms(cfg, run, verbose=True)
    result = evaluate_rows(cfg, run, args.test_split, svms, verbose=True)
    times = load_json(run / "stages" / "times.json") if (run / "stages" / "times.json").is_file() else {}
    result["stage_seconds"] = times
    result["train_seconds_this_session"] = round(train_seconds, 1)
    return result


def _none_from_nan(v: Any) -> Any:
    """NaN -> None, recursively (for JSON)."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _none_from_nan(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_none_from_nan(x) for x in v]
    return v


def _nan_from_none(v: Any, number: bool = False) -> Any:
    """The inverse of :func:`_none_from_nan` for a results file read back (resume): the APs only."""
    if v is None and number:
        return math.nan
    if isinstance(v, dict):
        return {k: _nan_from_none(x, number or k in ("ap", "mAP")) for k, x in v.items()}
    return v


def pct(v: float) -> str:
    return "–" if math.isnan(v) else f"{100 * v:.1f}"


def write_table(results: dict, args: argparse.Namespace, total: float, out: Path, data_name: str) -> str:
    cols = [c for c in COLUMNS if c in results]
    lines = [
        f"VOC07 mAP (%) on the `{args.test_split}` split of {data_name}; "
        f"seconds per test image in brackets (proposals excluded). Preset `{args.preset}`"
        + (" (--quick)" if args.quick else "")
        + (f", SPP scales x{args.spp_scale_multiplier:g}" if args.spp_scale_multiplier != 1.0 else "")
        + ".",
        "",
        "| | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for row in ROWS:
        cells = [f"{pct(results[c][row]['mAP'])} ({results[c][row]['seconds_per_image']:.3f} s)" for c in cols]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append(
        "| features (conv + pool / warp + conv) s per image | "
        + " | ".join(f"{results[c]['feature_seconds_per_image']:.3f}" for c in cols)
        + " |"
    )
    orders = [c for c in cols if OTHER_ORDER in results[c]]
    if orders:
        lines.append(
            "| ftfc7 + bb, NMS on the "
            + "/".join(sorted({results[c][OTHER_ORDER]["nms_boxes"] for c in orders}))
            + " boxes | "
            + " | ".join(pct(results[c][OTHER_ORDER]["mAP"]) if c in orders else "–" for c in cols)
            + " |"
        )
    if "R-CNN" in results:
        rc = results["R-CNN"]
        for c in cols:
            if c == "R-CNN":
                continue
            r = results[c]
            gap = 100 * (r["ftfc7 + bb"]["mAP"] - rc["ftfc7 + bb"]["mAP"])
            lines.append("")
            lines.append(
                f"{c} vs R-CNN: features {rc['feature_seconds_per_image'] / r['feature_seconds_per_image']:.1f}x "
                f"faster, whole test (ftfc7 + bb) "
                f"{rc['ftfc7 + bb']['seconds_per_image'] / r['ftfc7 + bb']['seconds_per_image']:.1f}x faster; "
                f"mAP difference (ftfc7 + bb) {gap:+.1f} points."
            )
    lines += [
        "",
        "Paper (VOC 2007 test, ImageNet-pretrained ZF-5 / AlexNet), mAP %: "
        + "; ".join(f"{row} {'/'.join(f'{v:.1f}' for v in vals)}" for row, vals in PAPER.items())
        + " (SPP 1-scale / SPP 5-scale / R-CNN).",
        "",
        f"Total {total / 60:.1f} min on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}. Command: `python experiments/detection_table.py {' '.join(sys.argv[1:])}`",
    ]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "table.md", text)
    return text


def plot(results: dict, out: Path, data_name: str) -> Path:
    cols = [c for c in COLUMNS if c in results]
    series = {c: [100 * results[c][row]["mAP"] for row in ROWS] for c in cols}
    return plot_grouped_bars(ROWS, series, out / "table.png", "VOC07 mAP (%)", f"SPP-net Table 9 on {data_name}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        data = str(Path(args.data))
    else:  # the built-in shapes generator, at a size that keeps the three columns under 45 min
        counts = (
            QUICK_DATA
            if args.quick
            else {"num_train": args.train_images, "num_val": 0, "num_test": max(args.train_images // 2, 1)}
        )
        data = str(make_detection_dataset(out / "data", seed=args.seed, **counts))
    data_name = (
        f"`{args.data}`"
        if args.data
        else (f"the built-in shapes data ({counts['num_train']} train / {counts['num_test']} test images)")
    )
    results_path = out / "results.json"
    results: dict = _nan_from_none(load_json(results_path)) if results_path.exists() else {}
    backbone = Path(args.backbone).resolve() if args.backbone else None
    columns = [c for c in COLUMNS if c in args.columns]
    for column in columns:
        if column not in results:
            print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {column}", file=sys.stderr, flush=True)
            results[column] = run_column(args, data, column, out, backbone)
            save_json(results_path, _none_from_nan(results))  # JSON has no NaN (a class without test objects)
        if backbone is None:  # the first column's pretrained backbone serves the others
            backbone = out / "runs" / column.lower().replace(" ", "-") / "backbone"
            if not (backbone / "model.safetensors").is_file():
                saved = D.DetectConfig.from_dict(
                    load_json(out / "runs" / column.lower().replace(" ", "-") / "config.json")
                )
                backbone = Path(saved.backbone.checkpoint or backbone)
        r = results[column]
        print(
            f"[{(time.perf_counter() - start) / 60:5.1f} min] {column}: "
            + ", ".join(f"{row} {pct(r[row]['mAP'])}" for row in ROWS),
            flush=True,
        )
    total = time.perf_counter() - start
    shown = {c: v for c, v in results.items() if c in COLUMNS}
    print(write_table(shown, args, total, out, data_name))
    print(f"wrote {out / 'table.md'} and {plot(shown, out, data_name)}; total time {total / 60:.1f} min")
    print(json.dumps({"total_seconds": round(total, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
