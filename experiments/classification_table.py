"""SPP-net Tables 2 and 3 on data this machine can reach.

For one architecture at a CPU-sized width, trains (>= 3 seeds each)

* no SPP            -- the baseline: fixed 6x6 pool5, single size;
* SPP single-size   -- the pyramid, trained at ``size`` only;
* SPP multi-size    -- alternating full epochs at ``size`` and ``small_size``;
* SPP random-size   -- a size uniform in ``[small_size, size]`` per epoch;

and tests each on the test split with 1 centre crop, the full image (SPP only;
Table 3) and the standard 10-view (Table 2). Writes, to ``--out``:

* ``results.json`` -- every run's numbers (updated after each run; an interrupted
  experiment picks up where it stopped, resuming a half-trained run exactly);
* ``table.md``     -- top-1 / top-5 error (%) mean ± std over seeds;
* ``table.png``    -- top-1 error per variant and view, bars with std error bars.

Usage::

    python experiments/classification_table.py --out runs/table        # default: < 30 min on 2 cores
    python experiments/classification_table.py --out /tmp/t --quick    # smoke test, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from sppnet.data.imagefolder import ImageFolderDataset
from sppnet.data.synthetic import make_classification_dataset
from sppnet.engine.classify import ClassifyConfig, builtin_data_root, evaluate, load_classifier, train
from sppnet.engine.common import MetricsLog
from sppnet.utils import atomic_write_text, load_json, save_json
from sppnet.viz.plots import plot_grouped_bars

VARIANTS = {
    "no SPP": {"spp": False, "schedule": "single"},
    "SPP single-size": {"spp": True, "schedule": "single"},
    "SPP multi-size": {"spp": True, "schedule": "multi"},
    "SPP random-size": {"spp": True, "schedule": "random"},
}
VIEWS = ("center", "full", "ten")
VIEW_TITLES = {"center": "1 crop", "full": "full image", "ten": "10-view"}

# The default experiment is the small preset as it is (4 variants x 3 seeds in
# under 30 minutes on 2 CPU cores); --quick shrinks data, network and epochs.
QUICK = {"width": 0.1, "fc_dim": 32, "size": 112, "epochs": 2, "lr_steps": (), "batch_size": 16, "workers": 0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (runs, results.json, table.md, table.png)")
    p.add_argument("--data", help="ImageFolder root with train/val/test (default: the built-in shapes set)")
    p.add_argument("--model", help="registry name (default: the small preset's, overfeat5)")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (0 1 with --quick)")
    p.add_argument("--width", type=float)
    p.add_argument("--size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny data and network, 2 seeds: a smoke test")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0, 1] if args.quick else [0, 1, 2]
    return args


def base_config(args: argparse.Namespace, data: Path) -> ClassifyConfig:
    values = dict(QUICK) if args.quick else {}
    for key in ("model", "width", "size", "epochs", "workers"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return ClassifyConfig.from_preset("small", device=args.device, data=str(data), **values)


def run_one(cfg: ClassifyConfig, run: Path, test: ImageFolderDataset) -> dict:
    """Trains (or resumes) one run and tests it with every view it supports."""
    done = (run / "last.safetensors").exists()
    t0 = time.perf_counter()
    train(cfg, out=run, resume=done, verbose=False)
    seconds = time.perf_counter() - t0
    model, _, cfg = load_classifier(run, cfg.device)
    result: dict = {"train_seconds": round(seconds, 1), **training_summary(run)}
    for views in VIEWS:
        if views == "full" and not cfg.spp:
            continue
        r = evaluate(model, test, views, cfg)
        result[views] = {"top1_err": 100 * (1 - r["top1"]), "top5_err": 100 * (1 - r["top5"])}
    return result


def training_summary(run: Path) -> dict:
    """What explains a test error, from the run's ``metrics.csv``: epochs trained, the
    training error of the last epoch at each size (multi-size runs alternate), and the
    best validation error (the epoch whose weights were kept)."""
    rows = MetricsLog.load(run / "metrics.csv").rows
    if not rows:
        return {}
    last_by_size: dict[str, float] = {}
    for r in rows:
        last_by_size[str(r["size"])] = 100 * (1 - r["train_acc"])
    out: dict = {"epochs": len(rows), "train_err": 100 * (1 - rows[-1]["train_acc"]), "train_err_by_size": last_by_size}
    vals = [r["val_top1"] for r in rows if isinstance(r.get("val_top1"), (int, float))]
    if vals:
        out["best_val_err"] = 100 * (1 - max(vals))
    return out


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def _cell(runs: list[dict], views: str, key: str) -> str:
    return mean_std([r[views][key] for r in runs if views in r])


def write_table(
    results: dict, cfg: ClassifyConfig, args: argparse.Namespace, total: float, out: Path, data_name: str
) -> str:
    sizes = f"{cfg.size}" + (f" / {cfg.small_size}" if cfg.small_size != cfg.size else "")
    lines = [
        f"Top-1 / top-5 error (%) on the test split of {data_name}, mean ± std over seeds {args.seeds}; "
        f"{cfg.model} width {cfg.width}, fc {cfg.fc_dim}, sizes {sizes}, {cfg.epochs} epochs.",
        "",
        "| model | 1 crop top-1 | full image top-1 | 10-view top-1 | 10-view top-5 | train s / run |",
        "|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        runs = list(results.get(name, {}).values())
        secs = mean_std([r["train_seconds"] for r in runs]).split(" ±")[0]
        lines.append(
            f"| {name} | {_cell(runs, 'center', 'top1_err')} | {_cell(runs, 'full', 'top1_err')} | "
            f"{_cell(runs, 'ten', 'top1_err')} | {_cell(runs, 'ten', 'top5_err')} | {secs} |"
        )
    lines += [
        "",
        "Training: epochs run (the plateau rule stops a run), top-1 error on the training crops in the "
        "last epoch (at each of the two sizes for multi-size runs), best validation top-1 error (centre crop):",
        "",
        "| model | epochs | train top-1 err, last epoch | best val top-1 err |",
        "|---|---|---|---|",
    ]
    for name in VARIANTS:
        runs = list(results.get(name, {}).values())
        sizes_seen = sorted({k for r in runs for k in r.get("train_err_by_size", {})}, key=int)
        if VARIANTS[name]["schedule"] == "multi" and len(sizes_seen) > 1:  # the same two sizes in every seed
            train = ", ".join(
                f"{k}: " + mean_std([r["train_err_by_size"][k] for r in runs if k in r.get("train_err_by_size", {})])
                for k in sizes_seen
            )
        else:
            train = mean_std([r["train_err"] for r in runs if "train_err" in r])
        epochs = mean_std([r["epochs"] for r in runs if "epochs" in r]).split(" ±")[0]
        best = mean_std([r["best_val_err"] for r in runs if "best_val_err" in r])
        lines.append(f"| {name} | {epochs} | {train} | {best} |")
    lines += [
        "",
        f"Total {total / 60:.1f} min on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}. Command: `python experiments/classification_table.py "
        f"{' '.join(sys.argv[1:])}`",
    ]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "table.md", text)
    return text


def plot(results: dict, out: Path, data_name: str) -> Path:
    names = list(VARIANTS)
    means: dict[str, list[float | None]] = {}
    stds: dict[str, list[float | None]] = {}
    for views in VIEWS:
        vals = [[r[views]["top1_err"] for r in results.get(name, {}).values() if views in r] for name in names]
        means[VIEW_TITLES[views]] = [statistics.mean(v) if v else None for v in vals]
        stds[VIEW_TITLES[views]] = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
    return plot_grouped_bars(
        names,
        means,
        out / "table.png",
        "top-1 error (%)",
        f"SPP-net Tables 2-3 on {data_name} (mean ± std over seeds)",
        errors=stds,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        data = Path(args.data)
    elif args.quick:
        data = make_classification_dataset(
            out / "data", seed=0, train_per_class=6, val_per_class=2, test_per_class=4, min_size=48, max_size=128
        )
    else:
        data = builtin_data_root()
    data_name = f"data {data}" if args.data else "the built-in shapes data"
    base = base_config(args, data)
    folder = ImageFolderDataset(data, "test")
    test = [folder[i] for i in range(len(folder))]  # decoded once, tested 3 x 12 times
    results_path = out / "results.json"
    results: dict = load_json(results_path) if results_path.exists() else {}
    for name, variant in VARIANTS.items():
        for seed in args.seeds:
            key = f"seed{seed}"
            if key in results.get(name, {}):
                continue
            cfg = base.with_overrides(variant, seed=seed).resolved()
            run = out / "runs" / name.lower().replace(" ", "-") / key
            result = run_one(cfg, run, test)
            results.setdefault(name, {})[key] = result
            save_json(results_path, results)
            errs = ", ".join(f"{v} {result[v]['top1_err']:.1f}" for v in VIEWS if v in result)
            print(
                f"[{(time.perf_counter() - start) / 60:5.1f} min] {name} seed {seed}: top-1 err {errs} "
                f"(trained in {result['train_seconds']:.0f}s)",
                flush=True,
            )
    total = time.perf_counter() - start
    print(write_table(results, base, args, total, out, data_name))
    print(f"wrote {out / 'table.md'} and {plot(results, out, data_name)}; total time {total / 60:.1f} min")
    print(json.dumps({"total_seconds": round(total, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
