"""Classification: config and presets, size schedules, training end to end, evaluation,
prediction, the CLI and its error messages. Tiny networks on tiny data (seconds)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from sppnet.cli.main import main
from sppnet.data.imagefolder import ImageFolderDataset
from sppnet.data.synthetic import CLASSES, make_classification_dataset
from sppnet.engine.classify import (
    PRESETS,
    ClassifyConfig,
    LRSchedule,
    SizeSchedule,
    evaluate,
    load_classifier,
    predict,
    train,
)
from sppnet.engine.classify.config import PAPER_RECIPE
from sppnet.engine.classify.schedules import budget_marks
from sppnet.engine.classify.training import build_lr_schedule
from sppnet.engine.common import UserError, load_state, load_weights
from sppnet.engine.config import ConfigError, leaves
from sppnet.utils import load_json

TINY = {
    "width": 0.1,
    "fc_dim": 32,
    "size": 64,
    "epochs": 1,
    "batch_size": 8,
    "workers": 0,
    "device": "cpu",
    "lr_steps": (),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_classification_dataset(
        root, seed=1, train_per_class=3, val_per_class=1, test_per_class=1, min_size=48, max_size=96
    )


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "multi"
    cfg = ClassifyConfig(**{**TINY, "epochs": 2}, schedule="multi", data=str(data))
    train(cfg, out=out, verbose=False)
    return out, cfg.resolved()


# --------------------------------------------------------------------- config


def test_presets():
    small = ClassifyConfig.from_preset("small")
    assert (small.model, small.width, small.fc_dim, small.size, small.small_size) == ("overfeat5", 0.125, 256, 112, 90)
    assert (small.workers, small.cache_images) == (0, True)
    assert ClassifyConfig.from_preset("small", workers=2).cache_images is False
    assert small == ClassifyConfig().resolved(), "the dataclass defaults are the small preset"
    paper = ClassifyConfig.from_preset("paper")
    assert (paper.model, paper.width, paper.fc_dim, paper.size, paper.small_size) == ("zf5", 1.0, 4096, 224, 180)
    assert (paper.epochs, paper.batch_size) == (70, 128)
    assert (paper.lr, paper.momentum, paper.weight_decay, len(paper.lr_steps)) == (0.01, 0.9, 5e-4, 2)
    assert (paper.dropout, paper.init, small.dropout, small.init) == (0.5, "paper", 0.0, "he")
    assert paper.preset == "paper" and set(PRESETS) == {"small", "paper"}


def test_presets_are_partial_overrides_of_the_defaults():
    defaults = ClassifyConfig()
    for name, values in PRESETS.items():
        redundant = [k for k, v in values.items() if getattr(defaults, k) == v]
        assert not redundant, f"preset {name} repeats defaults {redundant}: write each default once"
        cfg = ClassifyConfig.from_preset(name)
        assert all(getattr(cfg, k) == v for k, v in values.items())
        assert {k for k in cfg.to_dict() if getattr(cfg, k) != getattr(defaults, k)} <= set(values) | {
            "small_size",
            "mean",
            "std",
            "preset",
        }


def test_overrides_and_small_size_following_size():
    assert ClassifyConfig.from_preset("small", size=224).small_size == 180
    assert ClassifyConfig.from_preset("small", size=224, small_size=200).small_size == 200
    assert ClassifyConfig.from_preset("paper", size=160).small_size == 129  # follows, not the preset's 180
    c = ClassifyConfig.from_preset("paper", epochs=3, lr=None)  # None keywords: not set
    assert (c.epochs, c.lr) == (3, 0.01)
    assert ClassifyConfig.from_preset("paper", {"small_size": None}).small_size == 180  # a mapping is taken as given
    assert ClassifyConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ConfigError, match=r"unknown ClassifyConfig settings \['colour'\]"):
        ClassifyConfig.from_preset("small", colour=1)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        ClassifyConfig.from_preset("huge")


# config.json exactly as written before the settings were declared with option()
# (commit 22668b9): flat keys, JSON lists for the tuples.
OLD_CONFIG_JSON = """{"model": "overfeat5", "spp": true, "levels": [6, 3, 2, 1], "width": 0.1, "fc_dim": 32,
 "dropout": 0.0, "init": "he", "size": 64, "small_size": 51, "schedule": "multi", "epochs": 2, "batch_size": 8,
 "lr": 0.02, "momentum": 0.9, "weight_decay": 0.0005, "lr_steps": [], "alphastd": 0.1, "seed": 0, "workers": 0,
 "cache_images": true, "device": "cpu", "views": "center", "preset": "small", "data": "/data/shapes"}"""


def test_old_config_json_loads_and_round_trips():
    old = json.loads(OLD_CONFIG_JSON)
    cfg = ClassifyConfig.from_dict(old)
    # written before the recipe settings existed: trained with the paper's recipe
    expected = ClassifyConfig(
        **{**TINY, "epochs": 2}, **PAPER_RECIPE, lr=0.02, schedule="multi", data="/data/shapes"
    ).resolved()
    assert cfg == expected and cfg.levels == (6, 3, 2, 1) and cfg.lr_steps == ()
    today = json.loads(json.dumps(cfg.to_dict()))
    assert {k: today[k] for k in old} == old, "today's config.json has the same keys and values"
    assert ClassifyConfig.from_dict(today) == cfg
    del old["views"], old["alphastd"]  # a file from before a setting existed: the default fills in
    assert ClassifyConfig.from_dict(old) == expected
    with pytest.raises(ConfigError, match=r"unknown ClassifyConfig settings \['colour'\]"):
        ClassifyConfig.from_dict({**old, "colour": 1})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spp": False, "schedule": "multi"}, "needs the SPP head"),
        ({"schedule": "double"}, r"schedule \(--schedule\) must be one of single, multi, random, got 'double'"),
        ({"small_size": 200}, r"small_size \(200\) must not exceed size \(112\)"),
        ({"epochs": 0}, r"epochs \(--epochs\) must be >= 1, got 0"),
        ({"model": "resnet"}, "unknown model 'resnet'"),
        ({"lr": -1.0}, r"lr \(--lr\) must be > 0, got -1.0"),
        ({"momentum": 1.0}, r"momentum \(--momentum\) must be >= 0 and < 1, got 1.0"),
        ({"levels": (6, 0)}, r"levels \(--levels\) must be >= 1, got 0 in \(6, 0\)"),
        ({"workers": 2}, "cache_images keeps images in the training process, so it needs workers=0"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ClassifyConfig(**kwargs).resolved()


@pytest.mark.parametrize("leaf", [leaf for leaf in leaves(ClassifyConfig) if leaf.kind is float], ids=lambda f: f.path)
def test_every_float_setting_must_be_finite(leaf):
    name = leaf.path
    for bad in (math.nan, math.inf):
        value = (1.0, bad, 1.0) if leaf.sequence else bad  # mean / std: each element
        with pytest.raises(ConfigError, match=rf"{name} \({leaf.flag}\) must be a finite number"):
            ClassifyConfig().with_overrides({name: value}).resolved()


def test_plateau_rule_divides_then_stops():
    s = LRSchedule("plateau", 0.1, patience=2, max_reductions=1)
    lrs = []
    for epoch, score in enumerate([0.2, 0.5, 0.5, 0.4, 0.6, 0.6, 0.6]):
        lrs.append(round(s.lr(epoch), 10))
        best = s.end_epoch(epoch, score)
        assert best == (epoch in (0, 1, 4))
        assert s.stopped == (epoch == 6)
    # two epochs without a better score after epoch 2: lr / 10; the next plateau stops
    assert lrs == [0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01] and s.best_epoch == 5 and s.best == 0.6
    restored = LRSchedule("plateau", 0.1, patience=2, max_reductions=1)
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert restored.state_dict() == s.state_dict()


def test_plateau_rule_does_not_count_epochs_whose_validation_loss_still_falls():
    # top-1 noisy (no record after epoch 1) while the loss keeps setting records: no plateau
    s = LRSchedule("plateau", 0.1, patience=2, max_reductions=1)
    for epoch, (score, loss) in enumerate([(0.5, 1.5), (0.6, 1.4), (0.55, 1.2), (0.58, 1.0), (0.59, 0.9)]):
        s.end_epoch(epoch, score, loss=loss)
    assert (s.reductions, s.since_best, s.best_epoch, s.best_loss) == (0, 0, 2, 0.9)
    # a loss within the 1 % margin of the record, or a higher one, is no progress: the rule as usual
    s.end_epoch(5, 0.57, loss=0.895)
    s.end_epoch(6, 0.58, loss=1.1)
    assert s.reductions == 1 and s.lr(7) == pytest.approx(0.01)
    # the same scores without losses divide after epoch 3 (two epochs without a better top-1)
    plain = LRSchedule("plateau", 0.1, patience=2, max_reductions=1)
    for epoch, score in enumerate([0.5, 0.6, 0.55, 0.58]):
        plain.end_epoch(epoch, score)
    assert plain.reductions == 1
    # the record low is part of the checkpointed state; a state written without it loads
    restored = LRSchedule("plateau", 0.1, patience=2, max_reductions=1)
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert restored.state_dict() == s.state_dict()
    old = {k: v for k, v in s.state_dict().items() if k != "best_loss"}
    restored.load_state_dict(old)
    assert restored.best_loss == math.inf


def test_plateau_rule_waits_until_the_network_beats_chance():
    # 8 classes: chance 0.125, floor 1.5 / 8 = 0.1875. Noise at chance divides nothing.
    s = LRSchedule("plateau", 0.1, patience=2, max_reductions=1, floor=1.5 / 8)
    for epoch, score in enumerate([0.12, 0.13, 0.11, 0.12, 0.125, 0.10, 0.11]):
        s.end_epoch(epoch, score)
    assert (s.reductions, s.stopped, s.lr(7)) == (0, False, 0.1)
    for epoch, score in enumerate([0.4, 0.35, 0.38], start=7):  # above the floor: the rule as usual
        s.end_epoch(epoch, score)
    assert s.reductions == 1 and s.lr(10) == pytest.approx(0.01)


def test_budget_marks_spread_over_the_last_third():
    assert budget_marks(0) == ()
    assert budget_marks(1) == pytest.approx((0.7,))
    assert budget_marks(2) == pytest.approx((0.7, 0.85))
    assert budget_marks(3) == pytest.approx((0.7, 0.775, 0.85))


def test_plateau_rule_makes_its_reductions_by_the_budget_marks():
    # still improving every epoch, so the rule alone would never divide; the budget does
    s = LRSchedule("plateau", 1.0, patience=5, max_reductions=2, floor=0.2)
    seen = []
    for epoch, (score, used) in enumerate([(0.3, 0.3), (0.4, 0.6), (0.5, 0.72), (0.6, 0.8), (0.7, 0.9), (0.8, 1.0)]):
        s.end_epoch(epoch, score, budget_used=used)
        seen.append(s.reductions)
    assert seen == [0, 0, 1, 1, 2, 2] and not s.stopped
    assert s.lr(6) == pytest.approx(0.01)
    # a network at chance is left at its rate, whatever the budget says
    at_chance = LRSchedule("plateau", 1.0, patience=5, max_reductions=2, floor=0.2)
    for epoch, used in enumerate([0.5, 0.8, 0.95]):
        at_chance.end_epoch(epoch, 0.1, budget_used=used)
    assert at_chance.reductions == 0
    # a reduction the rule made sooner counts towards the marks
    early = LRSchedule("plateau", 1.0, patience=1, max_reductions=2)
    early.end_epoch(0, 0.5, budget_used=0.1)
    early.end_epoch(1, 0.4, budget_used=0.2)  # plateau: first reduction
    early.end_epoch(2, 0.6, budget_used=0.75)  # the first mark is already met
    assert early.reductions == 1
    # fixed steps ignore the budget
    steps = LRSchedule("steps", 1.0, lr_steps=(10,))
    steps.end_epoch(0, 0.5, budget_used=0.99)
    assert steps.lr(1) == 1.0


def test_plateau_rule_judges_multi_size_after_full_pairs():
    s = LRSchedule("plateau", 1.0, patience=1, max_reductions=3, check_every=2)
    for epoch, score in enumerate([0.5, 0.4, 0.3, 0.2, 0.1, 0.1]):
        s.end_epoch(epoch, score)
        # patience 1 = one whole pair without a record: 2 plateau epochs, judged after even epochs (1-based)
        assert s.reductions == (epoch >= 3) + (epoch >= 5)


def test_plateau_patience_counts_size_cycles_not_epochs():
    # validation of a multi-size run: lower after each small-size epoch, records every other pair
    scores = [0.5, 0.4, 0.55, 0.45, 0.5, 0.45, 0.4, 0.3]
    by_epoch = LRSchedule("plateau", 1.0, patience=2)
    by_cycle = LRSchedule("plateau", 1.0, patience=2, check_every=2)
    first = {}
    for epoch, score in enumerate(scores):
        for name, s in (("epochs", by_epoch), ("cycles", by_cycle)):
            s.end_epoch(epoch, score)
            if s.reductions and name not in first:
                first[name] = epoch
    # epochs: two non-records after the record at epoch 2 (0-based) -> 4; cycles: four -> 6,
    # judged at the end of a pair -> 7
    assert first == {"epochs": 4, "cycles": 7}


@pytest.mark.parametrize("schedule, every", [("single", 1), ("multi", 2), ("random", 2)])
def test_runs_at_several_sizes_judge_plateaus_after_pairs_of_epochs(schedule, every):
    # random-size validation dips after small-size epochs too: counted by epochs, the rule cut
    # the rate of 2 of 3 still-learning runs of the Table 2 experiment (README)
    cfg = ClassifyConfig.from_preset("small", schedule=schedule)
    schedule_ = build_lr_schedule(cfg, num_classes=8)
    assert (schedule_.check_every, schedule_.patience) == (every, cfg.patience)


def test_warmup_is_linear_then_the_schedule():
    s = LRSchedule("steps", 0.4, lr_steps=(3,), warmup_epochs=2)
    assert [s.lr(0, f) for f in (0.25, 1.0)] == pytest.approx([0.05, 0.2])
    assert [s.lr(1, 0.5), s.lr(2, 0.5), s.lr(3, 0.5)] == pytest.approx([0.3, 0.4, 0.04])


def test_cosine_falls_from_the_warm_up_to_zero_over_the_epochs():
    s = LRSchedule("cosine", 0.4, warmup_epochs=1)
    assert s.plan(0, 11) == 11
    for epoch, f in [(0, 0.5), (0, 1.0), (1, 0.25), (3, 1.0), (6, 0.5), (10, 1.0)]:
        p = epoch + f
        want = 0.4 * p if p <= 1 else 0.4 * 0.5 * (1 + math.cos(math.pi * (p - 1) / 10))  # brute force
        assert s.lr(epoch, f) == pytest.approx(want)
    assert s.lr(10, 1.0) == pytest.approx(0.0, abs=1e-12) and s.lr(12, 0.5) == pytest.approx(0.0, abs=1e-12)
    for epoch in range(12):  # no plateau rule: never divided, never stopped early
        s.end_epoch(epoch, 0.5)
    assert not s.stopped and s.reductions == 0


def test_cosine_plans_its_length_from_the_budget_and_the_pace():
    s = LRSchedule("cosine", 1.0)
    assert s.plan(0, 100, budget=60.0, trained=0.0) == 100  # no epoch timed yet: the bound
    s.epoch_seconds = [40.0]  # only the first (cache-filling) epoch timed: its pace is not planned on
    assert s.pace() == 40.0 and s.plan(1, 100, budget=60.0, trained=40.0) == 100
    s.epoch_seconds = [10.0, 4.0, 6.0]  # the first epoch (caches) no longer counts
    assert s.pace() == 5.0 and s.plan(3, 100, budget=60.0, trained=20.0) == 3 + 8
    assert s.plan(3, 9, budget=60.0, trained=20.0) == 9  # --epochs still bounds it
    assert s.plan(3, 100, budget=60.0, trained=59.0) == 4  # at least the epoch that starts
    restored = LRSchedule("cosine", 1.0)
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert restored.epoch_seconds == s.epoch_seconds
    old = s.state_dict()
    del old["epoch_seconds"]  # checkpoints written before the cosine schedule
    restored.load_state_dict(old)
    assert restored.epoch_seconds == [] and restored.pace() is None


def test_lr_steps_divide_by_ten():
    c = ClassifyConfig(lr=0.01, lr_steps=(2, 4))
    assert [round(c.lr_at(e), 10) for e in range(6)] == [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001]


def test_size_schedules():
    assert [SizeSchedule("single", 224, 180).size_for(e) for e in range(3)] == [224] * 3
    multi = SizeSchedule("multi", 224, 180)
    assert [multi.size_for(e) for e in range(4)] == [224, 180, 224, 180]
    a = SizeSchedule("random", 224, 180, seed=5)
    sizes = [a.size_for(e) for e in range(50)]
    assert min(sizes) >= 180 and max(sizes) <= 224 and len(set(sizes)) > 10
    b = SizeSchedule("random", 224, 180, seed=5)
    assert [b.size_for(e) for e in range(50)] == sizes
    c = SizeSchedule("random", 224, 180, seed=6)
    assert [c.size_for(e) for e in range(50)] != sizes
    # Checkpoint after 20 epochs, restore into a fresh schedule: same continuation.
    d = SizeSchedule("random", 224, 180, seed=5)
    [d.size_for(e) for e in range(20)]
    e = SizeSchedule("random", 224, 180, seed=0)
    e.load_state_dict(json.loads(json.dumps(d.state_dict())))
    assert [e.size_for(k) for k in range(50)] == sizes


# ------------------------------------------------------------------- training


def test_train_writes_a_complete_run(run):
    out, cfg = run
    files = {"config.json", "last.safetensors", "model.safetensors", "metrics.csv", "curves.png"}
    assert {p.name for p in out.iterdir()} >= files
    assert ClassifyConfig.from_dict(load_json(out / "config.json")) == cfg
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,size,lr,train_loss,train_acc,val_top1,val_top5,val_loss,seconds"
    assert [r.split(",")[1] for r in rows[1:]] == ["64", "51"]  # multi-size: 64 then round(64 * 180 / 224)
    first = dict(zip(rows[0].split(","), rows[1].split(","), strict=True))
    assert abs(float(first["train_loss"]) - math.log(8)) < 0.5  # 8 classes, barely trained
    assert float(first["val_top1"]) <= float(first["val_top5"]) <= 1.0
    state, meta = load_weights(out / "model.safetensors")
    assert meta["classes"] == sorted(CLASSES) and meta["size"] == 64 and meta["resize"] == 73
    val = [float(r.split(",")[5]) for r in rows[1:]]
    assert meta["epoch"] == 1 + val.index(max(val)), "model.safetensors holds the best validation epoch"
    assert meta["model"] == "overfeat5" and meta["model_config"]["width"] == 0.1


def _val_top1(out) -> list[float]:
    lines = (out / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("val_top1")
    return [float(r.split(",")[col]) for r in lines[1:]]


def test_plateau_rule_stops_training_and_keeps_the_best_epoch(data, tmp_path):
    cfg = ClassifyConfig(**{**TINY, "epochs": 12}, patience=1, max_reductions=0, data=str(data))
    train(cfg, out=tmp_path / "r", verbose=False)
    val = _val_top1(tmp_path / "r")
    # the first epoch without a better val top-1, once the best beats chance by half (1.5 / 8
    # classes), ends training (8 val images: at most 9 distinct scores); else all 12 epochs run
    floor = 1.5 / len(CLASSES)
    stop = next((e for e in range(1, 12) if max(val[:e]) > floor and val[e] <= max(val[:e])), 11)
    assert len(val) == stop + 1
    _, meta = load_weights(tmp_path / "r" / "model.safetensors")
    assert meta["epoch"] == 1 + val.index(max(val))  # the best epoch is kept, stopped early or not
    state = load_state(tmp_path / "r" / "last.safetensors")
    assert state["epoch"] == len(val) and (len(val) == 12 or state["lr_schedule"]["stopped"])
    train(cfg, out=tmp_path / "r", resume=True, verbose=False)  # a finished run stays finished
    assert _val_top1(tmp_path / "r") == val


def test_time_budget_ends_training(data, tmp_path):
    cfg = ClassifyConfig(**{**TINY, "epochs": 5}, time_budget=1e-3, data=str(data))
    train(cfg, out=tmp_path / "r", verbose=False)
    assert len(_val_top1(tmp_path / "r")) == 1


def test_time_budget_is_spent_along_a_cosine(data, tmp_path):
    # a generous budget: every epoch fits, so the cosine's plan is the epoch bound and the
    # logged end-of-epoch rates follow it; the run is not stopped by the plateau rule
    cfg = ClassifyConfig(
        **{**TINY, "epochs": 6}, lr_schedule="cosine", warmup_epochs=1.0, lr=0.01, time_budget=3600.0, data=str(data)
    )
    train(cfg, out=tmp_path / "r", verbose=False)
    lines = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("lr")
    lrs = [float(r.split(",")[col]) for r in lines[1:]]
    want = [0.01 * 0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(6)]
    assert lrs == pytest.approx(want, abs=1e-6)
    state = load_state(tmp_path / "r" / "last.safetensors")
    assert len(state["lr_schedule"]["epoch_seconds"]) == 6


def test_load_evaluate_predict(run, data):
    out, cfg = run
    model, classes, loaded = load_classifier(out)
    assert classes == sorted(CLASSES) and loaded == cfg and not model.training
    test = ImageFolderDataset(data, "test", classes=classes)
    results = {v: evaluate(model, test, v, cfg) for v in ("center", "ten", "full")}
    assert [results[v]["views_per_image"] for v in ("center", "ten", "full")] == [1.0, 10.0, 1.0]
    results["multi"] = evaluate(model, Subset(test, [0, 5]), "multi", cfg)  # 6 scales: the slow one
    assert 90 <= results["multi"]["views_per_image"] <= 98 and results["multi"]["images"] == 2
    for v in ("center", "ten", "full"):
        assert results[v]["images"] == 8
    for r in results.values():
        assert 0 <= r["top1"] <= r["top5"] <= 1
    # evaluate agrees with predict, image by image.
    preds = predict(model, [p for p, _ in test.samples], classes, "full", topk=8, cfg=cfg)
    correct = sum(p["top"][0]["index"] == label for p, (_, label) in zip(preds, test.samples, strict=True))
    assert correct / 8 == results["full"]["top1"]
    probs = [t["prob"] for t in preds[0]["top"]]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
    assert preds[0]["image"] == test.samples[0][0]


def test_workers_and_cache_do_not_change_the_result(data, tmp_path):
    cfg = ClassifyConfig(**{**TINY, "epochs": 2}, data=str(data), dropout=0.5, schedule="multi")
    assert cfg.cache_images
    train(cfg, out=tmp_path / "w0", verbose=False)
    train(dataclasses.replace(cfg, workers=2, cache_images=False), out=tmp_path / "w2", verbose=False)
    a, _ = load_weights(tmp_path / "w0" / "model.safetensors")
    b, _ = load_weights(tmp_path / "w2" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_on_given_pil_datasets(tmp_path):
    """The detector pretrains its backbone this way: (PIL image, label) pairs and class names."""
    rng = np.random.default_rng(0)
    shapes = [(int(rng.integers(40, 90)), 70, 3) for _ in range(6)]
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in shapes]
    items = [(img, i % 2) for i, img in enumerate(images)]
    cfg = ClassifyConfig(**{**TINY, "batch_size": 4})
    out = train(cfg, items, items[:2], classes=["bg", "fg"], out=tmp_path / "given", verbose=False)
    model, classes, _ = load_classifier(out)
    assert classes == ["bg", "fg"] and model.num_classes == 2
    # no validation set (the detector's pretraining): the last epoch's weights are kept
    out = train(dataclasses.replace(cfg, epochs=3), items, classes=["bg", "fg"], out=tmp_path / "noval", verbose=False)
    assert load_weights(out / "model.safetensors")[1]["epoch"] == 3
    with pytest.raises(ValueError, match="pass classes="):
        train(cfg, items, out=tmp_path / "noclasses", verbose=False)
    with pytest.raises(ValueError, match="must yield \\(PIL.Image, int\\) pairs, item \\d+ holds Tensor"):
        train(cfg, [(torch.zeros(3, 8, 8), 0)] * 4, classes=["a", "b"], out=tmp_path / "tensors", verbose=False)


def test_no_spp_baseline_trains_at_its_one_size(data, tmp_path):
    cfg = ClassifyConfig(**{**TINY, "size": 112}, spp=False, data=str(data))
    out = train(cfg, out=tmp_path / "nospp", verbose=False)
    model, classes, cfg = load_classifier(out)
    assert not model.spp and model.input_size == 112
    with pytest.raises(ValueError, match="needs an SPP model"):
        evaluate(model, ImageFolderDataset(data, "test", classes=classes), "full", cfg)


def test_bad_data_is_reported(data, tmp_path):
    cfg = ClassifyConfig(**TINY)
    with pytest.raises(UserError, match="does not exist"):
        train(dataclasses.replace(cfg, data=str(tmp_path / "missing")), out=tmp_path / "r1", verbose=False)
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "train" / "b").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(empty / "train" / "a" / "x.png")
    with pytest.raises(ValueError, match="class folder .*b contains no image files"):
        train(dataclasses.replace(cfg, data=str(empty)), out=tmp_path / "r2", verbose=False)
    with pytest.raises(UserError, match="already holds a training run"):
        run_dir = tmp_path / "r3"
        train(dataclasses.replace(cfg, data=str(data)), out=run_dir, verbose=False)
        train(dataclasses.replace(cfg, data=str(data)), out=run_dir, verbose=False)


def test_unreadable_images_are_skipped_and_counted(data, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    (copy / "train" / "circle" / "broken.jpg").write_bytes(b"not a jpeg at all")
    cfg = ClassifyConfig(**TINY, data=str(copy))
    with pytest.warns(UserWarning, match="broken.jpg"):
        train(cfg, out=tmp_path / "run", verbose=True)
    assert "skipped 1 of 25 images: 1 not an image" in capsys.readouterr().err


# ------------------------------------------------------------------------ CLI


def test_cli_train_val_predict(data, tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "classify",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--width",
        "0.1",
        "--fc-dim",
        "32",
        "--size",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert main(args) == 0
    cfg = load_json(out / "config.json")
    assert (cfg["preset"], cfg["size"], cfg["small_size"], cfg["epochs"], cfg["lr"]) == (
        "small",
        64,
        51,
        1,
        ClassifyConfig().lr,
    )
    capsys.readouterr()
    assert main(["classify", "val", "--run", str(out), "--split", "test", "--views", "ten", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"top1", "top5", "images", "views"}
    assert (result["images"], result["views"], result["views_per_image"]) == (8, "ten", 10.0)

    odd = [tmp_path / "wide.png", tmp_path / "grey.jpg", tmp_path / "alpha.png"]
    Image.new("RGB", (300, 90), (200, 10, 10)).save(odd[0])
    Image.new("L", (20, 33), 90).save(odd[1])
    Image.new("RGBA", (70, 70), (0, 0, 255, 100)).save(odd[2])
    assert main(["classify", "predict", "--run", str(out), *map(str, odd), "--views", "full", "--json"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert [p["image"] for p in preds] == [str(p) for p in odd]
    assert all(len(p["top"]) == 5 and p["top"][0]["class"] in CLASSES for p in preds)
    assert main(["classify", "predict", "--run", str(out), str(odd[0])]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{odd[0]}: ") and line.count(",") == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["classify", "train", "--data", "{tmp}/nope", "--out", "{tmp}/r"], "data folder {tmp}/nope does not exist"),
        (
            ["classify", "train", "--out", "{tmp}/r", "--size", "10", "--data", "{data}"],
            "size=10 is smaller than the minimum input",
        ),
        (["classify", "train", "--out", "{tmp}/r", "--no-spp", "--schedule", "multi"], "needs the SPP head"),
        (["classify", "train", "--out", "{tmp}/r", "--resume"], "nothing to resume"),
        (["classify", "val", "--run", "{tmp}/none"], "does not exist: is {tmp}/none a classification run"),
        (["classify", "predict", "--run", "{run}", "{tmp}/missing.jpg"], "missing.jpg"),
        (["classify", "predict", "--run", "{run}", "{tmp}/text.jpg"], "text.jpg"),
        (["classify", "val", "--run", "{run}", "--data", "{tmp}"], "split folder {tmp}/val does not exist"),
    ],
)
def test_cli_errors_are_one_line(argv, message, tmp_path, data, run, capsys):
    (tmp_path / "text.jpg").write_text("hello")
    fill = {"tmp": str(tmp_path), "data": str(data), "run": str(run[0])}
    assert main([a.format(**fill) for a in argv] + ["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message.format(**fill) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# Every flag `classify train` had before the flags were generated from the declaration, with its meaning.
TRAIN_FLAGS = [
    (["--data", "rel/dir"], {"data": "{cwd}/rel/dir"}),
    (["--model", "zf5"], {"model": "zf5"}),
    (["--no-spp"], {"spp": False}),
    (["--width", "0.25"], {"width": 0.25}),
    (["--fc-dim", "64"], {"fc_dim": 64}),
    (["--dropout", "0.5"], {"dropout": 0.5}),
    (["--init", "paper"], {"init": "paper"}),
    (["--size", "96"], {"size": 96}),
    (["--small-size", "80"], {"small_size": 80}),
    (["--schedule", "random"], {"schedule": "random"}),
    (["--epochs", "3"], {"epochs": 3}),
    (["--batch-size", "16"], {"batch_size": 16}),
    (["--lr", "0.05"], {"lr": 0.05}),
    (["--lr-steps", "40,60"], {"lr_steps": (40, 60)}),
    (["--levels", "4,2,1"], {"levels": (4, 2, 1)}),
    (["--lr-steps", ""], {"lr_steps": ()}),
    (["--momentum", "0.8"], {"momentum": 0.8}),
    (["--weight-decay", "0.001"], {"weight_decay": 0.001}),
    (["--alphastd", "0"], {"alphastd": 0.0}),
    (["--seed", "3"], {"seed": 3}),
    (["--workers", "2"], {"workers": 2}),
    (["--cache-images"], {"cache_images": True}),
    (["--no-cache-images"], {"cache_images": False}),
    (["--device", "cpu"], {"device": "cpu"}),
    (["--norm", "lrn", "--no-fc-norm"], {"norm": "lrn", "fc_norm": False}),
    (["--optimizer", "adamw", "--label-smoothing", "0.1"], {"optimizer": "adamw", "label_smoothing": 0.1}),
    (["--lr-schedule", "steps", "--warmup-epochs", "0"], {"lr_schedule": "steps", "warmup_epochs": 0.0}),
    (["--patience", "5", "--max-reductions", "1"], {"patience": 5, "max_reductions": 1}),
    (["--time-budget", "90"], {"time_budget": 90.0}),
    (["--crop", "paper", "--crop-scale", "0.5", "--jitter", "0"], {"crop": "paper", "crop_scale": 0.5, "jitter": 0.0}),
    ([], {}),
]


@pytest.mark.parametrize("argv, expected", TRAIN_FLAGS)
def test_train_flags_keep_their_names_and_meaning(argv, expected, tmp_path, monkeypatch):
    from sppnet.cli.classify import _overrides
    from sppnet.cli.main import build_parser

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["classify", "train", "--out", "run", *argv])
    want = {k: v.format(cwd=tmp_path.resolve()) if isinstance(v, str) else v for k, v in expected.items()}
    got = _overrides(args)
    assert got == want
    cfg = ClassifyConfig.from_preset("small", got)
    assert all(getattr(cfg, k) == v for k, v in want.items() if k != "small_size" or cfg.schedule != "single")


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lr", "nan", "argument --lr: must be a finite number, got nan"),
        ("--lr", "0", "argument --lr: must be > 0, got 0.0"),
        ("--dropout", "1.5", "argument --dropout: must be >= 0 and < 1, got 1.5"),
        ("--momentum", "inf", "argument --momentum: must be a finite number, got inf"),
        ("--weight-decay", "-0.001", "argument --weight-decay: must be >= 0, got -0.001"),
        ("--width", "0", "argument --width: must be > 0, got 0.0"),
        ("--alphastd", "nan", "argument --alphastd: must be a finite number, got nan"),
        ("--lr-steps", "4,-1", "argument --lr-steps: must be >= 0, got -1"),
        ("--batch-size", "0", "argument --batch-size: must be >= 1, got 0"),
        ("--schedule", "double", "argument --schedule: must be one of single, multi, random, got 'double'"),
        ("--crop-scale", "0", "argument --crop-scale: must be > 0 and <= 1, got 0.0"),
        ("--label-smoothing", "1", "argument --label-smoothing: must be >= 0 and < 1, got 1.0"),
        ("--time-budget", "0", "argument --time-budget: must be > 0, got 0.0"),
        ("--lr-schedule", "onecycle", "argument --lr-schedule: must be one of plateau, steps, cosine, got 'onecycle'"),
    ],
)
def test_bad_values_are_refused_where_they_are_parsed(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["classify", "train", "--out", str(tmp_path / "r"), flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_val_with_workers_on_a_cached_run(run, data, capsys):
    """The image cache is a training setting: --workers on val loads in the workers instead."""
    assert load_json(run[0] / "config.json")["cache_images"]
    argv = ["classify", "val", "--run", str(run[0]), "--split", "test", "--workers", "1", "--json", "--device", "cpu"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 8
