"""The detection recipe beyond the paper (issue 14): the image scale from the objects' sizes and
R-CNN-style pretraining crops, each against a brute-force computation on hand-made records."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sppnet.data import make_detection_dataset
from sppnet.engine.common import UserError
from sppnet.engine.detect import DetectConfig, train
from sppnet.engine.detect.backbone import BACKGROUND, select_windows, window_crops
from sppnet.engine.detect.data import AUTO_SCALE_RANGE, auto_scales, resolve_auto_scale, scale_from_objects
from sppnet.engine.detect.features import build_windows
from sppnet.utils import load_json, save_json

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def record(width: int, height: int, boxes, labels=None, difficult=None, path: str = "img.jpg") -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    g = len(boxes)
    return {
        "image_path": path,
        "width": width,
        "height": height,
        "boxes": boxes,
        "labels": torch.tensor(labels if labels is not None else [0] * g, dtype=torch.long),
        "difficult": torch.tensor(difficult if difficult is not None else [False] * g, dtype=torch.bool),
    }


# ------------------------------------------------------------ scale from the objects' sizes


def brute_scale(records, target: float, lo: int, hi: int) -> int | None:
    """A loop over the objects, the median by sorting, clamp, round half up to 16 in exact fractions."""
    sides = []
    for r in records:
        short = min(r["width"], r["height"])
        for x1, y1, x2, y2 in r["boxes"].tolist():
            sides.append(short * target / math.sqrt((x2 - x1 + 1) * (y2 - y1 + 1)))
    if not sides:
        return None
    sides.sort()
    n = len(sides)
    median = sides[n // 2] if n % 2 else (sides[n // 2 - 1] + sides[n // 2]) / 2
    median = min(max(median, lo), hi)
    q, rest = divmod(median, 16)
    return int(16 * (q + (1 if rest >= 8 else 0)))


@pytest.mark.parametrize(
    "records",
    [
        # three objects (odd count); widths inclusive: 50 x 50, 30 x 20, 80 x 60
        [record(200, 100, [[0, 0, 49, 49], [10, 10, 39, 29]]), record(300, 400, [[5, 5, 84, 64]])],
        # four objects (even count: the mean of the middle two), H != W, both orientations
        [record(150, 90, [[0, 0, 9, 19], [0, 0, 40, 40]]), record(90, 150, [[3, 3, 60, 22], [1, 2, 30, 70]])],
        [record(400, 300, [[0, 0, 299, 299]])],  # one large object: clamped to the lower bound
        [record(300, 300, [[0, 0, 3, 3], [5, 5, 8, 9]])],  # tiny objects: clamped to the upper bound
        [record(100, 100, [[0, 0, 9, 9], [0, 0, 9, 9], [0, 0, 9, 9]], difficult=[True, False, True])],
    ],
)
@pytest.mark.parametrize("target", [112.0, 56.0, 224.0])
def test_scale_from_objects_is_the_clamped_median_rounded_to_16(records, target):
    lo, hi = AUTO_SCALE_RANGE
    got = scale_from_objects(records, target, lo, hi)
    assert got == brute_scale(records, target, lo, hi)
    assert got % 16 == 0 and lo <= got <= hi


def test_scale_from_objects_by_hand_rounds_halves_up_and_needs_objects():
    # 100 px short side, a 50 x 50 object, target 112: 100 * 112 / 50 = 224
    assert scale_from_objects([record(200, 100, [[0, 0, 49, 49]])], 112.0, 16, 2000) == 224
    # short side 120, 10 x 10 object, target 2: 24 = 16 * 1.5 rounds up to 32; 23 rounds down to 16
    assert scale_from_objects([record(120, 300, [[0, 0, 9, 9]])], 2.0, 1, 2000) == 32
    assert scale_from_objects([record(115, 300, [[0, 0, 9, 9]])], 2.0, 1, 2000) == 16
    assert scale_from_objects([record(100, 100, [])], 112.0) is None
    assert scale_from_objects([], 112.0) is None


def test_auto_scales_multiply_round_to_16_and_drop_repeats():
    assert auto_scales(336, (1.0, 2.0)) == (336, 672)
    assert auto_scales(336, (2.0, 1.0, 1.0)) == (336, 672)  # ascending, one of each
    # 336 * 2/3 = 224 exactly; 336 * 1.5 = 504 = 16 * 31.5 rounds half up to 512
    assert auto_scales(336, (2 / 3, 1.0, 1.5)) == (224, 336, 512)
    assert auto_scales(224, (0.01,)) == (16,)  # never below one 16 px step
    for base in range(16, 700, 16):
        for f in (0.5, 0.7, 1.0, 1.3, 2.0, 2.5):
            (got,) = auto_scales(base, (f,))
            want = 16 * math.floor(base * f / 16 + 0.5)
            assert got == max(16, want) and got % 16 == 0


@pytest.mark.parametrize("factors", [(1.0, 2.0), (1.0,), (2 / 3, 1.0, 1.5)])
@pytest.mark.parametrize("size_factor", [0.5, 0.25, 1.0])
def test_resolve_auto_scale_sets_its_scales_in_the_papers_pixels(size_factor, factors):
    records = [record(200, 100, [[0, 0, 49, 49], [10, 10, 39, 29]]), record(300, 400, [[5, 5, 84, 64]])]
    cfg = DetectConfig.from_preset("small", {"features": {"size_factor": size_factor, "auto_scale_factors": factors}})
    assert cfg.features.auto_scale
    s = brute_scale(records, 224 * size_factor, *AUTO_SCALE_RANGE)
    sides = tuple(sorted({16 * math.floor(s * f / 16 + 0.5) for f in factors}))
    resolved = resolve_auto_scale(cfg, records)
    assert resolved.features.scales == tuple(round(x / size_factor) for x in sides)
    assert resolved.image_scales == sides and s in sides
    assert resolved.features.auto_scale  # the saved config says how its scales were chosen
    off = DetectConfig.from_preset("small", {"features": {"size_factor": size_factor, "auto_scale": False}})
    assert resolve_auto_scale(off, records) == off
    assert resolve_auto_scale(cfg, [record(100, 100, [])]) == cfg


def test_auto_scale_is_the_small_default_off_in_paper_and_off_with_explicit_scales():
    small, paper = DetectConfig.from_preset("small"), DetectConfig.from_preset("paper")
    assert small.features.auto_scale and not paper.features.auto_scale and paper.image_scales == (688,)
    assert not DetectConfig.from_preset("paper", {"backbone": {"model": "alexnet"}}).features.auto_scale
    five = DetectConfig.from_preset("small", {"features": {"scales": (480, 576, 688, 864, 1200)}})
    assert not five.features.auto_scale and five.image_scales == (240, 288, 344, 432, 600)
    assert not DetectConfig.from_preset("small", {"features.scales": (480,)}).features.auto_scale
    assert DetectConfig.from_preset("small", {"features": {"scales": (480,), "auto_scale": True}}).features.auto_scale
    assert small.features.auto_scale_factors == (1.0, 2.0)
    # a resolved run's own scales (as many as the factors) load; any other count is an error
    DetectConfig.from_preset("small", {"features": {"scales": (688, 1376), "auto_scale": True}})
    msg = r"--auto-scale chooses 2 scale\(s\) \(--auto-scale-factors 1 2\), --scales gives 3 \[480, 576, 688\]"
    with pytest.raises(UserError, match=msg):
        DetectConfig.from_preset("small", {"features": {"scales": (480, 576, 688), "auto_scale": True}})
    with pytest.raises(UserError, match="--auto-scale chooses 1 scale"):
        DetectConfig.from_preset(
            "small", {"features": {"scales": (480, 688), "auto_scale": True, "auto_scale_factors": (1.0,)}}
        )


def test_a_config_saved_before_the_recipe_loads_with_the_old_behaviour():
    new = DetectConfig.from_preset("small")
    assert new.backbone.crops == "proposals" and new.features.auto_scale
    assert (new.finetune.iterations, new.finetune.lr, new.finetune.lr_steps) == (3000, 0.02, (2400,))
    assert DetectConfig.from_dict(new.to_dict()) == new
    old = new.to_dict()
    del old["features"]["auto_scale"]
    for key in ("crops", "per_object", "bg_ratio"):
        del old["backbone"][key]
    loaded = DetectConfig.from_dict(old)
    assert not loaded.features.auto_scale and loaded.backbone.crops == "gt"
    assert loaded.image_scales == new.image_scales == (344,)
    del old["features"]["auto_scale_factors"]  # saved before the factors: an auto scale was one scale
    assert DetectConfig.from_dict(old).features.auto_scale_factors == (1.0,)


def test_the_fine_tuning_lr_follows_the_mode_unless_given():
    fc, all_ = (DetectConfig.from_preset("small", {"finetune": {"mode": m}}) for m in ("fc", "all"))
    assert (fc.finetune.lr, all_.finetune.lr) == (0.02, 0.003)
    given = DetectConfig.from_preset("small", {"finetune": {"mode": "all", "lr": 0.05}})
    assert given.finetune.lr == 0.05
    assert DetectConfig.from_preset("paper").finetune.lr == 1e-4
    # ImageNet fc layers keep the earlier rate unless one is given
    imagenet = {"model": "alexnet", "weights": "IMAGENET1K_V1", "width": 1.0}
    assert DetectConfig.from_preset("small", {"backbone": imagenet}).finetune.lr == 0.003
    assert DetectConfig.from_preset("small", {"backbone": imagenet, "finetune": {"lr": 0.02}}).finetune.lr == 0.02
    # a saved config keeps the rate it trained with, whatever today's default
    saved = fc.to_dict()
    assert saved["finetune"]["lr"] == 0.02 and DetectConfig.from_dict(saved) == fc


def test_the_demo_chooses_its_scales_from_the_objects():
    from sppnet.engine.demo import DemoConfig

    full = DetectConfig.from_preset("small", DemoConfig().sizes()["det"])
    assert full.features.auto_scale and full.features.auto_scale_factors == (1.0, 2.0)
    quick = DetectConfig.from_preset("small", DemoConfig(quick=True).sizes()["det"])  # the tests' few images
    assert not quick.features.auto_scale and quick.image_scales == (344,)


# ------------------------------------------------------------ R-CNN-style pretraining crops


def brute_iou(a, b) -> float:
    """Inclusive-pixel IoU by counting the pixels of the intersection's extent."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(iw, 0) * max(ih, 0)
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


