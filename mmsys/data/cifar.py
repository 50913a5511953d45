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
folder mtimes), with a checksum of its contents. Later loads read that file (well under a second)
and skip extraction; a cache that fails to load or to match its checksum is rebuilt, with a
warning. An image that cannot be decoded, or differs in size from the rest, is reported by name
(DataMissingError); ``expect_full=True`` refuses a split that is not the complete official one.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .paths import (cache_dir, cached_sha256, file_fingerprint, fingerprint, read_checked_cache,
                    write_checked_cache)
from .split import DataMissingError, DataSplit

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
CIFAR10_SIZES = {"train": 50_000, "test": 10_000}  # the official release, 10 equal classes
CACHE_VERSION = 2  # bump when the decoded-cache format or decoding changes (2: checksummed)


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
    """One image file -> uint8 ``(3, H, W)`` RGB via PIL; DataMissingError naming the file when
    it cannot be read or decoded (truncated, not an image, unreadable)."""
    try:
        with Image.open(path) as img:
            return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataMissingError(f"cannot decode the image {path}: {reason}; replace or remove that "
                               f"file (or restore the dataset from its original copy)") from e


def _decode_jpegs_torchvision(files: list[Path]) -> list[torch.Tensor] | None:
    """Batched libjpeg decode (about 4x faster than PIL here, same pixels); None when this
    torchvision no longer ships its (deprecated since 0.29) image decoders. When a file of the
    batch fails, each is decoded alone and the one libjpeg refuses goes to PIL (which decodes it
    or raises DataMissingError naming it)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg, read_file
    except ImportError:
        return None

    def one(f: Path) -> torch.Tensor:
        try:
            return decode_jpeg(read_file(str(f)), mode=ImageReadMode.RGB)
        except RuntimeError:  # truncated / not a JPEG / empty / unreadable file
            return _decode_pil(f)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return decode_jpeg([read_file(str(f)) for f in files], mode=ImageReadMode.RGB)
        except RuntimeError:
            return [one(f) for f in files]


def _check_same_size(files: list[Path], images: list[torch.Tensor]) -> None:
    """DataMissingError naming the first file whose size differs from the most common one."""
    sizes = Counter(tuple(x.shape) for x in images)
    if len(sizes) > 1:
        common = sizes.most_common(1)[0][0]
        odd = next(f for f, x in zip(files, images) if tuple(x.shape) != common)
        shape = "x".join(map(str, next(x.shape for x in images if tuple(x.shape) != common)[1:]))
        raise DataMissingError(f"the image {odd} is {shape} pixels but {sizes[common]:,} other "
                               f"images of the split are {common[1]}x{common[2]}; every image of a "
                               f"split must be the same size: resize or remove it")


def decode_files(files: list[Path], chunk: int = 4096) -> torch.Tensor:
    """Decode image files (all the same size) to uint8 ``(N, 3, H, W)`` RGB.

    JPEGs go through torchvision's batched ``decode_jpeg`` (about 10k CIFAR images per 0.4 s),
    anything else (or JPEGs without torchvision's decoder) through PIL. Grey images are
    replicated to RGB. Raises DataMissingError naming the file for an image that cannot be
    decoded or whose size differs from the others.
    """
    out = []
    for i in range(0, len(files), chunk):
        part = files[i:i + chunk]
        decoded = None
        if all(f.suffix.lower() in (".jpg", ".jpeg") for f in part):
            decoded = _decode_jpegs_torchvision(part)
        out += decoded if decoded is not None else [_decode_pil(f) for f in part]
    _check_same_size(files, out)
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


def _full_size_error(split: str, where: Path, found: str) -> DataMissingError:
    want = CIFAR10_SIZES[split]
    return DataMissingError(
        f"CIFAR-10 {split} at {where} has {found}; the full profile is measured on the complete "
        f"{split} split: {want:,} images, {want // 10:,} in each of 10 classes, 32x32. Point "
        f"--data-root at the whole dataset (or add --download), or use --smoke for a short proof")


def _check_image_size(split: str, where: Path, image_hw: tuple) -> None:
    if tuple(image_hw) != (32, 32):
        raise _full_size_error(split, where, f"{image_hw[0]}x{image_hw[1]} images")


def check_full_size(split: str, where: Path, labels: torch.Tensor, classes: list,
                    image_hw: tuple | None = None) -> None:
    """DataMissingError unless ``labels``/``classes`` (and ``image_hw``, when given) are those of
    the complete official split: 50,000 train / 10,000 test images, 10 classes of equal size,
    32x32. The message says what was found and what was expected."""
    counts = torch.bincount(labels, minlength=len(classes)).tolist() if len(labels) else [0]
    uneven = len(set(counts)) > 1
    if len(labels) != CIFAR10_SIZES[split] or len(classes) != len(CIFAR10_CLASSES) or uneven:
        raise _full_size_error(split, where, f"{len(labels):,} images in {len(classes)} classes"
                               + (f" ({min(counts):,} to {max(counts):,} per class)" if uneven else ""))
    if image_hw is not None:
        _check_image_size(split, where, image_hw)


def load_cifar10(root, split: str = "train", download: bool = False, limit: int | None = None,
                 cache: bool = True, expect_full: bool = False) -> DataSplit:
    """Load one CIFAR-10 split (see the module docstring for the accepted forms).

    Args:
        root: folder or archive path (see above).
        split: "train" (50,000 images) or "test" (10,000).
        download: fetch the official pickles into ``root`` with torchvision when nothing is found.
        limit: keep only the first ``limit`` images of each class (short runs); decodes only those.
        cache: read/write the decoded-tensor cache (forms 2 and 3).
        expect_full: refuse (DataMissingError) a split whose size on disk, before ``limit``, is
            not the official one (:func:`check_full_size`): what graders measure on.

    Returns:
        DataSplit "cifar10/<split>": images ``(N, 3, 32, 32)`` uint8, labels ``(N,)`` int64 in
        0..9, classes in the standard order (airplane ... truck). identity has ``source``,
        ``format`` and, for archives, ``tar_sha256``; ``limit_per_class`` when limited.
        meta has ``from_cache`` and ``cache_file``.

    Raises:
        DataMissingError: nothing found; an image that cannot be decoded or differs in size
            (the message names the file); with ``expect_full``, a split of the wrong size.
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
        if expect_full:
            check_full_size(split, src, labels, classes, tuple(images.shape[-2:]))
        if limit is not None:
            idx = first_per_class(labels, limit)
            images, labels = images[idx], labels[idx]
    else:
        images, labels, classes, meta = _load_decoded(kind, src, split, limit, cache, expect_full)
        identity["format"] = "imagefolder" if kind == "folder" else "imagefolder-tar.gz"
        if kind == "tar":
            identity["tar_sha256"] = cached_sha256(src)
    if len(images) == 0:
        raise _missing(root, split, "no images found")
    if limit is not None:
        identity["limit_per_class"] = limit
    return DataSplit(f"cifar10/{split}", images, labels, classes, identity=identity, meta=meta)


def _decode_checked(files: list[Path], src: Path, extracted: Path | None) -> torch.Tensor:
    """:func:`decode_files`; for an archive's files the error also says where they came from."""
    try:
        return decode_files(files)
    except DataMissingError as e:
        if extracted is None:
            raise
        raise DataMissingError(f"{e} (extracted from {src} into {extracted}: the archive is damaged, "
                               f"or delete that folder to extract it again)") from e


def _load_decoded(kind: str, src: Path, split: str, limit: int | None, cache: bool, expect_full: bool):
    """Forms 2/3: decoded tensors from the cache (checksum verified; a corrupt one is rebuilt with
    a warning), or decode (and cache the full split). The size check runs before decoding."""
    files, extracted = None, None
    if kind == "tar":
        key = fingerprint("tar", file_fingerprint(src), split, CACHE_VERSION)
    else:
        files, labels, classes = list_image_folder(src)
        key = _folder_key(src, files)
    cache_file = cache_dir("cifar10") / f"{split}-{key}.pt"
    meta = {"from_cache": False, "cache_file": str(cache_file) if cache else None}

    blob = read_checked_cache(cache_file, "decoded CIFAR-10 cache") if cache else None
    if blob is not None:
        images, labels, classes = blob["images"], blob["labels"], blob["classes"]
        meta["from_cache"] = True
        if expect_full:
            check_full_size(split, src, labels, classes, tuple(images.shape[-2:]))
        if limit is not None:
            idx = first_per_class(labels, limit)
            images, labels = images[idx], labels[idx]
        return images, labels, classes, meta

    if files is None:
        extracted = _extract_tar(src)
        files, labels, classes = list_image_folder(_split_dir_in(extracted, split, src))
    labels = torch.tensor(labels, dtype=torch.int64)
    if expect_full:
        check_full_size(split, src, labels, classes)
    if limit is not None:  # decode only what is kept; too small to be worth caching
        idx = first_per_class(labels, limit)
        files, labels = [files[i] for i in idx.tolist()], labels[idx]
        meta["cache_file"] = None
    images = _decode_checked(files, src, extracted)
    if limit is None and cache and len(images):
        write_checked_cache({"images": images, "labels": labels, "classes": classes}, cache_file)
    if expect_full and len(images):  # the counts were checked before decoding
        _check_image_size(split, src, tuple(images.shape[-2:]))
    return images, labels, classes, meta
