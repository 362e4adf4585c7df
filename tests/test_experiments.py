"""The paper-table experiments end to end at their ``--quick`` size (slow: ~2 min)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows: first cell -> the other cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_detection_table_quick_fills_every_cell_and_resumes(tmp_path, capsys):
    dt = load("detection_table")
    out = tmp_path / "det"
    assert dt.main(["--out", str(out), "--quick"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == set(dt.COLUMNS)
    for column in dt.COLUMNS:
        r = results[column]
        assert r["images"] == dt.QUICK_DATA["num_test"] and r["feature_seconds_per_image"] > 0
        for row in (*dt.ROWS, dt.OTHER_ORDER):
            assert 0.0 <= r[row]["mAP"] <= 1.0
            assert r[row]["seconds_per_image"] >= r["feature_seconds_per_image"]
        assert r[dt.OTHER_ORDER]["nms_boxes"] == "regressed"  # the runs test as spp_test.m: NMS on the proposals
        # every column started from the first column's pretrained backbone
        cfg = json.loads((out / "runs" / column.lower().replace(" ", "-") / "config.json").read_text())
        assert (cfg["backbone"]["checkpoint"] is None) == (column == "SPP 1-scale")
    assert results["SPP 5-scale"]["feature_seconds_per_image"] > results["SPP 1-scale"]["feature_seconds_per_image"]
    text = (out / "table.md").read_text()
    rows = table_rows(text)
    assert rows[""] == list(dt.COLUMNS)
    for row in dt.ROWS:
        cells = rows[row]
        assert len(cells) == len(dt.COLUMNS)
        for column, cell in zip(dt.COLUMNS, cells):
            m = re.fullmatch(r"([\d.]+) \(([\d.]+) s\)", cell)
            assert m, cell
            assert float(m.group(1)) == pytest.approx(100 * results[column][row]["mAP"], abs=0.051)
    assert "vs R-CNN" in text
    other = rows["ftfc7 + bb, NMS on the regressed boxes"]
    assert other == [f"{100 * results[c][dt.OTHER_ORDER]['mAP']:.1f}" for c in dt.COLUMNS]
    with Image.open(out / "table.png") as png:
        assert png.size[0] > 400
    # A second run finds every column done: nothing is retrained, same table.
    stamp = (out / "runs" / "r-cnn" / "detector.safetensors").stat().st_mtime_ns
    assert dt.main(["--out", str(out), "--quick"]) == 0
    assert (out / "runs" / "r-cnn" / "detector.safetensors").stat().st_mtime_ns == stamp
    assert table_rows((out / "table.md").read_text()) == rows


@pytest.mark.slow
def test_classification_table_quick_writes_mean_and_spread(tmp_path):
    ct = load("classification_table")
    out = tmp_path / "cls"
    assert ct.main(["--out", str(out), "--quick"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == set(ct.VARIANTS)
    for name, runs in results.items():
        assert set(runs) == {"seed0", "seed1"}
        for r in runs.values():
            assert ("full" in r) == (name != "no SPP")
            for views in ct.VIEWS:
                if views in r:
                    assert 0.0 <= r[views]["top1_err"] <= 100.0 and r[views]["top5_err"] <= r[views]["top1_err"]
    errors, training = (out / "table.md").read_text().split("\nTraining:")
    rows, trained = table_rows(errors), table_rows(training)
    for name in ct.VARIANTS:
        assert re.fullmatch(r"[\d.]+ ± [\d.]+", rows[name][0]), rows[name]
        runs = results[name].values()
        assert all(r["epochs"] == ct.QUICK["epochs"] for r in runs)  # from each run's metrics.csv
        epochs, train_err, best_val = trained[name]
        assert float(epochs) == ct.QUICK["epochs"]
        assert re.fullmatch(r"[\d.]+ ± [\d.]+", best_val), trained[name]
        # multi-size runs report the last training error at each of their two sizes
        assert train_err.count("±") == (2 if name == "SPP multi-size" else 1), train_err
        for r in runs:
            assert 0.0 <= r["best_val_err"] <= 100.0 and 0.0 <= r["train_err"] <= 100.0
    with Image.open(out / "table.png") as png:
        assert png.size[0] > 400


def test_detection_table_runs_spp_at_the_paper_image_scales_by_default(tmp_path):
    dt = load("detection_table")
    full = dt.parse_args(["--out", str(tmp_path)])
    quick = dt.parse_args(["--out", str(tmp_path), "--quick"])
    assert full.spp_scale_multiplier == 2.0 and quick.spp_scale_multiplier == 1.0
    # small preset (size factor 0.5) x 2: the paper's pixels for SPP-net, 112 px warps for R-CNN
    spp1 = dt.column_config(full, None, "SPP 1-scale", None)
    spp5 = dt.column_config(full, None, "SPP 5-scale", None)
    rcnn = dt.column_config(full, None, "R-CNN", None)
    assert spp1.image_scales == (688,) and spp5.image_scales == (480, 576, 688, 864, 1200)
    assert rcnn.method == "rcnn" and rcnn.window_target == spp1.window_target == spp5.window_target == 112
    # the defaults' column: the run picks its scales from the data (the multiplier does not apply)
    auto = dt.column_config(full, None, "SPP auto scales", None)
    assert auto.method == "spp" and auto.features.auto_scale and auto.features.auto_scale_factors == (1.0, 2.0)
    assert not spp1.features.auto_scale and not spp5.features.auto_scale
    with pytest.raises(SystemExit):
        dt.parse_args(["--out", str(tmp_path), "--spp-scale-multiplier", "0"])


@pytest.mark.parametrize("nms_boxes", ["proposals", "regressed"])
def test_detection_table_selects_detections_as_the_detector_does(nms_boxes):
    from sppnet.engine.detect import DetectConfig
    from sppnet.models import get_model
    from sppnet.models.detector import SPPDetector

    dt = load("detection_table")
    torch.manual_seed(0)
    backbone = get_model("zf5", num_classes=4, width=0.125, fc_dim=32).eval()
    det = SPPDetector(backbone, 3, scales=(96,), target_size=48).eval()
    det.svm_weight.normal_()
    det.bbox_weight.normal_(0, 5e-3)  # regressed boxes far enough from the proposals to change the NMS
    det.bbox_bias.normal_(0, 0.2)
    det.trained_heads[:] = True
    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, 90, 120, generator=g)
    xy = torch.rand(300, 2, generator=g) * torch.tensor([80.0, 60.0])
    boxes = torch.cat([xy, xy + 8 + torch.rand(300, 2, generator=g) * 30], 1).round()
    boxes[:, 2:] = torch.minimum(boxes[:, 2:], torch.tensor([119.0, 89.0]))
    test = DetectConfig().test.with_overrides(max_per_class=4, nms_boxes=nms_boxes)
    (want,) = det.detect([image], [boxes], **test.detect_options())
    scores, per_class = det.score_windows(image, boxes)
    got = dt.select(boxes, scores, per_class, test, nms_boxes)
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(got[key], want[key])
    other = dt.select(boxes, scores, per_class, test, "regressed" if nms_boxes == "proposals" else "proposals")
    assert not torch.equal(other["scores"], got["scores"])  # the two orders keep different windows here
