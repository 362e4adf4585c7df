"""The main job: `sppnet demo --quick` end to end, its report checked in a real browser."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sppnet.viz.report import Report, text_table

_IMG = re.compile(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def _png(path: Path, colour=(200, 30, 30)) -> Path:
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def test_report_embeds_every_picture(tmp_path):
    rep = Report("t", "intro")
    s = rep.section("one")
    s.paragraphs.append("a <b> & c")
    s.tables.append((["k", "v"], [["x", 0.5], ["y", 3]]))
    s.figures.append((_png(tmp_path / "a.png"), "first"))
    s.figures.append((_png(tmp_path / "b.png", (0, 0, 255)), "second"))
    out = rep.write(tmp_path / "r.html")
    html = out.read_text()
    found = _IMG.findall(html)
    assert len(found) == 2
    colours = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB").getpixel((0, 0)) for b in found]
    assert colours == [(200, 30, 30), (0, 0, 255)]
    assert "a &lt;b&gt; &amp; c" in html and 'src="a.png"' not in html
    table = text_table(["k", "v"], [["x", 0.5]])
    assert table.splitlines()[0].split() == ["k", "v"] and table.splitlines()[2].split() == ["x", "0.5"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def images_loaded_in_browser(report: Path, workdir: Path) -> dict:
    """Opens a copy of the report (plus a checking script) in headless Chromium."""
    probe = workdir / "probe.html"
    script = (
        "<script>window.addEventListener('load', () => { const imgs = Array.from(document.images);"
        "const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;"
        "const d = document.createElement('pre'); d.id = 'sppnet-probe';"
        "d.textContent = 'PROBE ' + JSON.stringify({total: imgs.length, loaded: ok});"
        "document.body.appendChild(d); });</script>"
    )
    probe.write_text(report.read_text().replace("</body>", script + "</body>"))
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={workdir / 'profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"PROBE (\{.*?\})", dom)
    assert m, f"the probe did not run in Chromium; DOM starts with {dom[:300]!r}"
    return json.loads(m.group(1))


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "sppnet", "demo", "--quick", "--out", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report:" in proc.stdout and "detection mAP" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    cls, det = summary["classification"], summary["detection"]
    for views in ("center", "full"):
        assert 0.0 <= cls[views]["top1"] <= cls[views]["top5"] <= 1.0 and cls[views]["images"] > 0
    assert 0.0 <= det["mAP"] <= 1.0 and det["images"] > 0
    # the paper's recipe: the detector starts from the classifier of part 1
    det_cfg = json.loads((out / "detect" / "config.json").read_text())
    assert det_cfg["backbone"]["checkpoint"] == str((out / "classify").resolve())
    assert det_cfg["backbone"]["model"] == "overfeat5"
    # the detector calibrated its per-class score thresholds on the held-out val split
    thresholds = json.loads((out / "detect" / "thresholds.json").read_text())
    assert thresholds["split"] == "val" and thresholds["images"] > 0
    assert set(thresholds["thresholds"]) == set(thresholds["operating_points"]) and thresholds["thresholds"]
    # the whole point of SPP-net: conv once per image beats a conv per window
    assert det["timing"]["R-CNN"] > det["timing"]["SPP-net"] > 0
    report = Path(summary["report"])
    html = report.read_text()
    images = _IMG.findall(html)
    assert len(images) == len(summary["figures"]) >= 8
    for b in images:
        Image.open(io.BytesIO(base64.b64decode(b))).verify()
    for name in ("feature_maps.png", "pyramid_bins.png", "pr_curves.png", "time_per_image.png", "classify_sizes.png"):
        assert (out / "figures" / name).is_file(), name
    if _chromium() is None:
        pytest.skip("Chromium is not installed (make test installs Debian's chromium where apt-get works)")
    result = images_loaded_in_browser(report, tmp_path)
    assert result == {"total": len(images), "loaded": len(images)}
