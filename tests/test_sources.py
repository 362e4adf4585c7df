"""iter_sources / resolve_sources / batched on real files in tmp_path: images, folders, globs and videos
(MJPG in .avi, written with cv2.VideoWriter), with bad members among good ones."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

from sppnet.data.images import DataWarning
from sppnet.data.sources import SourceError, SourceReport, batched, iter_sources, resolve_sources


def _image(path, value: int, size=(12, 9)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def _video(path, n: int = 10, size=(32, 24), fps: float = 10.0):
    """Frame i is uniformly grey with value 10 + 20 i (readable back through MJPG within a few levels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((size[1], size[0], 3), 10 + 20 * i, np.uint8))
    writer.release()
    return path


def _frame_id(item) -> int:
    """The frame a decoded grey picture was written as."""
    return round((float(item.array().mean()) - 10) / 20)


def _corrupt_frames(path, frames: list[int]):
    """Overwrites the JPEG data of the given frames, from after the start marker to the end marker
    (``FF D9``, which cannot occur inside JPEG data); the AVI chunks around them stay intact."""
    data = bytearray(path.read_bytes())
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
    for k in frames:
        end = data.index(b"\xff\xd9", starts[k])
        data[starts[k] + 2 : end] = bytes((j * 7) & 0xFF for j in range(end - starts[k] - 2))
    path.write_bytes(bytes(data))
    return path


def _read(sources, **kwargs):
    report = SourceReport()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(iter_sources(sources, report=report, **kwargs))
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    return items, report, messages


def test_folder_of_mixed_files_keeps_the_good_ones(tmp_path):
    folder = tmp_path / "mixed"
    _image(folder / "d.png", 50)
    _image(folder / "a.jpg", 100)
    _image(folder / "sub" / "c.png", 150)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    items, report, messages = _read([folder])
    assert [i.name for i in items] == ["a.jpg", "d.png"]  # sorted, the bad ones between; sub-folder not searched
    assert [i.stem for i in items] == ["a", "d"]
    assert [int(i.array()[0, 0, 0]) for i in items] == [pytest.approx(100, abs=3), 50]
    assert report.images == 2 and report.frames == 0 and report.ignored == 1
    assert report.skipped.counts == {"corrupt": 1, "empty": 1}
    assert len(messages) == 2 and any("broken.jpg" in m for m in messages) and any("empty.png" in m for m in messages)
    assert report.summary() == "read 2 images; skipped 2 of 4 inputs: 1 corrupt, 1 empty; ignored 1 other file"
    items, report, _ = _read([folder], recursive=True)
    assert [i.name for i in items] == ["a.jpg", "d.png", "sub/c.png"]
    assert report.ignored == 1 and report.images == 3
    assert items[2].stem == "sub/c" and items[2].source == str(folder)
    with pytest.raises(SourceError, match="broken.jpg") as err:
        list(iter_sources([folder], strict=True))
    assert err.value.reason == "corrupt"


def test_globs_files_and_unique_names(tmp_path, monkeypatch):
    _image(tmp_path / "x" / "photo.jpg", 10)
    _image(tmp_path / "x" / "photo.png", 20)
    _image(tmp_path / "y" / "photo.jpg", 30)
    _image(tmp_path / "y" / "deep" / "z.jpg", 40)
    (tmp_path / "x" / "readme.md").write_text("hi")
    items, report, _ = _read(
        [tmp_path / "x" / "photo.jpg", str(tmp_path / "*" / "photo.*"), str(tmp_path / "y" / "**" / "*.jpg")]
    )
    got = [(i.name, i.stem, int(i.array()[0, 0, 1])) for i in items]
    # The explicit file first; the glob's matches sorted and named below its fixed folder;
    # the first file seen twice is read once; equal stems get ~2, ~3.
    assert [g[:2] for g in got] == [
        ("photo.jpg", "photo"),
        ("x/photo.png", "x/photo"),
        ("y/photo.jpg", "y/photo"),
        ("deep/z.jpg", "deep/z"),
    ]
    assert report.duplicates == 2 and report.images == 4
    items, _, _ = _read([tmp_path / "x" / "photo.jpg", tmp_path / "x" / "photo.png", tmp_path / "y" / "photo.jpg"])
    assert [(i.name, i.stem) for i in items] == [
        ("photo.jpg", "photo"),
        ("photo~2.png", "photo~2"),
        ("photo~3.jpg", "photo~3"),
    ]
    assert len({i.stem for i in items}) == 3
    # A relative glob, from the working folder; an explicit file is an image whatever its suffix.
    monkeypatch.chdir(tmp_path / "x")
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(tmp_path / "x" / "picture.dat", format="PNG")
    items, report, messages = _read(["*.jpg", "*.png", "picture.dat", "readme.md"])
    assert [(i.name, i.stem) for i in items] == [
        ("photo.jpg", "photo"),
        ("photo~2.png", "photo~2"),
        ("picture.dat", "picture.dat"),
    ]
    assert report.skipped.counts == {"not an image": 1} and "readme.md" in messages[0]


