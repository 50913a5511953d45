"""Real-data loaders: CIFAR-10, MNIST, COCO captions.

Synthetic inputs built in tmp_path check the parsing; tests on the shared offline data skip when
it is absent (it is never required).
"""

import gzip
import hashlib
import json
import struct
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from mmsys.data.cifar import CIFAR10_CLASSES, first_per_class, load_cifar10
from mmsys.data.coco import load_coco_captions, resize_center_crop
from mmsys.data.mnist import load_mnist, read_idx
from mmsys.data.paths import cache_dir, shared_data_root
from mmsys.data.split import DataMissingError

SHARED = shared_data_root()
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared data folder not found "
                                  "(set MMSYS_SHARED_DATA or place it at ../shared/data)")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("MMSYS_CACHE", str(path))
    return path


# ----------------------------------------------------------------------------- paths

def test_paths_honour_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSYS_CACHE", str(tmp_path / "c"))
    assert cache_dir("x", "y") == tmp_path / "c" / "x" / "y" and (tmp_path / "c/x/y").is_dir()
    monkeypatch.setenv("MMSYS_SHARED_DATA", str(tmp_path))
    assert shared_data_root() == tmp_path
    monkeypatch.setenv("MMSYS_SHARED_DATA", str(tmp_path / "absent"))
    assert shared_data_root() is None


# ----------------------------------------------------------------------------- CIFAR-10

COLOURS = {"zebra": (250, 10, 10), "apple": (10, 250, 10), "moth": (10, 10, 250)}


def _write_tree(root, counts={"zebra": 3, "apple": 2, "moth": 1}, suffix=".jpg"):
    """root/{train,test}/<class>/NNNN<suffix>, 8x8 images of one colour per class."""
    for split in ("train", "test"):
        for name, n in counts.items():
            (root / split / name).mkdir(parents=True)
            for k in range(n):
                arr = np.empty((8, 8, 3), np.uint8)
                arr[:] = COLOURS[name]
                arr[0, 0] = k  # make files differ
                Image.fromarray(arr).save(root / split / name / f"{k:04d}{suffix}", quality=95)
    return root


def _check_tree_split(d):
    assert d.name == "cifar10/test"
    assert d.classes == ["apple", "moth", "zebra"]  # sorted folder names
    assert d.labels.tolist() == [0, 0, 1, 2, 2, 2] and d.labels.dtype == torch.int64
    assert d.images.shape == (6, 3, 8, 8) and d.images.dtype == torch.uint8
    for img, label in zip(d.images, d.labels):
        want = torch.tensor(COLOURS[d.classes[label]], dtype=torch.float).view(3, 1, 1)
        assert (img[:, 4:, 4:].float() - want).abs().max() < 12


def test_cifar_missing_root_message(tmp_path, tmp_cache):
    where = tmp_path / "nowhere"
    with pytest.raises(DataMissingError) as e:
        load_cifar10(where, "test")
    msg = str(e.value)
    for part in (str(where), "cifar-10-batches-py", "tar.gz", "--download", "--data-root"):
        assert part in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataMissingError, match="empty"):
        load_cifar10(tmp_path / "empty", "train")
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, "valid")


def test_cifar_broken_pickle_folder(tmp_path, tmp_cache):
    (tmp_path / "cifar-10-batches-py").mkdir()
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        with pytest.raises(DataMissingError, match="corrupted"):
            load_cifar10(root, "test")


def test_cifar_image_folder_and_cache(tmp_path, tmp_cache):
    root = _write_tree(tmp_path / "tree")
    d = load_cifar10(root, "test")
    _check_tree_split(d)
    assert d.identity["format"] == "imagefolder" and not d.meta["from_cache"]
    again = load_cifar10(root, "test")
    assert again.meta["from_cache"] and torch.equal(again.images, d.images)
    assert torch.equal(again.labels, d.labels) and again.sha256() == d.sha256()
    assert len(load_cifar10(root, "train")) == 6
    # adding a file changes the key: no stale cache
    (root / "test" / "moth" / "0009.jpg").write_bytes((root / "test/moth/0000.jpg").read_bytes())
    grown = load_cifar10(root, "test")
    assert len(grown) == 7 and not grown.meta["from_cache"]


def test_cifar_png_tree_exact(tmp_path, tmp_cache):
    root = _write_tree(tmp_path / "tree", suffix=".png")
    d = load_cifar10(root, "test", cache=False)
    assert d.meta["cache_file"] is None and not list(tmp_cache.rglob("*.pt"))
    assert d.images[0, :, 0, 0].tolist() == [0, 0, 0]  # apple 0000: corner pixel k = 0
    assert d.images[1, :, 0, 0].tolist() == [1, 1, 1]  # apple 0001
    assert d.images[1, :, 1, 1].tolist() == list(COLOURS["apple"])  # lossless


