"""``detect predict`` / ``classify predict`` on folders, globs and a video, surviving bad members."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image
from tiny_detect import tiny_detector_fixture, tiny_flags, tiny_voc_fixture

from sppnet.cli.main import main
from sppnet.data import DataWarning

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

tiny_root = tiny_voc_fixture(seed=7, num_train=6, max_short_side=128, max_objects=2)
run = tiny_detector_fixture("run", tiny_flags(ft_iterations=8, max_proposals=60))


def _write_video(path, frames, fps=5.0):
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()


@pytest.fixture(scope="module")
def inputs(tiny_root, tmp_path_factory):
    """A folder of mixed images (JPEG, PNG, grey, in a sub-folder), a corrupt file, a text file, and a video."""
    root = tmp_path_factory.mktemp("inputs")
    folder = root / "photos"
    (folder / "sub").mkdir(parents=True)
    jpgs = sorted((tiny_root / "JPEGImages").glob("*.jpg"))
    shutil.copy(jpgs[0], folder / "a.jpg")
    Image.open(jpgs[1]).save(folder / "b.png")
    Image.open(jpgs[2]).convert("L").save(folder / "sub" / "c.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    (folder / "notes.txt").write_text("not an image")
    frame = np.asarray(Image.open(jpgs[3]).convert("RGB"))
    frames = [np.roll(frame, 4 * k, axis=1) for k in range(5)]
    _write_video(root / "clip.avi", frames)
    return root


def _predict(run, *args):
    return main(
        [
            "detect",
            "predict",
            "--run",
            str(run),
            "--device",
            "cpu",
            "--score-threshold=-1e9",
            *args,
        ]
    )


def test_detect_predict_folder_video_and_bad_members(run, inputs, tmp_path, capsys):
    out = tmp_path / "pred"
    missing = inputs / "missing.jpg"
    capsys.readouterr()
    with pytest.warns(DataWarning) as warned:
        code = _predict(
            run,
            str(inputs / "photos"),
            str(inputs / "clip.avi"),
            str(missing),
            "--recursive",
            "--batch-size",
            "3",
            "--out",
            str(out),
            "--save-json",
            str(tmp_path / "all.json"),
            "--save-txt",
            str(tmp_path / "txt"),
        )
    captured = capsys.readouterr()
    assert code == 0
    # the bad members are named; the summary counts what was read and skipped
    messages = " ".join(str(w.message) for w in warned)
    assert "broken.jpg" in messages and "missing.jpg" in messages
    assert "read 3 images and 5 frames of 1 video; skipped 2 of 10 inputs" in captured.err
    assert "ignored 1 other file" in captured.err

    results = json.loads((tmp_path / "all.json").read_text())
    names = [r["name"] for r in results]
    assert names == ["a.jpg", "b.png", "sub/c.jpg"] + [f"clip.avi#frame{k:06d}" for k in range(5)]
    for r in results[:3]:  # an image: a JSON (the same result) and an annotated PNG of its size
        stem = r["name"].rsplit(".", 1)[0]
        assert json.loads((out / f"{stem}.json").read_text()) == r
        with Image.open(out / f"{stem}.png") as png:
            assert png.size == (r["width"], r["height"])
        assert r["frame"] is None and len(r["detections"]) > 0
    video = json.loads((out / "clip.json").read_text())
    assert [f["frame"] for f in video["frames"]] == [0, 1, 2, 3, 4]
    assert video["frames"] == results[3:]
    assert [f["time"] for f in video["frames"]] == pytest.approx([k / 5.0 for k in range(5)])
    cap = cv2.VideoCapture(str(out / "clip.annotated.mp4"))
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    assert count == 5
    # the text files hold the same detections as the JSON
    classes = (tmp_path / "txt" / "classes.txt").read_text().split()
    for r in results:
        stem = r["name"].rsplit(".", 1)[0] if r["frame"] is None else f"clip_frame{r['frame']:06d}"
        rows = [line.split() for line in (tmp_path / "txt" / f"{stem}.txt").read_text().splitlines()]
        assert len(rows) == len(r["detections"])
        for row, d in zip(rows, r["detections"]):
            assert classes[int(row[0])] == d["label"]
            assert float(row[1]) == pytest.approx(d["score"], rel=1e-5)
            assert [float(v) for v in row[2:]] == pytest.approx(d["box"], abs=0.01)

    # batched == one by one, and a glob reaches the same files
    capsys.readouterr()
    with pytest.warns(DataWarning, match="broken.jpg"):
        code = _predict(
            run,
            str(inputs / "photos" / "*.*"),
            "--batch-size",
            "1",
            "--out",
            str(tmp_path / "one"),
            "--json",
        )
    assert code == 0
    one = {r["name"]: r["detections"] for r in json.loads(capsys.readouterr().out)}
    assert set(one) == {
        "a.jpg",
        "b.png",
    }  # broken.jpg skipped, notes.txt ignored, sub/ not matched
    for r in results[:2]:
        assert [d["label"] for d in one[r["name"]]] == [d["label"] for d in r["detections"]]
        for x, y in zip(one[r["name"]], r["detections"]):
            assert x["box"] == pytest.approx(y["box"], abs=1e-3) and x["score"] == pytest.approx(y["score"], abs=1e-4)


def test_detect_predict_fails_only_when_nothing_is_read(run, inputs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    with pytest.warns(DataWarning) as warned:
        code = _predict(
            run,
            str(empty),
            str(inputs / "photos" / "broken.jpg"),
            str(tmp_path / "*.png"),
        )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "no image or frame could be read" in err and "1 corrupt, 1 empty folder, 1 unmatched glob" in err
    messages = " ".join(str(w.message) for w in warned)
    for name in (str(empty), "broken.jpg", "*.png"):  # each bad source named
        assert name in messages
    # --strict: the first bad source stops the run
    code = _predict(
        run,
        str(inputs / "photos" / "a.jpg"),
        str(inputs / "photos" / "broken.jpg"),
        "--strict",
        "--out",
        str(tmp_path / "strict"),
    )
    err = capsys.readouterr().err
    assert code == 2 and "broken.jpg" in err


def test_classify_predict_takes_folders_and_globs_and_skips_bad_members(run, inputs, capsys):
    backbone = run / "backbone"  # detect train's pretraining is a classification run
    capsys.readouterr()
    with pytest.warns(DataWarning, match="broken.jpg"):
        code = main(
            [
                "classify",
                "predict",
                "--run",
                str(backbone),
                str(inputs / "photos"),
                str(inputs / "photos" / "sub" / "*.jpg"),
                str(inputs / "clip.avi"),
                "--video-stride",
                "2",
                "--json",
                "--device",
                "cpu",
            ]
        )
    captured = capsys.readouterr()
    assert code == 0
    results = json.loads(captured.out)
    assert [r["name"] for r in results] == ["a.jpg", "b.png", "c.jpg"] + [f"clip.avi#frame{k:06d}" for k in (0, 2, 4)]
    assert "read 3 images and 3 frames of 1 video; skipped 1 of 7 inputs: 1 corrupt" in captured.err
    for r in results:
        probs = [t["prob"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    # nothing readable: exit 2, naming it
    with pytest.warns(DataWarning):
        code = main(
            [
                "classify",
                "predict",
                "--run",
                str(backbone),
                str(inputs / "photos" / "broken.jpg"),
            ]
        )
    err = capsys.readouterr().err
    assert code == 2 and "broken.jpg" in err and "Traceback" not in err
