"""``--compile`` (issue 17): eager vs ``torch.compile``'d conv layers, side by side in one run.

Three cases, each timed eagerly and then with the conv layers compiled
(:func:`sppnet.engine.compile.compile_conv_layers`, ``dynamic=True``; the
pyramid and the fc layers stay eager, as in ``--compile`` runs):

* ``classifier forward``: the ``small`` classifier (``ClassifyConfig()``:
  Overfeat-5 at width 1/8, batch norm, fc 256) in eval mode without
  gradients, a batch of ``--batch`` crops (validation);
* ``classifier train``: the same network in train mode, forward, cross-entropy
  and backward (a training step without the optimiser);
* ``detector conv5 lrn`` / ``bn``: ``SPPDetector.feature_maps`` of one image
  (the ``small`` detection preset: ZF-5 at width 1/4, short side 344), what
  feature caching and testing run per image and scale, on images of three
  aspect ratios; ZF-5 with the paper's LRN (the ``paper`` pretraining recipe,
  and ``build_detector``'s own backbone) and with batch norm (the ``modern``
  pretraining recipe).

For every input size: the eager time per call, the compiled model's first
call (the compilation, a recompilation, or nothing when an earlier graph
fits), its time per call after that, eager / compiled, the number of graphs
Dynamo has built so far for the case, and the largest difference of the
outputs. Times are medians over ``--repeats`` calls after one warm-up call.

The Inductor cache is a fresh temporary folder unless ``--warm-cache`` (then
``$TORCHINDUCTOR_CACHE_DIR`` or torch's default, so a second run measures
cache hits): compile times are what a first ``--compile`` run pays.

Usage::

    python benchmarks/bench_compile.py                     # ~4 min on 2 cores, mostly compiling
    python benchmarks/bench_compile.py --skip detector --train-sizes 112 90
    python benchmarks/bench_compile.py --mode max-autotune --repeats 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from sppnet.engine.classify import ClassifyConfig
from sppnet.engine.classify.training import build_model
from sppnet.engine.compile import COMPILE_CHOICES, CompiledModule, compile_conv_layers
from sppnet.engine.detect.config import DetectConfig
from sppnet.engine.detect.model import build_detector
from sppnet.models import get_model


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _median_ms(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _run_case(name: str, model: torch.nn.Module, calls: list[tuple[str, Callable[[], torch.Tensor]]], args) -> list:
    """Eager then compiled, per input: ``calls`` are ``(label, fn)``; ``fn`` runs ``model`` once."""
    torch._dynamo.reset()
    rows = []
    eager = {}
    for label, fn in calls:
        torch.manual_seed(0)
        out = fn()
        eager[label] = (out.detach().clone(), _median_ms(fn, args.repeats))
    compile_conv_layers(model, args.mode)
    runner = model.__dict__["conv_runner"]
    base = _graphs()
    for label, fn in calls:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        out = fn()
        first = time.perf_counter() - t0
        ms = _median_ms(fn, args.repeats)
        want, eager_ms = eager[label]
        row = {
            "case": name,
            "input": label,
            "eager_ms": round(eager_ms, 2),
            "first_call_s": round(first, 2),
            "compiled_ms": round(ms, 2),
            "ratio": round(eager_ms / ms, 3),
            "graphs": _graphs() - base,
            "max_abs_diff": float((out.detach() - want).abs().max()),
            "compiled": isinstance(runner, CompiledModule) and runner.active,
        }
        rows.append(row)
        print(
            f"{name:<20} {label:<14} {row['eager_ms']:>9.2f} {row['first_call_s']:>12.2f} {row['compiled_ms']:>11.2f} "
            f"{row['ratio']:>8.2f} {row['graphs']:>7} {row['max_abs_diff']:>10.2e}"
            + ("" if row["compiled"] else f"  (eager fallback: {runner.error})"),
            flush=True,
        )
    compile_conv_layers(model, "none")
    return rows


def _classifier_cases(args) -> list:
    torch.manual_seed(0)
    model = build_model(ClassifyConfig(device="cpu"), num_classes=8)
    rows = []

    def forward(x):
        def fn():
            model.eval()
            with torch.no_grad():
                return model(x)

        return fn

    def train_step(x, y):
        def fn():
            model.train()
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return model.fc[0].weight.grad  # fc6's gradient: it depends on every conv layer's output

        return fn

    gen = torch.Generator().manual_seed(1)
    inputs = {s: torch.rand(args.batch, 3, s, s, generator=gen) for s in dict.fromkeys(args.sizes + args.train_sizes)}
    labels = torch.randint(0, 8, (args.batch,), generator=gen)
    calls = [(f"{args.batch}x{s}x{s}", forward(inputs[s])) for s in args.sizes]
    rows += _run_case("classifier forward", model, calls, args)
    calls = [(f"{args.batch}x{s}x{s}", train_step(inputs[s], labels)) for s in args.train_sizes]
    rows += _run_case("classifier train", model, calls, args)
    return rows


def _detector_cases(args) -> list:
    cfg = DetectConfig()
    b, rows = cfg.backbone, []
    for norm in args.detector_norms:
        torch.manual_seed(0)
        backbone = get_model(
            b.model, num_classes=21, spp=True, levels=cfg.features.levels, width=b.width, fc_dim=b.fc_dim, norm=norm
        )
        det = build_detector(cfg, 20, backbone).eval()
        gen = torch.Generator().manual_seed(2)
        calls = []
        for h, w in args.images:
            image = det.normalize(torch.rand(3, h, w, generator=gen))
            scales = det.image_scales(h, w)

            def fn(det=det, image=image, scales=scales):
                with torch.no_grad():
                    return det.feature_maps(image, scales)[0][0]

            calls.append((f"1x{scales[0].height}x{scales[0].width}", fn))
        rows += _run_case(f"detector conv5 {norm}", det.backbone, calls, args)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="default", choices=[m for m in COMPILE_CHOICES if m != "none"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[112, 90], help="classifier crop sides (forward)")
    ap.add_argument(
        "--train-sizes", type=int, nargs="+", default=[112], help="classifier crop sides of the training step"
    )
    ap.add_argument("--batch", type=int, default=16, help="classifier batch")
    ap.add_argument(
        "--images",
        type=lambda s: tuple(int(v) for v in s.split("x")),
        nargs="+",
        default=[(344, 459), (459, 344), (344, 516)],
        help="detector images HxW (resized to the preset's scale)",
    )
    ap.add_argument("--detector-norms", nargs="+", default=["lrn", "bn"], choices=["lrn", "bn", "none"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--warm-cache", action="store_true", help="keep the Inductor cache (default: a fresh one)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["classifier", "detector"])
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tmp = None
    if not args.warm_cache:
        tmp = tempfile.TemporaryDirectory(prefix="bench_compile_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp.name
    print(
        f"{platform.processor() or platform.machine()}; {os.cpu_count()} logical cores, torch threads "
        f"{torch.get_num_threads()}; torch {torch.__version__}, Python {platform.python_version()}; "
        f"mode {args.mode}, {'warm' if args.warm_cache else 'fresh'} Inductor cache"
    )
    print(
        f"{'case':<20} {'input':<14} {'eager ms':>9} {'first call s':>12} {'compiled ms':>11} "
        f"{'eager/c':>8} {'graphs':>7} {'max|diff|':>10}"
    )
    t0 = time.perf_counter()
    rows = []
    if "classifier" not in args.skip:
        rows += _classifier_cases(args)
    if "detector" not in args.skip:
        rows += _detector_cases(args)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"mode": args.mode, "torch": torch.__version__, "rows": rows}, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