# two objects of classes 2 and 0 and a difficult one of class 1; proposals near each of them and
# in the background. Shifts of whole pixels keep every IoU away from the 0.3 / 0.5 bounds' ties.
GT = [[10, 10, 49, 49], [100, 20, 139, 79], [60, 100, 89, 129]]
PROPOSALS = (
    [[10 + d, 10 + d, 49 + d, 49 + d] for d in range(1, 8)]  # object 0: 7 near
    + [[100 + d, 20, 139 + d, 79] for d in (2, 4)]  # object 1: 2 near
    + [[60 + d, 100, 89 + d, 129] for d in (1, 2, 3)]  # the difficult object: never foreground
    + [[10, 10, 90, 90], [0, 0, 25, 25], [30, 30, 70, 70]]  # partial overlaps (0.3 <= IoU < 0.5 or so)
    + [[150 + 5 * j, 100 + 3 * j, 180 + 5 * j, 140 + 3 * j] for j in range(6)]  # background
    + [[0, 140, 40, 159], [170, 0, 199, 15]]
)


def hand_windows():
    rec = record(200, 160, GT, labels=[2, 0, 1], difficult=[False, False, True])
    return rec, build_windows(np.asarray(PROPOSALS, dtype=np.float32), rec, 3)


def expected_pools(w):
    """Per non-difficult object its candidate proposal rows; the background rows (brute force)."""
    boxes = w.boxes.tolist()
    g = len(GT)
    near, background = {k: set() for k in range(g) if not w.difficult[k]}, set()
    for r in range(g, len(boxes)):
        ious = [brute_iou(boxes[r], gt) for gt in GT]
        best = max(range(g), key=lambda k: ious[k])
        if ious[best] >= 0.5 and best in near:
            near[best].add(r)
        if max(ious) < 0.3:
            background.add(r)
    return near, background


