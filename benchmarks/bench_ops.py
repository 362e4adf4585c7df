"""Operator benchmark: our pyramid pooling vs the usual implementations, side by side.

Image level, levels (6, 3, 2, 1), forward and forward+backward:
* ours (numba kernels: channels-last scan for big batches of small maps, per-plane otherwise) and our
  pure-PyTorch fallback
* the usual implementation: ``torch.cat`` of ``F.adaptive_max_pool2d`` per level, flattened
at N=64, C=256, 13x13 (conv5 of 224-px crops) and N=1, C=512, 96x128.

Window level, 2,000 random windows (1 to 30 cells a side) on a [1, 256, 43, 57] map:
* ours (numba kernels) and our pure-PyTorch fallback (sparse table)
* (a) a Python loop of ``F.adaptive_max_pool2d`` over each window's crop
  (what public SPP-net ports do)
* (b) ``torchvision.ops.roi_pool`` once per level, windows as integer boxes,
  ``spatial_scale=1``
plus 20,000 windows on a 1,200-px image's conv5 map ([1, 256, 75, 100]).

Every row checks its output against ours (``identical``: bit-for-bit equal).
Times are medians of ``--repeats`` runs after a warm-up (numba compiles or
loads its cache on the first call); ``torch.set_num_threads`` is left at its
default. Peak memory: each variant runs once more in a fresh subprocess, and
the peak resident set size above the resident size just before the call is
recorded (``/proc/self/statm`` sampled every 0.5 ms, plus ``ru_maxrss``) --
it includes the output and everything numba or PyTorch allocate.

Usage:
    python benchmarks/bench_ops.py              # ~2-4 min on 2 cores
    python benchmarks/bench_ops.py --quick      # fewer repeats, no 20k-window case
    python benchmarks/bench_ops.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time

import numba
import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops import roi_pool

from sppnet.ops import _kernels, roi_spatial_pyramid_pool, spatial_pyramid_pool

LEVELS = (6, 3, 2, 1)  # SPP-net Sec. 2.3 / Table 2


# ------------------------------------------------------------------------ inputs


def image_input(n: int, c: int, h: int, w: int) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))


def random_windows(count: int, height: int, width: int, max_side: int, seed: int = 0) -> torch.Tensor:
    """``LongTensor[K, 5]`` windows ``(0, x1, y1, x2, y2)`` with sides 1..max_side cells."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(1, min(max_side, height) + 1, (count,), generator=g)
    w = torch.randint(1, min(max_side, width) + 1, (count,), generator=g)
    y1 = (torch.rand(count, generator=g) * (height - h + 1)).long()
    x1 = (torch.rand(count, generator=g) * (width - w + 1)).long()
    return torch.stack([torch.zeros(count, dtype=torch.long), x1, y1, x1 + w - 1, y1 + h - 1], dim=1)


# -------------------------------------------------------------------- variants


@contextlib.contextmanager
def fallback(on: bool = True):
    """Our pure-PyTorch paths, as on an install without numba."""
    saved = _kernels.HAVE_NUMBA
    _kernels.HAVE_NUMBA = saved and not on
    try:
        yield
    finally:
        _kernels.HAVE_NUMBA = saved


def usual_pyramid(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.adaptive_max_pool2d(x, n).flatten(1) for n in LEVELS], dim=1)


def ours_image(x):
    return spatial_pyramid_pool(x, LEVELS)


def ours_image_torch(x):
    with fallback():
        return spatial_pyramid_pool(x, LEVELS)


def ours_windows(feats, rois):
    return roi_spatial_pyramid_pool(feats, rois, LEVELS)


def ours_windows_torch(feats, rois):
    with fallback():
        return roi_spatial_pyramid_pool(feats, rois, LEVELS)


def loop_windows(feats, rois):
    """(a) one crop and four adaptive pools per window, in Python."""
    rows = []
    for b, x1, y1, x2, y2 in rois.tolist():
        crop = feats[b : b + 1, :, y1 : y2 + 1, x1 : x2 + 1]
        rows.append(torch.cat([F.adaptive_max_pool2d(crop, n).flatten(1) for n in LEVELS], dim=1))
    return torch.cat(rows, dim=0)


def roi_pool_windows(feats, rois):
    """(b) torchvision's RoI pooling once per level; inclusive integer boxes, scale 1."""
    boxes = rois.to(feats.dtype)
    return torch.cat([roi_pool(feats, boxes, (n, n), spatial_scale=1.0).flatten(1) for n in LEVELS], dim=1)


IMAGE_VARIANTS = {
    "ours": ours_image,
    "ours (PyTorch fallback)": ours_image_torch,
    "usual: adaptive_max_pool2d x4": usual_pyramid,
}
WINDOW_VARIANTS = {
    "ours": ours_windows,
    "ours (PyTorch fallback)": ours_windows_torch,
    "(a) loop of adaptive_max_pool2d": loop_windows,
    "(b) roi_pool x4 levels": roi_pool_windows,
}


# ---------------------------------------------------------------------- timing


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: numba compiles or loads its cache, allocators settle
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward(fn, *args):
    def run():
        with torch.no_grad():
            return fn(*args)

    return run


def forward_backward(fn, x, *rest):
    xg = x.detach().clone().requires_grad_()
    grad = None

    def run():
        nonlocal grad
        xg.grad = None
        out = fn(xg, *rest)
        if grad is None:
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(grad)

    return run


