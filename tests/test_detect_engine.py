"""Detection training stages on a tiny built-in data set: windows, feature cache, resume."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch

from sppnet.data import VOCDetection, make_detection_dataset
from sppnet.data.proposals import sliding_window_proposals
from sppnet.engine.common import GracefulInterrupt, UserError, load_weights
from sppnet.engine.config import merge_overrides
from sppnet.engine.detect import (
    DetectConfig,
    TrainingInterrupted,
    build_detector,
    evaluate,
    load_detector,
    pretrain_config,
    train,
)
from sppnet.engine.detect import finetune as det_finetune
from sppnet.engine.detect.features import FeatureCache, build_windows, flip_boxes, load_record_image
from sppnet.models.detector import image_scales, map_windows
from sppnet.ops import spatial_pyramid_pool

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_detection_dataset(
        tmp_path_factory.mktemp("data") / "voc",
        seed=3,
        num_train=8,
        num_val=0,
        num_test=4,
        min_short_side=96,
        max_short_side=144,
        max_objects=3,
    )


TINY = {
    "backbone": {"width": 0.125, "fc_dim": 32, "epochs": 1, "batch_size": 16},
    "features": {"size_factor": 0.25, "auto_scale": False},  # auto scale: tests/test_detect_recipe.py
    "finetune": {"iterations": 24, "lr_steps": (16,), "checkpoint_every": 8},
    "proposals": {"max_proposals": 80},
    "workers": 0,
}


def tiny_cfg(root, overrides=None, **kw) -> DetectConfig:
    return DetectConfig.from_preset("small", merge_overrides(TINY, overrides, kw), data=str(root))


def same_weights(a, b) -> None:
    sa, _ = load_weights(a)
    sb, _ = load_weights(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------- windows


def test_windows_hold_ground_truth_first_and_brute_force_overlaps(tiny_root):
    ds = VOCDetection(tiny_root, "train")
    r = ds.records[0]
    props = sliding_window_proposals(r["width"], r["height"], scales=(24, 48))
    w = build_windows(props, r, len(ds.class_names))
    g = len(r["boxes"])
    torch.testing.assert_close(w.boxes[:g], r["boxes"])
    assert w.is_gt[:g].all() and not w.is_gt[g:].any()
    for n in range(0, len(w), 7):
        a = w.boxes[n].tolist()
        best = {}
        for b, c in zip(r["boxes"].tolist(), r["labels"].tolist()):
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
            inter = iw * ih
            union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
            best[c] = max(best.get(c, 0.0), inter / union)
        for c in range(len(ds.class_names)):
            assert float(w.overlaps[n, c]) == pytest.approx(best.get(c, 0.0), abs=1e-6)
        assert float(w.max_overlap[n]) == pytest.approx(max(best.values()), abs=1e-6)


def test_identical_ground_truth_boxes_of_two_classes_keep_both_labels():
    # argmax over the IoUs returns the first of two identical boxes: both rows would be labelled 0.
    box = [4.0, 6.0, 40.0, 30.0]
    record = {
        "boxes": torch.tensor([box, box, [50.0, 2.0, 70.0, 20.0]]),
        "labels": torch.tensor([0, 1, 0]),
        "difficult": torch.tensor([False, False, False]),
        "width": 80,
        "height": 40,
    }
    w = build_windows([[5.0, 6.0, 41.0, 31.0]], record, 2)
    assert w.label[:3].tolist() == [0, 1, 0] and w.gt_index[:3].tolist() == [0, 1, 2]
    assert w.max_overlap[:3].tolist() == [1.0, 1.0, 1.0] and w.overlaps[:2].tolist() == [[1.0, 1.0]] * 2
    assert int(w.label[3]) == 0 and int(w.gt_index[3]) == 0  # a proposal takes its best object, the first on ties


def test_flip_boxes_is_an_involution():
    b = torch.tensor([[0.0, 1.0, 9.0, 5.0], [3.0, 3.0, 3.0, 3.0]])
    torch.testing.assert_close(flip_boxes(b, 20), torch.tensor([[10.0, 1.0, 19.0, 5.0], [16.0, 3.0, 16.0, 3.0]]))
    torch.testing.assert_close(flip_boxes(flip_boxes(b, 20), 20), b)


# ------------------------------------------------------------- feature cache


def test_feature_cache_matches_direct_features_and_rebuilds_stale_entries(tiny_root, tmp_path):
    ds = VOCDetection(tiny_root, "train")
    records = ds.records[:3]
    windows = [build_windows(sliding_window_proposals(r["width"], r["height"], (20, 40)), r, 8) for r in records]
    cfg = tiny_cfg(tiny_root, {"features": {"scales": (480, 688)}})
    torch.manual_seed(0)
    det = build_detector(cfg, 8).eval()
    cache = FeatureCache(det, records, windows, tmp_path / "feat")
    assert cache.ensure() == 3 and cache.complete()
    # maps are kept channels-last in RAM (the window kernels read that layout without a copy per call)
    assert all(m.permute(1, 2, 0).is_contiguous() for k, m in cache.get(0).items() if k.startswith("s"))
    with torch.no_grad():
        for i, r in enumerate(records):
            idx = torch.arange(0, len(windows[i]), 3)
            image = det.normalize(load_record_image(r))
            direct = det.window_pool5(image, windows[i].boxes[idx])
            torch.testing.assert_close(cache.pool5(i, idx), direct)
            # flipped entry: conv5 of the flipped image, windows mirrored
            flipped = det.window_pool5(image.flip(-1), flip_boxes(windows[i].boxes[idx], r["width"]))
            torch.testing.assert_close(cache.pool5(i, idx, flip=True), flipped)
            # an explicit scale per window (fine-tuning's random scale)
            s = torch.ones(len(idx), dtype=torch.long)
            maps, scales = det.feature_maps(image)
            cells = det.map_windows(windows[i].boxes[idx], scales, [m.shape[-2:] for m in maps], s)
            x1, y1, x2, y2 = cells[0, 1:].tolist()
            ref = spatial_pyramid_pool(maps[1][None, :, y1 : y2 + 1, x1 : x2 + 1], det.levels)[0]
            torch.testing.assert_close(cache.pool5(i, idx, scale_index=s)[0], ref)
        # a fine-tuning batch: windows of several images, flipped or not, each at a
        # random scale, pooled together -- rows equal the windows pooled one by one
        g = torch.Generator().manual_seed(1)
        requests = []
        for i in (2, 0, 1, 0):
            idx = torch.randperm(len(windows[i]), generator=g)[:7]
            requests.append((i, idx, bool(torch.rand(1, generator=g) < 0.5), torch.randint(0, 2, (7,), generator=g)))
        one_by_one = []  # each window mapped by map_windows at its scale and pooled from conv5 of its (flipped) image
        for i, idx, flip, s in requests:
            image = det.normalize(load_record_image(records[i]))
            boxes = windows[i].boxes[idx]
            if flip:
                image, boxes = image.flip(-1), flip_boxes(boxes, records[i]["width"])
            maps, scales = det.feature_maps(image)
            for k in range(len(idx)):
                sc = int(s[k])
                x1, y1, x2, y2 = map_windows(boxes[k : k + 1], scales[sc], maps[sc].shape[-2:], det.stride, det.offset)[
                    0
                ].tolist()
                one_by_one.append(spatial_pyramid_pool(maps[sc][None, :, y1 : y2 + 1, x1 : x2 + 1], det.levels))
        torch.testing.assert_close(cache.pool5_many(requests), torch.cat(one_by_one))
    # a corrupt entry is rebuilt, not trusted
    path = cache.path(0)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    fresh = FeatureCache(det, records, windows, tmp_path / "feat")
    assert fresh.get(0) is not None and fresh.ensure() == 0
    assert fresh.get(1)["s1_flip"].permute(1, 2, 0).is_contiguous()  # loaded from disk: channels-last too
    torch.testing.assert_close(fresh.pool5(0, torch.arange(4)), cache.pool5(0, torch.arange(4)))
    # new conv weights -> new keys
    old = cache.path(1)
    with torch.no_grad():
        det.backbone.features[0].weight.add_(0.01)
    cache.refresh()
    assert cache.path(1) != old and not cache.complete()


def test_rcnn_feature_cache_key_holds_the_warp_context(tiny_root, tmp_path):
    ds = VOCDetection(tiny_root, "train")
    records = ds.records[:1]
    windows = [build_windows(sliding_window_proposals(r["width"], r["height"], (40,)), r, 8) for r in records]
    paths = {}
    for method in ("rcnn", "spp"):
        for context in (0.0, 0.1):
            cfg = tiny_cfg(tiny_root, method=method, **{"features.warp_context": context})
            torch.manual_seed(0)
            det = build_detector(cfg, 8)
            assert det.warp_context == context
            paths[method, context] = FeatureCache(det, records, windows, tmp_path).path(0)
    assert paths["rcnn", 0.0] != paths["rcnn", 0.1]  # other crops, other pool5
    assert paths["spp", 0.0] == paths["spp", 0.1]  # SPP's conv5 maps do not depend on it


# ------------------------------------------------------------ fine-tuning batches


def _batch_foreground(rows) -> list[int]:
    return [int((r[:, 2] > 0).sum()) for r in rows]


def test_a_batch_takes_its_foreground_quota_over_all_its_images():
    # image 0 has 1 foreground window, image 1 has 50; both have plenty of background
    fg = torch.cat(
        [torch.tensor([[0, 0, 3]]), torch.stack([torch.ones(50), torch.arange(1, 51), torch.full((50,), 2)], 1)]
    )
    fg = fg.long()
    bg = torch.stack([torch.arange(400) % 2, 100 + torch.arange(400)], 1)
    cfg = det_finetune.FinetuneConfig(images_per_batch=2).resolved()
    rng = det_finetune.np.random.Generator(det_finetune.np.random.PCG64(0))
    seen_both = 0
    for _ in range(20):
        rows = det_finetune._sample_rows(rng, fg, bg, cfg)
        images = [int(r[0, 0]) for r in rows]
        assert [len(r) for r in rows] == [64, 64]
        counts = _batch_foreground(rows)
        # brute force: each image offers at most its distinct foreground windows (and its rows)
        capacity = sum(min(64, int((fg[:, 0] == i).sum())) for i in images)
        assert sum(counts) == min(32, capacity)
        if sorted(images) == [0, 1]:
            seen_both += 1
            assert counts[images.index(0)] == 1 and counts[images.index(1)] == 31  # exactly 25 %
    assert seen_both > 0


def test_fine_tuning_batches_of_the_toy_set_reach_the_quota_when_their_images_can(tiny_root):
    ds = VOCDetection(tiny_root, "train")
    windows = [build_windows(sliding_window_proposals(r["width"], r["height"], (24, 48)), r, 8) for r in ds.records]
    cfg = det_finetune.FinetuneConfig().resolved()  # 128 windows from 8 images, 25 % foreground
    fg, bg = det_finetune._window_pools(windows, cfg)
    per_image = torch.bincount(fg[:, 0], minlength=len(windows))
    assert int((per_image[per_image > 0] < 4).sum()) > 0  # some images have fewer than their share of 4
    rng = det_finetune.np.random.Generator(det_finetune.np.random.PCG64(1))
    above_per_image_rule = 0
    for _ in range(10):
        rows = det_finetune._sample_rows(rng, fg, bg, cfg)
        have = [int(per_image[int(r[0, 0])]) for r in rows]
        got = sum(_batch_foreground(rows))
        assert got == min(32, sum(min(len(r), h) for r, h in zip(rows, have)))
        above_per_image_rule += got > sum(min(4, h) for h in have)  # 4 per image, each alone: below 32
    assert above_per_image_rule > 0


# ------------------------------------------------------------ whole pipeline


@pytest.fixture(scope="module")
def trained_run(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    train(tiny_cfg(tiny_root), out=out, verbose=False)
    return out


def test_pipeline_writes_every_stage_and_evaluates(trained_run, tiny_root, tmp_path):
    for name in ("config.json", "detector.safetensors", "finetune.csv", "finetune.png", "backbone/model.safetensors"):
        assert (trained_run / name).is_file(), name
    det, classes, cfg = load_detector(trained_run)
    assert bool(det.trained_heads.all()) and det.levels == (1, 2, 3, 6) and det.scales == (172,)
    assert float(det.svm_weight.abs().sum()) > 0 and float(det.bbox_weight.abs().sum()) > 0
    ds = VOCDetection(tiny_root, "test", classes=classes)
    props = [sliding_window_proposals(r["width"], r["height"], (24, 48, 96)) for r in ds.records]
    result = evaluate(det, ds.records, classes, props, verbose=False)
    assert 0.0 <= result["mAP"] <= 1.0 and result["images"] == 4 and result["seconds_per_image"] > 0
    assert all(
        int((p["labels"][:, None] == torch.arange(len(classes))).sum(0).max()) <= 100 for p in result["predictions"]
    )
    # the run's test settings reach detect(): with them, evaluate gives what detect gives
    options = {"max_per_class": 2, "max_per_image": 5, "nms_boxes": "regressed"}
    capped = evaluate(det, ds.records, classes, props, verbose=False, detect_options=options)["predictions"]
    for r, p, got in zip(ds.records, props, capped):
        (want,) = det.detect([load_record_image(r)], [torch.as_tensor(p)], **options)
        assert len(got["labels"]) <= 5 and int(torch.bincount(got["labels"]).max()) <= 2
        torch.testing.assert_close(got, want)
    # precision-recall curves of those detections, drawn
    from PIL import Image

    from sppnet.evaluation import precision_recall
    from sppnet.viz.detections import plot_pr_curves

    gts = [{"boxes": r["boxes"], "labels": r["labels"], "difficult": r["difficult"]} for r in ds.records]
    png = plot_pr_curves(precision_recall(result["predictions"], gts, classes), tmp_path / "pr.png", result["ap"])
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
    with pytest.raises(UserError, match="already holds"):
        train(cfg, out=trained_run, verbose=False)


def test_resume_at_a_stage_boundary_equals_an_uninterrupted_run(trained_run, tiny_root, tmp_path):
    out = tmp_path / "staged"
    shutil.copytree(trained_run / "cache", out / "cache")  # content-keyed: reused, not trusted blindly
    train(tiny_cfg(tiny_root), out=out, verbose=False, stop_after="features")
    assert (out / "stages" / "features.json").is_file() and not (out / "detector.safetensors").exists()
    train(None, out=out, resume=True, verbose=False, stop_after="svm")
    assert not (out / "detector.safetensors").exists()
    train(None, out=out, resume=True, verbose=False)
    same_weights(out / "detector.safetensors", trained_run / "detector.safetensors")


class _InterruptAfter(GracefulInterrupt):
    """A Ctrl-C that arrives during the third fine-tuning iteration."""

    calls = 0

    @property
    def requested(self):
        _InterruptAfter.calls += 1
        return _InterruptAfter.calls >= 3

    @requested.setter
    def requested(self, value):
        pass


def test_ctrl_c_in_fine_tuning_checkpoints_and_resumes_exactly(trained_run, tiny_root, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    shutil.copytree(trained_run / "cache", out / "cache")
    monkeypatch.setattr(det_finetune, "GracefulInterrupt", _InterruptAfter)
    with pytest.raises(TrainingInterrupted):
        train(tiny_cfg(tiny_root), out=out, verbose=False)
    assert (out / "finetune_last.safetensors").is_file() and not (out / "stages" / "finetune.safetensors").exists()
    monkeypatch.setattr(det_finetune, "GracefulInterrupt", GracefulInterrupt)
    train(None, out=out, resume=True, verbose=False)
    same_weights(out / "detector.safetensors", trained_run / "detector.safetensors")


def test_rcnn_method_and_softmax_scorer_train_end_to_end(tiny_root, tmp_path):
    cfg = tiny_cfg(
        tiny_root,
        {"finetune": {"iterations": 8, "checkpoint_every": 4}, "proposals": {"max_proposals": 30}},
        method="rcnn",
        scorer="softmax",
        **{"bbox.enabled": False},
    )
    train(cfg, out=tmp_path / "rcnn", verbose=False)
    det, classes, saved = load_detector(tmp_path / "rcnn")
    assert det.method == "rcnn" and saved.scorer == "softmax" and not bool(det.trained_heads.any())
    image = load_record_image(VOCDetection(tiny_root, "test").records[0])
    (out,) = det.detect([image], [torch.tensor([[0.0, 0.0, 40.0, 50.0], [10.0, 5.0, 60.0, 70.0]])], scorer="softmax")
    assert len(out["boxes"]) <= 2 * len(classes) and bool(((out["scores"] >= 0) & (out["scores"] <= 1)).all())


def test_config_presets_and_checks():
    small, paper = DetectConfig.from_preset("small"), DetectConfig.from_preset("paper")
    assert small.image_scales == (344,) and small.window_target == 112 and small.crop_size == 112
    assert paper.image_scales == (688,) and paper.backbone.width == 1.0 and paper.backbone.fc_dim == 4096
    five = DetectConfig.from_preset("paper", {"features": {"scales": (480, 576, 688, 864, 1200)}})
    assert five.image_scales == (480, 576, 688, 864, 1200)
    assert image_scales(375, 500, five.image_scales)[-1].height == 1200
    assert DetectConfig.from_dict(dataclasses.asdict(small)) == small
    with pytest.raises(UserError, match="method"):
        DetectConfig.from_preset("small", method="fast")
    with pytest.raises(UserError, match="coco"):
        DetectConfig.from_preset("small", format="coco")


# config.json of a run written before the config was nested (sppnet at commit 22668b9)
FLAT_CONFIG = {
    "data": "/data/voc",
    "format": "voc",
    "ann": None,
    "split": "train",
    "preset": "small",
    "method": "spp",
    "model": "zf5",
    "width": 0.125,
    "fc_dim": 32,
    "dropout": 0.5,
    "levels": [1, 2, 3, 6],
    "scales": [688],
    "size_factor": 0.25,
    "target_size": 224,
    "backbone": None,
    "ss_mode": "fast",
    "ss_resize_to": 200,
    "ss_base_k": 100,
    "ss_inc_k": 100,
    "max_proposals": 80,
    "pretrain_size": None,
    "pretrain_epochs": 2,
    "pretrain_batch": 16,
    "pretrain_lr": 0.003,
    "background_per_image": 1,
    "finetune": "fc",
    "ft_iterations": 40,
    "ft_lr": 0.003,
    "ft_lr_steps": [1000],
    "ft_batch": 128,
    "ft_fg_fraction": 0.25,
    "ft_flip": True,
    "ft_images_per_batch": 8,
    "checkpoint_every": 250,
    "scorer": "svm",
    "svm_C": 0.001,
    "svm_pos_weight": 2.0,
    "svm_epochs": 1,
    "svm_retrain_limit": 2000,
    "bbox_regression": True,
    "bbox_iou": 0.5,
    "bbox_lambda": None,
    "calibrate_split": "val",
    "chunk_size": 1024,
    "seed": 3,
    "workers": 0,
    "device": "cpu",
    "strict": False,
}


def test_a_flat_config_of_an_older_run_loads_as_the_nested_config():
    cfg = DetectConfig.from_dict(FLAT_CONFIG)
    expected = DetectConfig.from_preset(
        "small",
        {
            "backbone": {"width": 0.125, "fc_dim": 32, "epochs": 2, "crops": "gt", "recipe": "paper", "lr": 0.003},
            "features": {"size_factor": 0.25, "warp_context": 0.0, "auto_scale": False, "auto_scale_factors": (1.0,)},
            "finetune": {"iterations": 40, "lr": 0.003, "lr_steps": (1000,)},
            "proposals": {"max_proposals": 80},
            "test": {"max_per_class": None, "max_per_image": 100, "nms_boxes": "regressed"},
        },
        data="/data/voc",
        seed=3,
        workers=0,
        device="cpu",
    )
    assert cfg == expected
    # every flat value landed where the nested config keeps it
    flat = cfg.flat()
    from sppnet.engine.detect.config import _FLAT

    for key, value in FLAT_CONFIG.items():
        assert flat[_FLAT[key]] == (tuple(value) if isinstance(value, list) else value), key
    with pytest.raises(UserError, match=r"unknown settings \['ft_typo'\]"):
        DetectConfig.from_dict({**FLAT_CONFIG, "ft_typo": 1})
    with pytest.raises(UserError, match=r"unknown DetectConfig settings \['typo'\]"):
        DetectConfig.from_dict({**cfg.to_dict(), "typo": 1})


def test_new_runs_test_as_the_release_and_older_configs_as_they_did():
    import inspect

    from sppnet.models.detector import RCNN_CONTEXT_PADDING, SPPDetector

    new = DetectConfig.from_preset("small")
    assert new.features.warp_context == RCNN_CONTEXT_PADDING and new.features.scale_rule == "area"
    assert new.test.detect_options() == {"max_per_class": 100, "max_per_image": None, "nms_boxes": "proposals"}
    assert set(new.test.detect_options()) <= set(inspect.signature(SPPDetector.detect).parameters)
    assert DetectConfig.from_dict(new.to_dict()) == new  # a run saved now loads as saved
    # a config.json saved before these settings existed: R-CNN's bare warp, 100 over all classes, NMS after regression
    old = new.to_dict()
    for section, keys in (
        ("features", ("warp_context", "scale_rule")),
        ("test", ("max_per_class", "max_per_image", "nms_boxes")),
    ):
        for key in keys:
            del old[section][key]
    loaded = DetectConfig.from_dict(old)
    assert loaded.features.warp_context == 0.0 and loaded.features.scale_rule == "area"
    assert loaded.test.detect_options() == {"max_per_class": None, "max_per_image": 100, "nms_boxes": "regressed"}
    del old["test"]
    assert DetectConfig.from_dict(old).test == loaded.test
    released = DetectConfig.from_preset("small", {"features": {"scale_rule": "released", "target_size": 208}})
    det = build_detector(released, 3)
    assert det.scale_rule == "released" and det.target_size == 104


def test_a_detector_saved_before_the_warp_context_keeps_the_bare_warp(tmp_path):
    from sppnet.engine.common import save_weights
    from sppnet.engine.detect.model import load_detector_file, save_detector

    cfg = DetectConfig.from_preset("small", TINY, method="rcnn")
    torch.manual_seed(0)
    det = build_detector(cfg, 3).eval()
    save_detector(tmp_path / "new.safetensors", det, ["a", "b", "c"], cfg, "final")
    assert load_detector_file(tmp_path / "new.safetensors")[0].warp_context == det.warp_context > 0
    _, meta = load_weights(tmp_path / "new.safetensors")
    del meta["detector_config"]["warp_context"]
    save_weights(tmp_path / "old.safetensors", det, meta)
    old, _ = load_detector_file(tmp_path / "old.safetensors")
    assert old.warp_context == 0.0
    # it pools the bare windows, as it was trained: equal to a detector built with no context, unlike the new one
    image = torch.rand(3, 60, 80, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[10.0, 8.0, 50.0, 40.0], [0.0, 0.0, 79.0, 59.0]])
    bare = build_detector(cfg.with_overrides({"features.warp_context": 0.0}), 3).eval()
    bare.load_state_dict(det.state_dict())
    with torch.no_grad():
        pooled = [d.window_pool5(d.normalize(image), boxes) for d in (old, bare, det)]
    torch.testing.assert_close(pooled[0], pooled[1])
    assert not torch.allclose(pooled[0], pooled[2])


@pytest.mark.parametrize(
    "override, message",
    [
        ({"finetune": {"lr": float("nan")}}, r"finetune.lr \(--ft-lr\) must be a finite number, got nan"),
        ({"bbox": {"lam": float("nan")}}, r"bbox.lam \(--bbox-lambda\) must be a finite number, got nan"),
        ({"svm": {"C": -1.0}}, r"svm.C \(--svm-c\) must be > 0, got -1.0"),
        ({"features": {"scales": ()}}, r"--scales\) must hold at least one value"),
        ({"finetune": {"images_per_batch": 200}}, r"--ft-images-per-batch must be in \[1, --ft-batch = 128\], got 200"),
        ({"backbone": {"model": "nope"}}, "unknown model 'nope'"),
    ],
)
def test_bad_settings_are_refused_before_any_work(override, message):
    with pytest.raises(UserError, match=message):
        DetectConfig.from_preset("small", override)


def test_presets_are_partial_overrides_of_the_defaults():
    from sppnet.engine.detect import PRESETS

    assert DetectConfig.from_preset("small") == DetectConfig().resolved()  # small IS the defaults
    paper = DetectConfig.from_preset("paper", {"finetune": {"lr": 1e-3}})
    assert paper.finetune.lr == 1e-3 and paper.finetune.iterations == PRESETS["paper"]["finetune"]["iterations"]
    assert paper.svm == DetectConfig().svm  # what paper does not name keeps its default


@pytest.mark.parametrize("preset", ["small", "paper"])
@pytest.mark.parametrize("workers", [0, 1, 2, 8])
def test_backbone_pretraining_config_resolves_for_any_worker_count(preset, workers):
    # The presets' own worker counts (small: 2, paper: 8) reached the
    # classification config with its image cache on, which refuses workers.
    ccfg = pretrain_config(DetectConfig.from_preset(preset, workers=workers))
    assert ccfg.workers == min(workers, 1) and not ccfg.cache_images
    assert ccfg.spp and ccfg.schedule == "multi" and ccfg.size == DetectConfig.from_preset(preset).crop_size


def test_backbone_pretraining_recipes():
    from sppnet.engine.classify.config import PAPER_RECIPE

    auto = pretrain_config(DetectConfig.from_preset("small"))  # auto: the paper's recipe first
    assert (auto.norm, auto.optimizer, auto.lr) == ("lrn", "sgd", 0.003)
    modern = pretrain_config(DetectConfig.from_preset("small"), "modern")
    assert (modern.norm, modern.fc_norm, modern.optimizer, modern.crop) == ("bn", True, "adamw", "random")
    assert modern.lr == 1e-3 and modern.lr_schedule == "steps" and modern.warmup_epochs == 1.0
    paper = pretrain_config(DetectConfig.from_preset("paper"))
    for key, value in PAPER_RECIPE.items():
        if key != "lr_schedule":
            assert getattr(paper, key) == value, key
    assert paper.lr == 0.01 and paper.lr_schedule == "steps"
    old = pretrain_config(DetectConfig.from_preset("small", {"backbone": {"recipe": "paper"}}))
    assert old.norm == "lrn" and old.optimizer == "sgd" and old.lr == 0.003  # the recipe's own lr
    assert pretrain_config(DetectConfig.from_preset("small", {"backbone": {"lr": 5e-4}})).lr == 5e-4
    # a run saved before the setting existed pretrained with the paper's recipe
    saved = DetectConfig().to_dict()
    del saved["backbone"]["recipe"]
    assert DetectConfig.from_dict(saved).backbone.recipe == "paper"


def test_prior_loss_and_plateau_test(tmp_path):
    from sppnet.engine.detect.backbone import PLATEAU_FRACTION, learned, prior_loss

    assert prior_loss([3, 3, 3]) == 0.0
    assert abs(prior_loss([0, 1, 2, 3]) - math.log(4)) < 1e-12
    labels = [0] * 5 + [1] * 5  # entropy ln 2 = 0.693
    assert learned(tmp_path, labels)[0] is False  # no metrics.csv: nothing learnt
    for loss, expected in ((0.69, False), (PLATEAU_FRACTION * math.log(2) + 1e-3, False), (0.3, True)):
        (tmp_path / "metrics.csv").write_text(f"epoch,train_loss\n1,2.0\n2,{loss}\n")
        ok, final, prior = learned(tmp_path, labels)
        assert (ok, final) == (expected, loss) and abs(prior - math.log(2)) < 1e-12


def test_auto_recipe_pretrains_again_when_the_first_did_not_learn(tiny_root, tmp_path, monkeypatch, capsys):
    import sppnet.engine.detect.backbone as backbone

    monkeypatch.setattr(backbone, "PLATEAU_FRACTION", 0.0)  # no run counts as learnt
    out = tmp_path / "auto"
    cfg = tiny_cfg(tiny_root, {"finetune": {"iterations": 2}})
    assert cfg.backbone.recipe == "auto"
    train(cfg, out=out, verbose=True)
    assert "did not leave the initial loss plateau" in capsys.readouterr().err
    assert (out / "backbone" / "model.safetensors").is_file()
    second, _ = load_weights(out / "backbone-modern" / "model.safetensors")
    assert any("running_mean" in k for k in second)  # batch norm: the modern recipe
    det = load_detector(out)[0]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in det.backbone.modules())  # the detector took it
    monkeypatch.setattr(backbone, "PLATEAU_FRACTION", 100.0)  # every run learnt: the paper's recipe alone
    out = tmp_path / "paper"
    train(cfg, out=out, verbose=False)
    assert not (out / "backbone-modern").exists()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in load_detector(out)[0].backbone.modules())


def test_finetune_all_trains_the_conv_layers_and_recaches_features(trained_run, tiny_root, tmp_path):
    out = tmp_path / "all"
    (out / "cache").mkdir(parents=True)
    shutil.copytree(trained_run / "cache" / "proposals", out / "cache" / "proposals")
    cfg = tiny_cfg(tiny_root, {"finetune": {"mode": "all", "iterations": 6, "checkpoint_every": 3}})
    train(cfg, out=out, verbose=False)
    assert load_detector(out)[2].finetune.images_per_batch == 2
    before, _ = load_weights(out / "stages" / "backbone.safetensors")
    after, _ = load_weights(out / "stages" / "finetune.safetensors")
    conv = "backbone.features.0.weight"
    assert not torch.equal(before[conv], after[conv])  # the loss reached the conv layers
    fc6 = "backbone.fc.0.weight"
    assert not torch.equal(before[fc6], after[fc6])
    # the feature stage ran AFTER fine-tuning, on the new conv layers
    order = list((out / "stages" / "times.json").read_text().split('"')[1::2])
    assert order.index("finetune") < order.index("features")


def test_backbone_from_a_classification_run_is_reordered_and_reused(trained_run, tiny_root, tmp_path):
    """--backbone: a ``classify train`` run with the paper's level order (6, 3, 2, 1)."""
    from sppnet.engine.classify import ClassifyConfig, load_classifier
    from sppnet.engine.classify import train as classify_train
    from sppnet.engine.detect.backbone import BACKGROUND, WindowCrops

    ds = VOCDetection(tiny_root, "train")
    items = [(r["image_path"], tuple(b), int(c)) for r in ds.records for b, c in zip(r["boxes"].tolist(), r["labels"])]
    crops = WindowCrops(items, 64, [*ds.class_names, BACKGROUND])
    ccfg = ClassifyConfig(width=0.125, fc_dim=32, size=56, small_size=None, epochs=1, batch_size=8, workers=0)
    assert ccfg.levels == (6, 3, 2, 1)
    run = classify_train(ccfg, train_set=crops, classes=crops.classes, out=tmp_path / "cls", verbose=False)

    out = tmp_path / "det"
    shutil.copytree(trained_run / "cache" / "proposals", out / "cache" / "proposals")
    train(tiny_cfg(tiny_root, {"backbone": {"checkpoint": str(run)}}), out=out, verbose=False, stop_after="backbone")
    assert not (out / "backbone").exists()  # no pretraining of our own
    det, _ = load_weights(out / "stages" / "backbone.safetensors")
    model, classes, _ = load_classifier(run)
    torch.testing.assert_close(det["backbone.features.0.weight"], model.features[0].weight)
    # fc8 = the classifier's rows, background first
    order = [classes.index(BACKGROUND)] + [classes.index(c) for c in ds.class_names]
    torch.testing.assert_close(det["cls_score.weight"], model.classifier.weight[order])
    # the pyramid was reordered to (1, 2, 3, 6): same classifier function, fc6 columns permuted
    x = torch.rand(2, 3, 64, 80)
    with torch.no_grad():
        reference = model(x)
        from sppnet.engine.detect.model import load_detector_file

        detector = load_detector_file(out / "stages" / "backbone.safetensors")[0]
        torch.testing.assert_close(detector.backbone(x), reference)
    assert detector.levels == (1, 2, 3, 6)