@pytest.mark.parametrize("per_object, bg_ratio", [(4, 1.0), (0, 1.0), (1, 0.5), (10, 0.0), (4, 3.0)])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_select_windows_against_brute_force(per_object, bg_ratio, seed):
    rec, w = hand_windows()
    near, background = expected_pools(w)
    assert len(near[0]) == 7 and len(near[1]) == 2 and len(background) >= 6  # the hand-made layout holds
    rows, labels = select_windows(w, per_object, bg_ratio, np.random.default_rng(seed))
    assert len(rows) == len(labels) == len(set(rows))  # no row twice
    fg = [(r, c) for r, c in zip(rows, labels) if c >= 0]
    bg = [r for r, c in zip(rows, labels) if c < 0]
    # each non-difficult object: its own box first, then min(P, candidates) of its proposals, its class
    want_fg = 0
    for k, candidates in near.items():
        mine = [r for r, _ in fg if r == k or r in candidates]
        assert mine[0] == k and len(mine) == 1 + min(per_object, len(candidates))
        assert all(c == rec["labels"][k] for r, c in fg if r == k or r in candidates)
        assert all(brute_iou(w.boxes[r].tolist(), GT[k]) >= 0.5 for r in mine)
        want_fg += len(mine)
    assert len(fg) == want_fg and 2 not in rows  # the difficult object and its proposals are left out
    assert len(bg) == min(len(background), round(bg_ratio * want_fg)) and set(bg) <= background
    assert all(max(brute_iou(w.boxes[r].tolist(), gt) for gt in GT) < 0.3 for r in bg)
    assert (rows, labels) == select_windows(w, per_object, bg_ratio, np.random.default_rng(seed))


