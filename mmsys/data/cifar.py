"""CIFAR-10 from whichever form is on disk, as a :class:`DataSplit` of uint8 ``(N, 3, 32, 32)``.

Accepted at ``root`` (checked in this order):

1. the official python pickles: ``root/cifar-10-batches-py/`` (or that folder itself), read with
   ``torchvision.datasets.CIFAR10``; also fetched there when ``download=True``;
2. an ImageFolder tree ``root/<split>/<class>/*.jpg`` (labels = sorted class folder names);
3. a ``.tar.gz`` of such a tree (``root`` is the archive, or a folder holding one, or a folder
   with a ``cifar10/`` subfolder holding one, e.g. the shared data root). It is extracted once
   into ``cache_dir("cifar10")`` (to a temp folder, then renamed) and reused.

Decoding 60k JPEGs takes seconds, so forms 2 and 3 cache the decoded split as a ``.pt`` file in
``cache_dir("cifar10")`` keyed by the source (archive: path+size+mtime; tree: path, file list and
folder mtimes). Later loads read that file (well under a second) and skip extraction.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .paths import atomic_torch_save, cache_dir, cached_sha256, file_fingerprint, fingerprint
from .split import DataMissingError, DataSplit

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
CACHE_VERSION = 1  # bump when the decoded-cache format or decoding changes


def _missing(root: Path, split: str, why: str = "") -> DataMissingError:
    return DataMissingError(
        f"CIFAR-10 ({split}) not found at {root}{': ' + why if why else ''}. Pass --data-root "
        f"pointing at a cifar-10-batches-py folder (or its parent), a train/test ImageFolder tree "
        f"(<root>/{split}/<class>/*.jpg) or cifar10-jpg.tar.gz (or a folder holding it), "
        f"or add --download to fetch the official release with torchvision.")


# ----------------------------------------------------------------------------- finding the data

def _is_tar(path: Path) -> bool:
    return path.is_file() and path.name.endswith(TAR_SUFFIXES)


def _find_source(root: Path, split: str, depth: int = 0) -> tuple[str, Path] | None:
    """Which form of CIFAR-10 is at ``root``: ("pickle", parent_dir) | ("folder", split_dir) |
    ("tar", archive) | None."""
    if _is_tar(root):
        return "tar", root
    if not root.is_dir():
        return None
    if root.name == "cifar-10-batches-py":
        return "pickle", root.parent
    if (root / "cifar-10-batches-py").is_dir():
        return "pickle", root
    if (root / split).is_dir():
        return "folder", root / split
    tars = sorted(p for p in root.iterdir() if _is_tar(p))
    tars.sort(key=lambda p: "cifar" not in p.name.lower())  # prefer a CIFAR-named archive
    if tars:
        return "tar", tars[0]
    if depth == 0 and (root / "cifar10").is_dir():
        return _find_source(root / "cifar10", split, depth=1)
    return None


def _extract_tar(tar: Path) -> Path:
    """Extract ``tar`` once into the cache (temp folder + rename, so a crash leaves nothing half
    done) and return the extracted folder. Later calls reuse it without checking contents."""
    dest = cache_dir("cifar10") / f"extracted-{file_fingerprint(tar)}"
    if dest.is_dir():
        return dest
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".extract-"))
    try:
        with tarfile.open(tar) as tf:
            tf.extractall(tmp, filter="data")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # lost a race to another process: theirs is as good
                raise
    except tarfile.TarError as e:
        raise DataMissingError(f"could not read the archive {tar}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _split_dir_in(tree: Path, split: str, source: Path) -> Path:
    """``tree/split``, or ``tree/<single top folder>/split`` (archives often wrap one folder)."""
    if (tree / split).is_dir():
        return tree / split
    for sub in sorted(p for p in tree.iterdir() if p.is_dir()):
        if (sub / split).is_dir():
            return sub / split
    raise _missing(source, split, f"the archive has no '{split}/' folder")


# ----------------------------------------------------------------------------- ImageFolder trees

def list_image_folder(split_dir: Path) -> tuple[list[Path], list[int], list[str]]:
    """Files, labels and class names of ``split_dir/<class>/*.(jpg|jpeg|png)``.

    Classes are the sorted sub-folder names; files are sorted within a class, so the order is
    grouped by class and deterministic.
    """
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        names = sorted(f for f in os.listdir(split_dir / name)
                       if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES)
        files += [split_dir / name / f for f in names]
        labels += [label] * len(names)
    return files, labels, classes


def _decode_pil(path: Path) -> torch.Tensor:
    """One image file -> uint8 ``(3, H, W)`` RGB via PIL."""
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


def _decode_jpegs_torchvision(files: list[Path]) -> list[torch.Tensor] | None:
    """Batched libjpeg decode (about 4x faster than PIL here, same pixels); None when this
    torchvision no longer ships its (deprecated since 0.29) image decoders."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg, read_file
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg([read_file(str(f)) for f in files], mode=ImageReadMode.RGB)


def decode_files(files: list[Path], chunk: int = 4096) -> torch.Tensor:
    """Decode image files (all the same size) to uint8 ``(N, 3, H, W)`` RGB.

    JPEGs go through torchvision's batched ``decode_jpeg`` (about 10k CIFAR images per 0.4 s),
    anything else (or JPEGs without torchvision's decoder) through PIL. Grey images are
    replicated to RGB.
    """
    out = []
    for i in range(0, len(files), chunk):
        part = files[i:i + chunk]
        decoded = None
        if all(f.suffix.lower() in (".jpg", ".jpeg") for f in part):
            decoded = _decode_jpegs_torchvision(part)
        out += decoded if decoded is not None else [_decode_pil(f) for f in part]
    sizes = {tuple(x.shape) for x in out}
    if len(sizes) > 1:
        raise ValueError(f"images under {files[0].parent.parent} differ in size: "
                         f"{sorted(sizes)[:4]}; resize them first")
    return torch.stack(out) if out else torch.empty(0, 3, 32, 32, dtype=torch.uint8)


def _folder_key(split_dir: Path, files: list[Path]) -> str:
    """Cache key of a tree: its path, its file list and the mtimes of its class folders."""
    mtimes = [split_dir.stat().st_mtime_ns] + [
        p.stat().st_mtime_ns for p in sorted({f.parent for f in files})]
    names = "\n".join(str(f.relative_to(split_dir)) for f in files)
    return fingerprint("folder", split_dir.resolve(), fingerprint(names), mtimes, CACHE_VERSION)


# ----------------------------------------------------------------------------- public API

def first_per_class(labels: torch.Tensor, limit: int) -> torch.Tensor:
    """Indices of the first ``limit`` items of each class, in their original order.

    labels: ``(N,)`` int64 -> ``(M,)`` int64 with M <= limit * n_classes.
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    for c in labels.unique():
        keep[(labels == c).nonzero().flatten()[:limit]] = True
    return keep.nonzero().flatten()


def _load_pickle(root: Path, split: str, download: bool) -> tuple[torch.Tensor, list, list]:
    from torchvision.datasets import CIFAR10
    try:
        ds = CIFAR10(str(root), train=split == "train", download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise _missing(root, split, str(e)) from e
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, list(ds.targets), list(ds.classes)


def load_cifar10(root, split: str = "train", download: bool = False, limit: int | None = None,
                 cache: bool = True) -> DataSplit:
    """Load one CIFAR-10 split (see the module docstring for the accepted forms).

    Args:
        root: folder or archive path (see above).
        split: "train" (50,000 images) or "test" (10,000).
        download: fetch the official pickles into ``root`` with torchvision when nothing is found.
        limit: keep only the first ``limit`` images of each class (short runs); decodes only those.
        cache: read/write the decoded-tensor cache (forms 2 and 3).

    Returns:
        DataSplit "cifar10/<split>": images ``(N, 3, 32, 32)`` uint8, labels ``(N,)`` int64 in
        0..9, classes in the standard order (airplane ... truck). identity has ``source``,
        ``format`` and, for archives, ``tar_sha256``; ``limit_per_class`` when limited.
        meta has ``from_cache`` and ``cache_file``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser()
    found = _find_source(root, split)
    if found is None:
        if not download:
            raise _missing(root, split)
        found = ("pickle", root)
    kind, src = found
    identity: dict = {"source": str(src)}
    meta: dict = {"from_cache": False, "cache_file": None}

    if kind == "pickle":
        images, labels, classes = _load_pickle(src, split, download)
        identity["format"] = "torchvision-pickle"
        labels = torch.tensor(labels, dtype=torch.int64)
        if limit is not None:
            idx = first_per_class(labels, limit)
            images, labels = images[idx], labels[idx]
    else:
        images, labels, classes, meta = _load_decoded(kind, src, split, limit, cache)
        identity["format"] = "imagefolder" if kind == "folder" else "imagefolder-tar.gz"
        if kind == "tar":
            identity["tar_sha256"] = cached_sha256(src)
    if len(images) == 0:
        raise _missing(root, split, "no images found")
    if limit is not None:
        identity["limit_per_class"] = limit
    return DataSplit(f"cifar10/{split}", images, labels, classes, identity=identity, meta=meta)


def _load_decoded(kind: str, src: Path, split: str, limit: int | None, cache: bool):
    """Forms 2/3: decoded tensors from the cache, or decode (and cache the full split)."""
    files = None
    if kind == "tar":
        key = fingerprint("tar", file_fingerprint(src), split, CACHE_VERSION)
    else:
        files, labels, classes = list_image_folder(src)
        key = _folder_key(src, files)
    cache_file = cache_dir("cifar10") / f"{split}-{key}.pt"
    meta = {"from_cache": False, "cache_file": str(cache_file) if cache else None}

    if cache and cache_file.is_file():
        blob = torch.load(cache_file, weights_only=True)
        images, labels, classes = blob["images"], blob["labels"], blob["classes"]
        meta["from_cache"] = True
        if limit is not None:
            idx = first_per_class(labels, limit)
            images, labels = images[idx], labels[idx]
        return images, labels, classes, meta

    if files is None:
        split_dir = _split_dir_in(_extract_tar(src), split, src)
        files, labels, classes = list_image_folder(split_dir)
    labels = torch.tensor(labels, dtype=torch.int64)
    if limit is not None:  # decode only what is kept; too small to be worth caching
        idx = first_per_class(labels, limit)
        files, labels = [files[i] for i in idx.tolist()], labels[idx]
        meta["cache_file"] = None
        return decode_files(files), labels, classes, meta
    images = decode_files(files)
    if cache and len(images):
        atomic_torch_save({"images": images, "labels": labels, "classes": classes}, cache_file)
    return images, labels, classes, meta
