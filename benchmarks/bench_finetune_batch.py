"""One fine-tuning batch pooled from the conv5 cache: ours vs the per-request way, side by side.

Fine-tuning (SPP-net Sec. 4.1, ``--finetune fc``) draws each batch of 128
windows from 8 images, each window flipped or not and at a random scale, and
pools them from the cached conv5 maps: with two scales that is up to 32
``(image, flip, scale)`` maps of a few windows each, every iteration. Two ways
of doing it, on the same cache entries and the same sampled windows:

* **per request** (sppnet before 2026-12-07): maps kept ``[C, h, w]``-contiguous,
  each ``(image, flip)`` request's windows mapped onto conv5 scale by scale, then
  pooled; the window kernel copied each map to channels-last on every call;
* **ours** (``FeatureCache.pool5_many``): maps kept channels-last in RAM, every
  window of the batch mapped in one pass, then pooled per map with no copy.

Both give the same rows bit for bit (checked before timing). The shapes follow
the objects-voc set of ``benchmarks/datasets.py`` at the defaults' two auto
scales (short sides 544 and 1088 px: conv5 maps of about 34 x 45 and 68 x 90
cells) with the ``small`` preset's ZF-5 (64 conv5 channels); the maps hold
random numbers (timing does not depend on them).

Usage:
    python benchmarks/bench_finetune_batch.py               # ~20 s
    python benchmarks/bench_finetune_batch.py --batches 200 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from sppnet.engine.detect.config import DetectConfig
from sppnet.engine.detect.features import FeatureCache, WindowSet, build_windows, flip_boxes
from sppnet.engine.detect.finetune import FinetuneConfig, _window_pools
from sppnet.engine.detect.finetune import _sample_rows as sample_rows
from sppnet.engine.detect.model import build_detector
from sppnet.models.detector import image_scales


class RandomCache(FeatureCache):
    """A memory cache whose entries are random conv5 maps of each image's real map sizes."""

    def key(self, i: int) -> str:  # no image file behind an entry
        return str(i)

    def compute(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        out = {}
        for suffix in ("", "_flip"):
            for k, s in enumerate(self.scales(i)):
                h, w = self.detector.backbone.feature_size(s.height, s.width)
                out[f"s{k}{suffix}"] = torch.randn(self.detector.backbone.feature_channels, h, w, generator=g)
        return out


def per_request(cache: FeatureCache, requests) -> torch.Tensor:
    """The previous way: contiguous maps, mapping per request and scale, one pooling call per map."""
    d = cache.detector
    parts = []
    for i, index, flip, scale_index in requests:
        entry = cache.get(i)
        scales = cache.scales(i)
        suffix = "_flip" if flip else ""
        maps = [entry[f"s{k}{suffix}"].contiguous() for k in range(len(scales))]  # [C, h, w]-contiguous
        boxes = cache.windows[i].boxes[index]
        if flip:
            boxes = flip_boxes(boxes, cache.windows[i].width)
        rois = torch.zeros((len(boxes), 5), dtype=torch.long)
        rois[:, 0] = scale_index
        for s, (sc, m) in enumerate(zip(scales, maps)):
            sel = (scale_index == s).nonzero().squeeze(1)
            if len(sel):
                rois[sel, 1:] = d.map_windows(
                    boxes[sel], [sc], [m.shape[-2:]], torch.zeros(len(sel), dtype=torch.long)
                )[:, 1:]
        parts.append(d.pool_windows(maps, rois))
    return torch.cat(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=120, help="training images in the cache")
    ap.add_argument("--batches", type=int, default=100, help="batches timed per way")
    ap.add_argument("--threads", type=int, default=1, help="torch / numba threads")
    ap.add_argument("--scales", type=int, nargs="+", default=[1088, 2176], help="short sides x 2 (size factor 0.5)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = DetectConfig.from_preset("small", {"features": {"scales": tuple(args.scales)}})
    det = build_detector(cfg, 7).eval()
    rng = np.random.default_rng(0)
    records, windows = [], []
    for i in range(args.images):  # images of 200-400 px, objects at 20 % - 70 % of the short side
        h, w = (int(v) for v in rng.integers(200, 401, 2))
        side = int(rng.integers(int(0.2 * min(h, w)), int(0.7 * min(h, w))))
        x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
        rec = {
            "height": h,
            "width": w,
            "boxes": torch.tensor([[x, y, x + side - 1, y + side - 1]], dtype=torch.float32),
            "labels": torch.tensor([i % 7]),
            "difficult": torch.tensor([False]),
        }
        x1, y1 = rng.integers(0, w - 8, 300), rng.integers(0, h - 8, 300)
        bw, bh = rng.integers(8, w, 300), rng.integers(8, h, 300)
        props = np.stack([x1, y1, np.minimum(x1 + bw, w - 1), np.minimum(y1 + bh, h - 1)], 1).astype(np.float32)
        jitter = rng.integers(-side // 8, side // 8 + 1, (40, 4))  # windows around the object: the foreground pool
        near = np.clip(np.array([x, y, x + side - 1, y + side - 1]) + jitter, 0, [w - 1, h - 1, w - 1, h - 1])
        near[:, 2:] = np.maximum(near[:, 2:], near[:, :2])
        records.append(rec)
        windows.append(build_windows(np.concatenate([props, near.astype(np.float32)]), rec, 7))
    assert all(isinstance(w, WindowSet) for w in windows)
    cache = RandomCache(det, records, windows, "/nonexistent", mode="memory")
    cache.ensure()
    ft = FinetuneConfig().resolved()
    fg, bg = _window_pools(windows, ft)
    n_scales = len(image_scales(300, 400, det.scales))

    def batch(seed: int):
        r = np.random.default_rng(seed)
        rows = torch.cat(sample_rows(r, fg, bg, ft))
        flips = torch.from_numpy(r.random(len(rows)) < 0.5)
        scales = torch.from_numpy(r.integers(0, n_scales, len(rows)))
        groups = rows[:, 0] * 2 + flips.long()
        out = []
        for g in torch.unique(groups).tolist():
            sel = (groups == g).nonzero().squeeze(1)
            out.append((g // 2, rows[sel, 1], bool(g % 2), scales[sel]))
        return out

    batches = [batch(s) for s in range(args.batches)]
    with torch.no_grad():
        for reqs in batches[:5]:  # same rows, bit for bit (and the numba kernels compiled)
            assert torch.equal(cache.pool5_many(reqs), per_request(cache, reqs))
        times = {}
        for name, fn in (("per request (before)", per_request), ("ours (pool5_many)", FeatureCache.pool5_many)):
            ms = []
            for reqs in batches:
                t = time.perf_counter()
                fn(cache, reqs)
                ms.append((time.perf_counter() - t) * 1000)
            times[name] = statistics.median(ms)
    maps = statistics.mean(len(b) * n_scales for b in batches)
    print(
        f"# {platform.machine()}, torch {torch.__version__}, threads {args.threads}, {args.images} images, "
        f"scales {args.scales}, {args.batches} batches of {ft.batch_size} windows from {ft.images_per_batch} images "
        f"(up to {maps:.0f} maps a batch)"
    )
    print("| way | ms / batch (median) | speed-up |")
    print("|---|---:|---:|")
    base = times["per request (before)"]
    for name, t in times.items():
        print(f"| {name} | {t:.1f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