def test_select_windows_draws_differ_between_seeds():
    _, w = hand_windows()
    draws = {tuple(select_windows(w, 3, 1.0, np.random.default_rng(s))[0]) for s in range(8)}
    assert len(draws) > 1


def test_window_crops_from_proposals_label_the_background_k_and_are_seeded(tmp_path):
    rec, w = hand_windows()
    other = record(200, 160, [[20, 30, 79, 99]], labels=[1], path="other.jpg")
    w2 = build_windows(np.asarray([[22, 30, 80, 99], [150, 0, 199, 20], [120, 100, 180, 150]], np.float32), other, 3)
    classes = ["a", "b", "c"]
    crops = window_crops([rec, other], [w, w2], classes, 32, seed=5, crops="proposals", per_object=4, bg_ratio=1.0)
    assert crops.classes == [*classes, BACKGROUND]
    for i, (r, ws) in enumerate(((rec, w), (other, w2))):
        rows, labels = select_windows(ws, 4, 1.0, np.random.default_rng([5, 0xC0, i]))
        mine = [(box, label) for path, box, label in crops.items if path == r["image_path"]]
        assert mine == [(tuple(ws.boxes[j].tolist()), 3 if c < 0 else c) for j, c in zip(rows, labels)]
    again = window_crops([rec, other], [w, w2], classes, 32, seed=5, crops="proposals")
    assert again.items == crops.items
    gt = window_crops([rec, other], [w, w2], classes, 32, background_per_image=2, seed=5, crops="gt")
    assert [label for _, _, label in gt.items] == [2, 0, 3, 3, 1, 3, 3]  # objects (not difficult), then 2 bg each
    with pytest.raises(ValueError, match="crops must be one of"):
        window_crops([rec], [w], classes, 32, crops="all")