# ---------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_child(case: str, variant: str) -> None:
    """Runs in a fresh process: prints the peak RSS increase of one no-grad call in bytes."""
    feats, rois = WINDOW_CASES[case]()
    fn = WINDOW_VARIANTS[variant]
    with torch.no_grad():
        fn(feats, rois[:50])  # warm-up on a few windows: numba cache, first allocations
    base = _rss_bytes()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, done = base, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    with torch.no_grad():
        out = fn(feats, rois)
    done.set()
    thread.join()
    peak = max(peak, _rss_bytes())
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if maxrss_after > maxrss_before:
        peak = max(peak, maxrss_after)
    print(json.dumps({"peak_bytes": peak - base, "output_bytes": out.numel() * out.element_size()}))


def peak_memory(case: str, variant: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-child", case, variant], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------- cases

IMAGE_CASES = {"N=64, C=256, 13x13": (64, 256, 13, 13), "N=1, C=512, 96x128": (1, 512, 96, 128)}
WINDOW_CASES = {
    "2,000 windows (1-30 cells) on [1, 256, 43, 57]": lambda: (
        image_input(1, 256, 43, 57),
        random_windows(2000, 43, 57, 30),
    ),
    "20,000 windows (1-50 cells) on [1, 256, 75, 100]": lambda: (
        image_input(1, 256, 75, 100),
        random_windows(20000, 75, 100, 50),
    ),
}


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return (
        f"{cpu}; {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
        f"numba threads {numba.config.NUMBA_NUM_THREADS}; torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, numba {numba.__version__}, Python {platform.python_version()}"
    )


def fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.1f}"


def fmt_ratio(base: float | None, ours: float | None) -> str:
    return "-" if base is None or ours is None else f"{base / ours:.1f}x"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant (median reported)")
    parser.add_argument("--slow-repeats", type=int, default=3, help="timed runs for the Python-loop baseline")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 for slow baselines, no 20k case")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(*args.memory_child)
        return 0
    if args.quick:
        args.repeats, args.slow_repeats = 3, 1

    print(f"machine: {machine()}\n")
    results = []

    # ---- image level
    print("## Image level, levels (6, 3, 2, 1), float32 (ms, median; ratio = usual / variant)\n")
    print("| input | variant | forward | fwd+bwd | fwd speed-up | fwd+bwd speed-up | identical |")
    print("|---|---|---:|---:|---:|---:|---|")
    for case, shape in IMAGE_CASES.items():
        x = image_input(*shape)
        with torch.no_grad():
            ref = usual_pyramid(x)
        rows = {}
        for name, fn in IMAGE_VARIANTS.items():
            with torch.no_grad():
                same = torch.equal(fn(x), ref)
            tf = median_time(forward(fn, x), args.repeats)
            tb = median_time(forward_backward(fn, x), args.repeats)
            rows[name] = (tf, tb, same)
        base_f, base_b, _ = rows["usual: adaptive_max_pool2d x4"]
        for name, (tf, tb, same) in rows.items():
            print(
                f"| {case} | {name} | {fmt_ms(tf)} | {fmt_ms(tb)} | {fmt_ratio(base_f, tf)} | "
                f"{fmt_ratio(base_b, tb)} | {same} |"
            )
            results.append(
                {"level": "image", "case": case, "variant": name, "forward_s": tf, "fwd_bwd_s": tb, "identical": same}
            )

    # ---- window level
    print("\n## Window level, levels (6, 3, 2, 1), float32 (ms, median; speed-up = variant / ours)\n")
    print(
        "| windows | variant | forward | fwd+bwd | ours is faster (fwd) | ours is faster (fwd+bwd) "
        "| identical | peak memory (no grad) |"
    )
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for case, make in WINDOW_CASES.items():
        big = case.startswith("20,000")
        if big and args.quick:
            continue
        feats, rois = make()
        with torch.no_grad():
            ref = ours_windows(feats, rois)
        variants = ["ours", "ours (PyTorch fallback)"] if big else list(WINDOW_VARIANTS)
        rows = {}
        for name in variants:
            fn = WINDOW_VARIANTS[name]
            slow = name.startswith("(a)")
            reps = args.slow_repeats if slow or big else args.repeats
            with torch.no_grad():
                out = fn(feats, rois)
            mismatch = int((out != ref).any(dim=1).sum())
            tf = median_time(forward(fn, feats, rois), reps)
            tb = None if big else median_time(forward_backward(fn, feats, rois), reps)
            mem = None if args.no_memory else peak_memory(case, name)
            rows[name] = (tf, tb, mismatch, mem)
            del out
        ours_f, ours_b = rows["ours"][0], rows["ours"][1]
        for name, (tf, tb, mismatch, mem) in rows.items():
            same = "True" if mismatch == 0 else f"False ({mismatch} of {len(rois)} windows differ)"
            mem_s = "-"
            if mem is not None:
                mem_s = f"{mem['peak_bytes'] / 2**20:.0f} MiB (output {mem['output_bytes'] / 2**20:.0f} MiB)"
            print(
                f"| {case} | {name} | {fmt_ms(tf)} | {fmt_ms(tb)} | {fmt_ratio(tf, ours_f)} | "
                f"{fmt_ratio(tb, ours_b)} | {same} | {mem_s} |"
            )
            row = {"level": "window", "case": case, "variant": name, "forward_s": tf, "fwd_bwd_s": tb}
            results.append({**row, "mismatched_windows": mismatch, "peak_memory": mem})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