def test_calibration_stage_uses_a_held_out_split_and_skips_overlapping_ones(trained_run, tiny_root, tmp_path):
    import json

    from sppnet.engine.detect import proposals, run_thresholds
    from sppnet.engine.detect.stages import StageContext, stage_calibrate
    from sppnet.evaluation import best_f1_thresholds, precision_recall

    det, classes, cfg = load_detector(trained_run)
    out = tmp_path / "run"
    shutil.copytree(trained_run / "cache" / "proposals", out / "cache" / "proposals")

    def stage(split):
        c = cfg.with_overrides({"test": {"calibrate_split": split}})
        return stage_calibrate(StageContext(c, out, torch.device("cpu"), [], [], classes, False), det)

    for split in (None, "train", "trainval", "val", "no-such-split"):  # off, overlapping, empty, missing
        assert stage(split) is det
        assert not (out / "thresholds.json").exists(), split
    assert run_thresholds(out, classes, "svm") is None
    stage("test")
    saved = json.loads((out / "thresholds.json").read_text())
    assert saved["split"] == "test" and saved["images"] == 4 and saved["scorer"] == "svm"
    # the same operating points, from the test split's detections scored here
    ds = VOCDetection(tiny_root, "test", classes=classes)
    props = proposals(ds.records, cfg, out / "cache" / "proposals", verbose=False)
    result = evaluate(det, ds.records, classes, props, "svm", verbose=False)
    gts = [{"boxes": r["boxes"], "labels": r["labels"], "difficult": r["difficult"]} for r in ds.records]
    points = best_f1_thresholds(precision_recall(result["predictions"], gts, classes))
    expected = [points[c]["threshold"] if points[c]["threshold"] is not None else 0.0 for c in classes]
    torch.testing.assert_close(run_thresholds(out, classes, "svm"), torch.tensor(expected))
    assert run_thresholds(out, classes, "softmax") is None  # calibrated for the SVM scores only
    with pytest.raises(UserError, match="no threshold for classes"):
        run_thresholds(out, [*classes, "unicorn"], "svm")


def test_testing_data_defaults_to_the_runs_data_and_keeps_a_given_annotation_file():
    from sppnet.engine.detect.data import data_to_test as _test_data

    coco = DetectConfig.from_preset("small", data="/imgs", format="coco", ann="/train.json")
    # a held-out annotation file for the run's own image folder (calibrate / val --ann)
    assert _test_data(coco, None, None, "/val.json") == ("/imgs", "coco", "/val.json")
    assert _test_data(coco, "/other", None, None) == ("/other", "voc", None)
    assert _test_data(coco, "/other", "coco", "/o.json") == ("/other", "coco", "/o.json")
    builtin = DetectConfig.from_preset("small")
    assert _test_data(builtin, None, None, None) == (None, "voc", None)