def test_window_crops_decode_each_image_once_within_their_budget(tmp_path, monkeypatch):
    import pickle

    from PIL import Image

    from sppnet.engine.detect import backbone as bb

    paths = []
    for k in range(3):  # 40 x 30 RGB: 3,600 bytes decoded
        paths.append(str(tmp_path / f"{k}.png"))
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(paths[-1])
    items = [(p, (2.0 + j, 3.0, 20.0 + j, 25.0), j % 2) for p in paths for j in range(4)]
    decoded = []
    real = bb.load_image
    monkeypatch.setattr(bb, "load_image", lambda p: decoded.append(p) or real(p))

    cached = bb.WindowCrops(items, 16, ["a", BACKGROUND])
    plain = bb.WindowCrops(items, 16, ["a", BACKGROUND], max_image_bytes=0)
    for i in [0, 5, 1, 9, 2, 6, 11, 3, 0]:
        a, b = cached[i], plain[i]
        assert a[1] == b[1] == items[i][2] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
        assert a[0].size == (16, 16)
    assert sorted(set(decoded)) == paths and len(decoded) == 3 + 9  # cached: once per image; plain: every access
    decoded.clear()
    tight = bb.WindowCrops(items, 16, ["a", BACKGROUND], max_image_bytes=2 * 3600)  # room for two images
    for i in [0, 4, 8, 0]:  # images 0, 1, 2 (0 evicted), then 0 again
        tight[i]
    assert decoded == [paths[0], paths[1], paths[2], paths[0]] and tight._bytes <= 2 * 3600
    worker_copy = pickle.loads(pickle.dumps(cached))  # a loader worker starts empty
    assert worker_copy._bytes == 0 and not worker_copy._images and worker_copy.items == items


# ------------------------------------------------------------ in a run: chosen once, saved, resumed


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_detection_dataset(
        tmp_path_factory.mktemp("data") / "voc",
        seed=3,
        num_train=6,
        num_val=0,
        num_test=2,
        min_short_side=96,
        max_short_side=144,
        max_objects=3,
    )


def test_a_run_chooses_its_scale_once_and_saves_it(tiny_root, tmp_path):
    from sppnet.data import VOCDetection

    over = {"backbone": {"width": 0.125, "fc_dim": 32}, "features": {"size_factor": 0.25}, "workers": 0}
    cfg = DetectConfig.from_preset("small", over, data=str(tiny_root), **{"proposals.max_proposals": 40})
    out = tmp_path / "run"
    train(cfg, out=out, verbose=False, stop_after="proposals")
    saved = DetectConfig.from_dict(load_json(out / "config.json"))
    s = brute_scale(VOCDetection(tiny_root, "train").records, 56.0, *AUTO_SCALE_RANGE)
    assert saved.features.auto_scale and saved.image_scales == (s, 2 * s) and saved.features.scales == (4 * s, 8 * s)
    assert saved == resolve_auto_scale(cfg, VOCDetection(tiny_root, "train").records)
    # resumed with the config it started from: the saved scales are kept, not chosen again
    marked = saved.with_overrides({"features.scales": (4 * s + 64, 8 * s + 64)})
    save_json(out / "config.json", marked.to_dict())
    train(cfg, out=out, resume=True, verbose=False, stop_after="proposals")
    assert DetectConfig.from_dict(load_json(out / "config.json")) == marked
    with pytest.raises(UserError, match="features.auto_scale"):
        train(cfg.with_overrides({"features.auto_scale": False}), out=out, resume=True, stop_after="proposals")
