"""ImageFolderDataset on tiny folders written in tmp_path."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sppnet.data import DataWarning, ImageError, ImageFolderDataset, pil_to_tensor


def _image(path, value, size=(6, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "set"
    _image(root / "train" / "zebra" / "a.png", 10)
    _image(root / "train" / "zebra" / "sub" / "b.JPEG", 20)  # nested, upper-case suffix
    _image(root / "train" / "apple" / "c.bmp", 30)
    _image(root / "train" / "apple" / "d.PNG", 40)
    (root / "train" / "apple" / "notes.txt").write_text("ignored")
    _image(root / "train" / "apple" / ".hidden.png", 50)
    (root / "train" / ".cache").mkdir()
    _image(root / "val" / "apple" / "e.webp", 60)
    _image(root / "val" / "zebra" / "f.tif", 70)
    return root


def test_lists_sorted_classes_and_images(folder):
    ds = ImageFolderDataset(folder, "train")
    assert ds.classes == ["apple", "zebra"] and ds.class_to_idx == {"apple": 0, "zebra": 1}
    names = [p.split("/")[-1] for p, _ in ds.samples]
    assert names == ["c.bmp", "d.PNG", "a.png", "b.JPEG"]
    assert ds.targets == [0, 0, 1, 1] and len(ds) == 4
    image, label = ds[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 0
    assert np.asarray(image)[0, 0].tolist() == [40, 40, 40]
    val = ImageFolderDataset(folder, "val", transform=pil_to_tensor)
    tensor, label = val[1]
    assert label == 1 and tensor.shape == (3, 4, 6)
    assert torch.allclose(tensor, torch.full_like(tensor, 70 / 255))


def test_explicit_classes_define_labels(folder):
    ds = ImageFolderDataset(folder, "train", classes=["zebra", "apple"])
    assert ds.targets == [0, 0, 1, 1] and ds[0][1] == 0
    only = ImageFolderDataset(folder, "train", classes=["apple"])
    assert len(only) == 2
    with pytest.raises(ValueError, match="pear"):
        ImageFolderDataset(folder, "train", classes=["apple", "pear"])
    with pytest.raises(ValueError, match="duplicates"):
        ImageFolderDataset(folder, "train", classes=["apple", "apple"])


def test_construction_errors_name_the_path(tmp_path, folder):
    with pytest.raises(ValueError, match=str(tmp_path / "nowhere")):
        ImageFolderDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"test does not exist; found \['train', 'val'\]"):
        ImageFolderDataset(folder, "test")
    (folder / "empty").mkdir()
    with pytest.raises(ValueError, match="has no class folders"):
        ImageFolderDataset(folder, "empty")
    (folder / "val" / "kiwi").mkdir()
    (folder / "val" / "kiwi" / "readme.txt").write_text("no pictures")
    with pytest.raises(ValueError, match=r"val/kiwi contains no image files"):
        ImageFolderDataset(folder, "val")


def test_bad_files_fail_on_load_and_scan_drops_them(folder):
    bad_text = folder / "train" / "zebra" / "text.jpg"
    bad_text.write_text("hello")
    good = folder / "train" / "apple" / "c.bmp"
    cut = folder / "train" / "apple" / "cut.png"
    cut.write_bytes(good.read_bytes()[:40])
    ds = ImageFolderDataset(folder, "train")
    assert len(ds) == 6
    index = [p for p, _ in ds.samples].index(str(bad_text))
    with pytest.raises(ImageError, match="text.jpg"):
        ds[index]
    with pytest.warns(DataWarning) as caught:
        counter = ds.scan()
    assert sorted(str(w.message).split(":")[0] for w in caught) == sorted([f"skipping {cut}", f"skipping {bad_text}"])
    assert counter.summary(6) == "skipped 2 of 6 images: 1 corrupt, 1 not an image"
    assert len(ds) == 4 and str(bad_text) not in [p for p, _ in ds.samples]
    assert all(ds[i][0].size == (6, 4) for i in range(len(ds)))


def test_scan_refuses_to_empty_a_class(folder):
    (folder / "val" / "zebra" / "f.tif").write_bytes(b"junk")
    ds = ImageFolderDataset(folder, "val")
    with pytest.warns(DataWarning), pytest.raises(ValueError, match=r"\['zebra'\]"):
        ds.scan()


def test_scan_applies_the_pixel_limit(folder):
    ds = ImageFolderDataset(folder, "train")
    with pytest.warns(DataWarning), pytest.raises(ValueError, match="too large"):
        ds.scan(max_pixels=10)  # every image is 6x4 = 24 pixels


def test_pickles_and_loads_in_worker_processes(folder):
    ds = ImageFolderDataset(folder, "train", transform=pil_to_tensor)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.samples == ds.samples and clone.classes == ds.classes
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    labels = torch.cat([b[1] for b in batches]).tolist()
    means = torch.cat([b[0] for b in batches]).mean(dim=(1, 2, 3)) * 255
    assert labels == [0, 0, 1, 1]
    assert torch.allclose(means, torch.tensor([30.0, 40.0, 10.0, 20.0]), atol=1.0)
