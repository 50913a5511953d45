"""Issue 18, data rows: a damaged or incomplete dataset is refused in one line naming the file
(DataMissingError: exit 2 through the grader, nothing written), and a corrupt decoded cache is
rebuilt with a warning instead of failing every later run.

Every fixture is built small in tmp_path (the shared data is never touched); caches go to a
temporary ``MMSYS_CACHE``.
"""

import gzip
import json
import os
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmsys.data.cifar as cifar
from mmsys.data.cifar import check_full_size, load_cifar10
from mmsys.data.coco import load_coco_captions
from mmsys.data.mnist import load_mnist
from mmsys.data.paths import read_checked_cache, write_checked_cache
from mmsys.data.split import DataMissingError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["c0", "c1", "c2"]


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("MMSYS_CACHE", str(path))
    return path


def one_line(e) -> str:
    msg = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in msg.strip() and "Traceback" not in msg, msg
    return msg


def write_tree(root: Path, classes=CLASSES, per_class=2, size=8, splits=("train", "test")) -> Path:
    """root/<split>/<class>/NNNN.jpg, small noisy JPEGs."""
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / name / f"{k:04d}.jpg", quality=90)
    return root


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def snapshot(folder: Path) -> dict:
    """File name -> (bytes, mtime) of everything under ``folder``."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- CIFAR-10 files

@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty"])
def test_cifar_bad_jpeg_names_the_file(tmp_path, tmp_cache, damage):
    root = write_tree(tmp_path / "tree")
    bad = root / "test" / "c1" / "0001.jpg"
    if damage == "truncated":
        truncate(bad)
    else:
        bad.write_bytes(os.urandom(300) if damage == "random bytes" else b"")
    with pytest.raises(DataMissingError) as e:
        load_cifar10(root, "test")
    assert str(bad) in one_line(e)
    assert not list(tmp_cache.rglob("*.pt"))  # nothing cached from a failed decode
    assert len(load_cifar10(root, "train")) == 6  # the other split is fine


def test_cifar_bad_png_names_the_file(tmp_path, tmp_cache):
    root = write_tree(tmp_path / "tree", splits=("test",))
    png = root / "test" / "c0" / "0009.png"
    Image.new("RGB", (8, 8)).save(png)
    truncate(png, 0.6)
    with pytest.raises(DataMissingError) as e:
        load_cifar10(root, "test", cache=False)
    assert str(png) in one_line(e)


def test_cifar_mixed_sizes_names_the_odd_file(tmp_path, tmp_cache):
    root = write_tree(tmp_path / "tree", splits=("test",))
    odd = root / "test" / "c2" / "0000.jpg"
    Image.new("RGB", (12, 10)).save(odd)
    with pytest.raises(DataMissingError) as e:
        load_cifar10(root, "test")
    msg = one_line(e)
    assert str(odd) in msg and "12x10" not in msg and "10x12" in msg and "8x8" in msg


def test_cifar_bad_jpeg_in_archive_names_file_and_archive(tmp_path, tmp_cache):
    tree = write_tree(tmp_path / "tree")
    truncate(tree / "test" / "c0" / "0000.jpg")
    tar = tmp_path / "cifar10-jpg.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(tree, arcname=".")
    with pytest.raises(DataMissingError) as e:
        load_cifar10(tar, "test")
    msg = one_line(e)
    assert str(Path("test") / "c0" / "0000.jpg") in msg and str(tar) in msg


# ----------------------------------------------------------------------------- decoded cache

@pytest.mark.parametrize("damage", ["truncated", "random bytes", "changed pixels", "old format"])
def test_cifar_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, tmp_cache, capsys, damage):
    root = write_tree(tmp_path / "tree", splits=("test",))
    first = load_cifar10(root, "test")
    cache_file = Path(first.meta["cache_file"])
    assert cache_file.is_file() and not first.meta["from_cache"]
    if damage == "truncated":
        truncate(cache_file)
    elif damage == "random bytes":
        cache_file.write_bytes(os.urandom(4096))
    else:
        saved = torch.load(cache_file, weights_only=True)
        if damage == "changed pixels":  # a valid file whose contents no longer match the checksum
            saved["data"]["images"][0, 0, 0, 0] ^= 1
        else:  # what CACHE_VERSION 1 wrote: no checksum
            saved = saved["data"]
        torch.save(saved, cache_file)
    capsys.readouterr()
    again = load_cifar10(root, "test")
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning:") and str(cache_file) in err and "rebuilding" in err
    assert len(err.splitlines()) == 1
    assert not again.meta["from_cache"] and torch.equal(again.images, first.images)
    assert torch.equal(again.labels, first.labels)
    third = load_cifar10(root, "test")  # rebuilt: read from the cache again, silently
    assert third.meta["from_cache"] and torch.equal(third.images, first.images)
    assert capsys.readouterr().err == ""


def test_checked_cache_round_trip(tmp_path):
    blob = {"images": torch.arange(24, dtype=torch.uint8).view(2, 3, 2, 2), "labels": torch.tensor([3, 1]),
            "classes": ["a", "b"]}
    write_checked_cache(blob, tmp_path / "c.pt")
    got = read_checked_cache(tmp_path / "c.pt", "test cache")
    assert torch.equal(got["images"], blob["images"]) and got["classes"] == ["a", "b"]
    assert read_checked_cache(tmp_path / "absent.pt", "test cache") is None


# ----------------------------------------------------------------------------- CIFAR-10 counts

def test_check_full_size_says_what_was_found_and_expected():
    classes = [f"k{i}" for i in range(10)]
    check_full_size("test", Path("/d"), torch.arange(10_000) % 10, classes, (32, 32))  # the real thing
    check_full_size("train", Path("/d"), torch.arange(50_000) % 10, classes)
    cases = [
        ("test", torch.arange(60) % 10, classes, None, ["60 images in 10 classes", "10,000 images"]),
        ("train", torch.arange(10_000) % 10, classes, None, ["10,000 images", "50,000 images", "5,000 in each"]),
        ("test", torch.arange(10_000) % 5, classes[:5], None, ["in 5 classes"]),
        ("test", torch.cat([torch.zeros(1001), torch.arange(8999) % 9 + 1]).long(), classes, None,
         ["999 to 1,001 per class"]),
        ("test", torch.arange(10_000) % 10, classes, (64, 64), ["64x64 images", "32x32"]),
    ]
    for split, labels, names, hw, parts in cases:
        with pytest.raises(DataMissingError) as e:
            check_full_size(split, Path("/d"), labels, names, hw)
        msg = one_line(e)
        assert all(p in msg for p in parts + ["/d", "--data-root"]), msg


def test_expect_full_refuses_a_small_tree_and_allows_a_limit_of_a_full_one(tmp_path, tmp_cache, monkeypatch):
    ten = [f"k{i}" for i in range(10)]
    root = write_tree(tmp_path / "tree", classes=ten, per_class=3, size=32, splits=("test",))
    for limit in (None, 1):
        with pytest.raises(DataMissingError) as e:
            load_cifar10(root, "test", limit=limit, expect_full=True)
        assert "30 images in 10 classes" in one_line(e) and "10,000" in str(e.value)
    assert len(load_cifar10(root, "test")) == 30  # without expect_full any tree loads
    # a tree of the "official" size (patched to 30 here) passes, and a limit subsets it afterwards
    monkeypatch.setitem(cifar.CIFAR10_SIZES, "test", 30)
    for _ in range(2):  # decoded, then from the cache
        small = load_cifar10(root, "test", limit=1, expect_full=True)
        assert len(small) == 10
        assert len(load_cifar10(root, "test", expect_full=True)) == 30
    assert small.meta["from_cache"]
    big = write_tree(tmp_path / "big", classes=ten, per_class=3, size=16, splits=("test",))
    with pytest.raises(DataMissingError, match="16x16 images"):
        load_cifar10(big, "test", expect_full=True)


# ----------------------------------------------------------------------------- COCO

def write_coco(root: Path, n=3, split="val2017") -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(1, n + 1):
        images.append({"id": i, "file_name": f"{i:012d}.jpg"})
        anns.append({"id": 10 * i, "image_id": i, "caption": f"picture {i}"})
        Image.new("RGB", (20, 16), (40 * i, 0, 0)).save(root / split / f"{i:012d}.jpg")
    ann = root / "annotations" / f"captions_{split}.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns}, indent=1))
    return ann


def test_coco_truncated_json_names_file_and_position(tmp_path):
    ann = write_coco(tmp_path)
    truncate(ann, 0.6)
    with pytest.raises(DataMissingError) as e:
        load_coco_captions(tmp_path, "val2017", image_size=8)
    msg = one_line(e)
    assert str(ann) in msg and "not valid JSON" in msg and "line" in msg


@pytest.mark.parametrize("section, k, field, entry", [
    ("annotations", 1, "caption", "annotations[1] (id 20) has no 'caption'"),
    ("annotations", 2, "image_id", "annotations[2] (id 30) has no 'image_id'"),
    ("images", 0, "file_name", "images[0] (id 1) has no 'file_name'"),
    ("images", 1, "id", "images[1] has no 'id'"),
])
def test_coco_entry_without_a_field_is_named(tmp_path, section, k, field, entry):
    ann = write_coco(tmp_path)
    data = json.loads(ann.read_text())
    del data[section][k][field]
    ann.write_text(json.dumps(data))
    with pytest.raises(DataMissingError) as e:
        load_coco_captions(tmp_path, "val2017", image_size=8)
    msg = one_line(e)
    assert str(ann) in msg and entry in msg


def test_coco_odd_structure_is_named(tmp_path):
    ann = write_coco(tmp_path)
    for bad, what in (([1, 2], "JSON list"), ({"images": {}}, "'images' is a JSON dict"),
                      ({"images": [], "annotations": [{"id": 1, "image_id": 1, "caption": None}]}, "not a string")):
        ann.write_text(json.dumps(bad))
        with pytest.raises(DataMissingError) as e:
            load_coco_captions(tmp_path, "val2017", image_size=8)
        assert str(ann) in one_line(e) and what in str(e.value)


def test_coco_unreadable_image_names_file_and_entry(tmp_path):
    ann = write_coco(tmp_path)
    bad = tmp_path / "val2017" / f"{2:012d}.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataMissingError) as e:
        load_coco_captions(tmp_path, "val2017", image_size=8)
    msg = one_line(e)
    assert str(bad) in msg and "image id 2" in msg and str(ann) in msg
    bad.unlink()  # the advice in the message: a deleted image is skipped as missing
    d = load_coco_captions(tmp_path, "val2017", image_size=8)
    assert d.meta["image_ids"] == [1, 3] and d.identity["n_missing_images"] == 1


# ----------------------------------------------------------------------------- MNIST

def write_mnist(root: Path, n=6) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, arr in (("t10k-images-idx3-ubyte", np.zeros((n, 28, 28), np.uint8)),
                      ("t10k-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)):
        head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
        (raw / (stem + ".gz")).write_bytes(gzip.compress(head + arr.tobytes()))
    return raw


@pytest.mark.parametrize("damage", ["truncated gzip", "short data", "not gzip", "disagree"])
def test_mnist_damaged_idx_names_the_file(tmp_path, damage):
    raw = write_mnist(tmp_path)
    bad = raw / "t10k-images-idx3-ubyte.gz"
    if damage == "truncated gzip":
        truncate(bad, 0.7)
    elif damage == "short data":
        bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-100]))
    elif damage == "not gzip":
        bad.write_bytes(b"hello, not gzip at all")
    else:
        bad = raw / "t10k-labels-idx1-ubyte.gz"
        head = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 4)
        bad.write_bytes(gzip.compress(head + bytes(4)))
    with pytest.raises(DataMissingError) as e:
        load_mnist(tmp_path, "test")
    assert str(bad) in one_line(e)


# ----------------------------------------------------------------------------- through the grader

def run_grader(*args, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MMSYS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "grader.py"), *args, "--skip-tests", "--no-progress"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def assert_refused(r, out: Path, before: dict, *parts: str) -> None:
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("grader: error:") and "Traceback" not in err, err
    assert all(p in err for p in parts), err
    assert snapshot(out) == before  # nothing written, nothing changed


@pytest.fixture
def out(tmp_path) -> Path:
    """An output folder that already holds files (they must survive). No run markers (report.json
    ...): a folder holding an earlier run is refused before any data is read (test_bad_inputs_grader)."""
    out = tmp_path / "runs"
    (out / "m1-full").mkdir(parents=True)
    (out / "m1-full" / "keep.txt").write_text("a person's notes\n")
    (out / "notes.txt").write_text("keep me\n")
    return out


@pytest.mark.integration
def test_grader_m1_full_refuses_a_60_image_tree(tmp_path, out):
    ten = [f"k{i}" for i in range(10)]
    root = write_tree(tmp_path / "tree", classes=ten, per_class=6, size=32)
    before = snapshot(out)
    r = run_grader("m1", "--profile", "full", "--data-root", str(root), "--out", str(out), cache=tmp_path / "cache")
    assert_refused(r, out, before, "60 images in 10 classes", "50,000 images")


@pytest.mark.integration
def test_grader_m1_full_smoke_names_a_truncated_jpeg(tmp_path, out):
    """--smoke takes any tree (no count check), so the decode error is what stops it."""
    root = write_tree(tmp_path / "tree", size=32)
    bad = root / "train" / "c2" / "0001.jpg"
    truncate(bad)
    before = snapshot(out)
    r = run_grader("m1", "--profile", "full", "--smoke", "--data-root", str(root), "--out", str(out),
                   cache=tmp_path / "cache")
    assert_refused(r, out, before, str(bad))


@pytest.mark.integration
def test_grader_m2_full_names_a_truncated_coco_json(tmp_path, out):
    write_coco(tmp_path / "coco", split="train2017")
    ann = write_coco(tmp_path / "coco", split="val2017")
    truncate(ann, 0.5)
    before = snapshot(out)
    r = run_grader("m2", "--profile", "full", "--data-root", str(tmp_path / "coco"), "--out", str(out),
                   cache=tmp_path / "cache")
    assert_refused(r, out, before, str(ann), "not valid JSON")
