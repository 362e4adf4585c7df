"""SPP-net vs R-CNN test time per image, same backbone, same windows (Table 9's speed rows).

ZF-5 at the paper's full width (96-256-384-384-256 conv, fc 4096), untrained
weights (timing does not depend on them). Each image gets ~2,000 selective-search
windows (fast mode; topped up with sliding windows where selective search gives
fewer). For each method one run measures, per image:

* conv   -- SPP: conv1-5 once per scale; R-CNN: warp every window to 224x224 and
            run conv1-5 on each warp;
* pool   -- SPP: scale assignment, window mapping and the window pyramid;
            R-CNN: the pyramid of each warped window's 13x13 conv5;
* fc     -- fc6, fc7, SVM scores and box regression of every window;
* total  -- the three above plus per-class NMS (proposals excluded, as in the paper).

R-CNN's conv time is measured on ``--rcnn-windows`` windows of each image and
scaled linearly to the image's full window count (each window is an independent
224x224 forward pass, so its cost is linear in the count; the scaling is printed).

Usage:
    python benchmarks/bench_detection.py                 # 3 images, ~2 min on 2 cores
    python benchmarks/bench_detection.py --images 5 --rcnn-windows 2000
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from sppnet.data.images import load_image, pil_to_tensor
from sppnet.data.proposals import selective_search, sliding_window_proposals
from sppnet.data.synthetic import make_detection_dataset
from sppnet.models import get_model
from sppnet.models.detector import PAPER_SCALES, PAPER_SINGLE_SCALE, SPPDetector
from sppnet.ops import select_detections


def _windows(image_rgb, count: int) -> torch.Tensor:
    """~``count`` selective-search windows, topped up with sliding windows."""
    boxes = torch.as_tensor(selective_search(image_rgb, mode="fast", max_proposals=count))
    if len(boxes) < count:
        w, h = image_rgb.size
        extra = torch.as_tensor(sliding_window_proposals(w, h, scales=(48, 96, 160, 256, 384), stride_frac=0.25))
        extra = extra[torch.randperm(len(extra), generator=torch.Generator().manual_seed(0))]
        boxes = torch.cat([boxes, extra[: count - len(boxes)]])
    return boxes[:count].float()


def _detector(method: str, scales, num_classes: int, svd: tuple[int, int] | None) -> SPPDetector:
    backbone = get_model("zf5", spp=True, num_classes=1000, width=1.0, fc_dim=4096).eval()
    det = SPPDetector(backbone, num_classes, scales=scales, method=method).eval()
    det.trained_heads[:] = True  # time the SVMs and the box regressors too
    if svd is not None:
        det.compress_fc(svd)
    return det


@torch.no_grad()
def time_image(det: SPPDetector, image: torch.Tensor, boxes: torch.Tensor, rcnn_windows: int) -> dict[str, float]:
    t = {"conv": 0.0, "pool": 0.0, "fc": 0.0, "nms": 0.0}
    img = det.normalize(image)
    height, width = image.shape[-2:]
    if det.method == "spp":
        t0 = time.perf_counter()
        maps, scales = det.feature_maps(img)
        t1 = time.perf_counter()
        rois = det.map_windows(boxes, scales, [m.shape[-2:] for m in maps], det.assign_scales(boxes, scales))
        pool5 = torch.cat(
            [det.pool_windows(maps, rois[s : s + det.chunk_size]) for s in range(0, len(boxes), det.chunk_size)]
        )
        t2 = time.perf_counter()
        t["conv"], t["pool"] = t1 - t0, t2 - t1
    else:
        sub = boxes[:rcnn_windows]
        parts, conv, pool = [], 0.0, 0.0
        for s in range(0, len(sub), det.warp_chunk):
            t0 = time.perf_counter()
            from sppnet.models.detector import warp_windows

            maps = det.backbone.forward_features(warp_windows(img, sub[s : s + det.warp_chunk], det.warp_size))
            t1 = time.perf_counter()
            parts.append(det.backbone.pool(maps))
            t2 = time.perf_counter()
            conv, pool = conv + t1 - t0, pool + t2 - t1
        scale = len(boxes) / len(sub)  # linear in the window count (independent forward passes)
        t["conv"], t["pool"] = conv * scale, pool * scale
        pool5 = torch.cat(parts)
        pool5 = pool5[torch.arange(len(boxes)) % len(pool5)]  # same shape as SPP's for the fc timing
    t0 = time.perf_counter()
    scores, per_class = [], []
    for s in range(0, len(boxes), det.chunk_size):
        p = pool5[s : s + det.chunk_size]
        scores.append(det.class_scores(det.fc7(p), "svm"))
        per_class.append(det.regress_boxes(boxes[s : s + det.chunk_size], p, (height, width)))
    t1 = time.perf_counter()
    select_detections(torch.cat(per_class), torch.cat(scores), float("-inf"), 0.3, 100)
    t2 = time.perf_counter()
    t["fc"], t["nms"] = t1 - t0, t2 - t1
    t["total"] = t["conv"] + t["pool"] + t["fc"] + t["nms"]
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--windows", type=int, default=2000)
    ap.add_argument("--rcnn-windows", type=int, default=256, help="R-CNN windows timed per image (scaled to --windows)")
    ap.add_argument("--image-side", type=int, default=500, help="short side of the test images (VOC-like)")
    ap.add_argument("--svd", type=int, nargs=2, default=(1024, 256), metavar=("R6", "R7"))
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="sppnet-bench-"))
    data = make_detection_dataset(root / "voc", seed=3, num_train=1, num_val=1, num_test=args.images)
    ids = (data / "ImageSets/Main/test.txt").read_text().split()[: args.images]
    images, windows = [], []
    for i in ids:
        pil = load_image(data / "JPEGImages" / f"{i}.jpg")
        f = args.image_side / min(pil.size)
        pil = pil.resize((round(pil.size[0] * f), round(pil.size[1] * f)))
        images.append(pil_to_tensor(pil))
        windows.append(_windows(pil, args.windows))

    variants = {
        "SPP 1-scale": ("spp", PAPER_SINGLE_SCALE, None),
        "SPP 5-scale": ("spp", PAPER_SCALES, None),
        "R-CNN": ("rcnn", PAPER_SINGLE_SCALE, None),
        "SPP 1-scale, SVD fc": ("spp", PAPER_SINGLE_SCALE, tuple(args.svd)),
        "R-CNN, SVD fc": ("rcnn", PAPER_SINGLE_SCALE, tuple(args.svd)),
    }
    results = {}
    for name, (method, scales, svd) in variants.items():
        det = _detector(method, scales, 20, svd)
        time_image(det, images[0], windows[0][:64], 64)  # warm-up (numba compile, allocator)
        rows = [time_image(det, im, bx, args.rcnn_windows) for im, bx in zip(images, windows)]
        results[name] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        print(f"{name:22s} " + "  ".join(f"{k} {v:8.3f}s" for k, v in results[name].items()), flush=True)

    print()
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"{len(images)} images, short side {args.image_side}px, {args.windows} windows each; "
        f"R-CNN conv timed on {args.rcnn_windows} windows per image and scaled x{args.windows / args.rcnn_windows:.2f}"
    )
    header = f"| {'method':22s} | conv s | pool s | fc s | total s | conv speed-up vs R-CNN | total speed-up vs R-CNN |"
    print(header)
    print("|" + "---|" * 7)
    for name, r in results.items():
        ref = results["R-CNN, SVD fc" if "SVD" in name else "R-CNN"]
        print(
            f"| {name:22s} | {r['conv']:.3f} | {r['pool']:.3f} | {r['fc']:.3f} | {r['total']:.3f} | "
            f"{ref['conv'] / r['conv']:.0f}x | {ref['total'] / r['total']:.1f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