def test_cifar_limit_per_class(tmp_path, tmp_cache):
    root = _write_tree(tmp_path / "tree")
    for _ in range(2):  # uncached (decodes only the subset), then from the full cache
        d = load_cifar10(root, "test", limit=2)
        assert d.labels.tolist() == [0, 0, 1, 2, 2] and d.identity["limit_per_class"] == 2
        load_cifar10(root, "test")
    assert d.meta["from_cache"]
    assert first_per_class(torch.tensor([2, 0, 2, 0, 2, 1]), 1).tolist() == [0, 1, 5]


def test_cifar_tar_gz(tmp_path, tmp_cache):
    tree = _write_tree(tmp_path / "tree")
    (tmp_path / "data").mkdir()
    tar = tmp_path / "data" / "cifar10-jpg.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(tree, arcname=".")
    sha = hashlib.sha256(tar.read_bytes()).hexdigest()

    d = load_cifar10(tar, "test")
    _check_tree_split(d)
    assert d.identity["format"] == "imagefolder-tar.gz" and d.identity["tar_sha256"] == sha
    extracted = list((tmp_cache / "cifar10").glob("extracted-*"))
    assert len(extracted) == 1 and (extracted[0] / "train" / "zebra").is_dir()
    assert not list((tmp_cache / "cifar10").glob(".extract-*"))  # temp dir renamed away
    # a folder holding the archive works too; train reuses the one extraction
    assert len(load_cifar10(tmp_path / "data", "train")) == 6
    assert list((tmp_cache / "cifar10").glob("extracted-*")) == extracted
    # once decoded, the extraction is not needed any more
    for p in sorted(extracted[0].rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    extracted[0].rmdir()
    again = load_cifar10(tmp_path / "data", "test")
    assert again.meta["from_cache"] and torch.equal(again.images, d.images)
    assert again.identity["tar_sha256"] == sha


@needs_shared
@pytest.mark.slow
def test_cifar_shared_data():
    """First run decodes the archive (~15 s); later runs read the decoded cache."""
    root = SHARED / "cifar10"
    if not root.is_dir():
        pytest.skip(f"no cifar10/ in {SHARED}")
    for split, n in (("test", 1000), ("train", 5000)):
        d = load_cifar10(root, split)
        assert d.name == f"cifar10/{split}" and d.images.shape == (10 * n, 3, 32, 32)
        assert d.classes == CIFAR10_CLASSES and d.labels.bincount().tolist() == [n] * 10
        assert d.identity["tar_sha256"].startswith("2abeb8d2")
        t = time.perf_counter()
        again = load_cifar10(root, split)
        assert again.meta["from_cache"] and time.perf_counter() - t < 5
        assert torch.equal(again.images[::997], d.images[::997])
    small = load_cifar10(SHARED, "test", limit=10)
    assert len(small) == 100 and small.labels.bincount().tolist() == [10] * 10


# ----------------------------------------------------------------------------- MNIST

def _idx_bytes(arr: np.ndarray, type_byte: int = 0x08) -> bytes:
    head = bytes([0, 0, type_byte, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def test_read_idx_formats(tmp_path):
    ints = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 1000
    (tmp_path / "a-idx2-int").write_bytes(_idx_bytes(ints, 0x0C))
    assert read_idx(tmp_path / "a-idx2-int").tolist() == ints.tolist()
    u8 = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "b.gz").write_bytes(gzip.compress(_idx_bytes(u8)))
    got = read_idx(tmp_path / "b.gz")
    assert got.dtype == torch.uint8 and got.tolist() == u8.tolist()
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(ValueError, match="5"):
        read_idx(tmp_path / "bad")
    (tmp_path / "junk").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not an idx"):
        read_idx(tmp_path / "junk")


def _write_mnist(root, n=12, gz=True):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = (np.arange(n * 28 * 28) % 251).astype(np.uint8).reshape(n, 28, 28)
    labels = (np.arange(n) % 3).astype(np.uint8)
    for stem, arr in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        data = _idx_bytes(arr)
        if gz:
            (raw / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (raw / stem).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_synthetic(tmp_path, gz):
    images, labels = _write_mnist(tmp_path, gz=gz)
    d = load_mnist(tmp_path, "test")
    assert d.name == "mnist/test" and d.classes == [str(i) for i in range(10)]
    assert d.images.shape == (12, 3, 28, 28) and d.images.dtype == torch.uint8
    assert all(torch.equal(d.images[:, c], torch.from_numpy(images)) for c in range(3))
    assert d.labels.tolist() == labels.tolist() and d.labels.dtype == torch.int64
    assert d.identity["format"] == ("idx.gz" if gz else "idx")
    small = load_mnist(tmp_path / "MNIST" / "raw", "test", limit=2, size=14)
    assert small.images.shape == (6, 3, 14, 14) and small.labels.tolist() == [0, 1, 2] * 2


def test_mnist_missing(tmp_path):
    with pytest.raises(DataMissingError) as e:
        load_mnist(tmp_path, "train")
    assert "train-images-idx3-ubyte" in str(e.value) and str(tmp_path) in str(e.value)
    assert "download" in str(e.value)


@needs_shared
def test_mnist_shared_data():
    d = load_mnist(SHARED / "mnist", "test")
    assert d.images.shape == (10000, 3, 28, 28) and len(d.labels) == 10000
    assert d.labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert d.labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert len(load_mnist(SHARED / "mnist", "train", limit=5)) == 50


# ----------------------------------------------------------------------------- COCO

def _write_coco(root):
    """3 annotated images (ids 7, 3, 5); image 5's file is missing."""
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    imgs, anns = [], []
    for k, (iid, present) in enumerate(((7, True), (3, True), (5, False))):
        name = f"{iid:012d}.jpg"
        imgs.append({"id": iid, "file_name": name, "width": 60, "height": 20})
        for j in range(2):
            anns.append({"id": 100 - 10 * k - j, "image_id": iid, "caption": f"  img {iid} cap {j}\n"})
        if present:  # red | green | blue thirds: the center crop is green
            arr = np.zeros((20, 60, 3), np.uint8)
            arr[:, :20, 0] = arr[:, 20:40, 1] = arr[:, 40:, 2] = 255
            Image.fromarray(arr).save(root / "val2017" / name, quality=95)
    (root / "annotations" / "captions_val2017.json").write_text(
        json.dumps({"images": imgs, "annotations": anns, "info": {}, "licenses": []}))


def test_coco_synthetic(tmp_path, capsys):
    _write_coco(tmp_path)
    d = load_coco_captions(tmp_path, "val2017", image_size=16)
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced
    assert d.name == "coco/val2017" and d.images.shape == (2, 3, 16, 16)
    assert d.meta["image_ids"] == [3, 7]
    assert d.captions == [["img 3 cap 1", "img 3 cap 0"], ["img 7 cap 1", "img 7 cap 0"]]
    for key, want in (("n_annotated_images", 3), ("n_missing_images", 1), ("n_loaded", 2)):
        assert d.identity[key] == want and d.meta[key] == want
    mean = d.images[:, :, 4:12, 4:12].float().mean(dim=(0, 2, 3))
    assert mean[1] > 230 and mean[0] < 25 and mean[2] < 25
    assert len(load_coco_captions(tmp_path, "val2017", image_size=8, limit=1)) == 1


def test_resize_center_crop_sizes():
    for w, h in ((60, 20), (20, 61), (33, 33), (5, 9)):
        assert resize_center_crop(Image.new("RGB", (w, h)), 16).size == (16, 16)


def test_coco_missing(tmp_path):
    with pytest.raises(DataMissingError) as e:
        load_coco_captions(tmp_path / "coco", "train2017")
    assert "captions_train2017.json" in str(e.value) and "cocodataset.org" in str(e.value)
    _write_coco(tmp_path)
    for f in (tmp_path / "val2017").iterdir():
        f.unlink()
    with pytest.raises(DataMissingError, match="none of the 3 images"):
        load_coco_captions(tmp_path, "val2017")


@needs_shared
def test_coco_shared_data():
    root = SHARED / "coco-mini"
    train = load_coco_captions(root, "train2017", image_size=32)
    assert len(train) == 80 and sum(map(len, train.captions)) == 400
    assert train.images.shape == (80, 3, 32, 32) and train.identity["n_missing_images"] == 0
    val = load_coco_captions(root, "val2017", image_size=32)
    assert len(val) == 159 and sum(map(len, val.captions)) == 795
    full = load_coco_captions(root, "val2017", image_size=32, limit=4,
                              annotations=root / "annotations" / "captions_val2017_full.json")
    assert full.identity["n_annotated_images"] == 5000
    assert full.identity["n_missing_images"] == 4841 and full.identity["n_loaded"] == 4
    assert full.meta["image_ids"] == val.meta["image_ids"][:4]
    assert full.captions == val.captions[:4] and torch.equal(full.images, val.images[:4])