def test_bad_sources_are_named_and_the_rest_is_read(tmp_path):
    good = _image(tmp_path / "good.png", 7)
    (tmp_path / "empty").mkdir()
    _image(tmp_path / "nested" / "deep" / "n.png", 1)
    (tmp_path / "junk.avi").write_bytes(b"garbage" * 50)
    sources = [
        tmp_path / "missing.jpg",
        tmp_path / "empty",
        str(tmp_path / "*.nothing"),
        tmp_path / "nested",
        tmp_path / "junk.avi",
        good,
    ]
    items, report, messages = _read(sources)
    assert [i.name for i in items] == ["good.png"]
    assert report.skipped.counts == {"empty folder": 2, "missing": 1, "unmatched glob": 1, "unreadable video": 1}
    assert report.skipped.paths == [str(s) for s in sources[:5]]
    assert any("sub-folders" in m and "nested" in m for m in messages)  # the hint for a non-recursive folder
    for bad, reason in zip(
        sources[:5], ["missing", "empty folder", "unmatched glob", "empty folder", "unreadable video"]
    ):
        with pytest.raises(SourceError) as err:
            iter_sources([bad, good], strict=True)  # raised on resolution, before any decoding
        assert err.value.reason == reason and str(bad) in str(err.value)
    with pytest.raises(SourceError, match="no image or video to read") as err, pytest.warns(DataWarning):
        iter_sources(sources[:5])
    assert err.value.reason == "nothing read" and "skipped 5" in str(err.value)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SourceError, match="no image or frame could be read") as err, pytest.warns(DataWarning):
        list(iter_sources([tmp_path / "bad.png"]))
    assert "bad.png" in str(err.value) and "1 not an image" in str(err.value)
    _video(tmp_path / "movies" / "m.avi", n=2)
    with pytest.raises(SourceError, match="holds 1 video file: name it") as err:
        iter_sources([tmp_path / "movies"], strict=True)
    assert err.value.reason == "empty folder"
    with pytest.raises(SourceError, match="no SOURCE"):
        iter_sources([])


def test_video_frames_in_order_with_names_and_timestamps(tmp_path):
    clip = _video(tmp_path / "clip.avi", n=10, fps=5.0)
    still = _image(tmp_path / "still.png", 200)
    items, report, messages = _read([clip, still])
    assert messages == []
    frames = items[:10]
    assert [i.name for i in frames] == [f"clip.avi#frame{k:06d}" for k in range(10)]
    assert [i.stem for i in frames] == [f"clip_frame{k:06d}" for k in range(10)]
    assert [_frame_id(i) for i in frames] == list(range(10))
    assert [i.frame_index for i in frames] == list(range(10))
    assert [i.timestamp for i in frames] == pytest.approx([k / 5.0 for k in range(10)])
    assert all(i.image.size == (32, 24) and i.image.mode == "RGB" and i.is_frame for i in frames)
    assert items[10].name == "still.png" and not items[10].is_frame
    assert report.frames == 10 and report.videos == 1 and report.images == 1 and report.expected == 11
    assert report.summary() == "read 1 image and 10 frames of 1 video"
    strided, report, _ = _read([clip], video_stride=3)
    assert [i.frame_index for i in strided] == [0, 3, 6, 9] == [_frame_id(i) for i in strided]
    assert report.expected == 4
    with pytest.raises(ValueError, match="video_stride"):
        iter_sources([clip], video_stride=0)


def test_corrupt_frames_are_skipped_and_counted(tmp_path):
    clip = _corrupt_frames(_video(tmp_path / "clip.avi", n=10), [3, 6])
    items, report, messages = _read([clip])
    # Every other frame comes through, numbered as written (not shifted by the failures).
    assert [i.frame_index for i in items] == [0, 1, 2, 4, 5, 7, 8, 9]
    assert [_frame_id(i) for i in items] == [i.frame_index for i in items]
    assert report.skipped.counts == {"corrupt frame": 2}
    assert report.skipped.paths == [f"{clip}#frame000003", f"{clip}#frame000006"]
    assert len(messages) == 2 and "clip.avi#frame000003" in messages[0]
    assert report.summary() == "read 0 images and 8 frames of 1 video; skipped 2 of 10 inputs: 2 corrupt frames"
    with pytest.raises(SourceError, match="frame000003") as err:
        _read([clip], strict=True)
    assert err.value.reason == "corrupt frame"
    # Frames corrupt up to the end: one "truncated video" skip.
    tail = tmp_path / "tail.avi"
    _corrupt_frames(_video(tail, n=6), [4, 5])
    items, report, _ = _read([tail])
    assert [i.frame_index for i in items] == [0, 1, 2, 3]
    assert report.skipped.counts == {"truncated video": 1} and report.skipped.paths == [f"{tail}#frame000004"]


def test_batched():
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 2)) == []
    assert list(batched("ab", 5)) == [["a", "b"]]
    for n in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch size"):
            list(batched([1], n))


def test_resolve_then_iterate_reuses_the_entries(tmp_path):
    _image(tmp_path / "a.png", 1)
    clip = _video(tmp_path / "v.avi", n=4)
    report = SourceReport()
    entries = resolve_sources([tmp_path, clip], report=report)
    assert [(e.name, e.kind, e.frames, e.size) for e in entries] == [
        ("a.png", "image", None, None),
        ("v.avi", "video", 4, (32, 24)),
    ]
    items = list(iter_sources(entries, report=report))
    assert [i.name for i in items] == ["a.png"] + [f"v.avi#frame{k:06d}" for k in range(4)]
    assert report.expected == 5 and report.read == 5
    big = SourceReport()
    with pytest.warns(DataWarning, match="exceed the limit"):
        entries = resolve_sources([tmp_path, clip], max_pixels=32 * 24 - 1, report=big)
    assert [e.name for e in entries] == ["a.png"] and big.skipped.counts == {"too large": 1}
