"""MNIST from the raw idx files, parsed here (gzipped or not), as a :class:`DataSplit`.

Looks for ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in ``root/MNIST/raw`` (the
torchvision layout), ``root/raw``, ``root`` itself or ``root/mnist/MNIST/raw``. Nothing is
written next to the files, so a read-only folder works.

Images are returned as uint8 ``(N, 3, 28, 28)``: the grey digit replicated to 3 identical
channels so every model sees the same RGB layout as CIFAR and COCO (``size`` resizes them).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cifar import first_per_class
from .split import DataMissingError, DataSplit

MNIST_CLASSES = [str(d) for d in range(10)]
_PREFIX = {"train": "train", "test": "t10k"}
# idx type byte -> numpy big-endian dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> torch.Tensor:
    """Parse one idx file (``.gz`` or plain) into a tensor of its stored shape and dtype.

    Format: 2 zero bytes, a type byte, a byte ``ndim``, ``ndim`` big-endian uint32 sizes, data.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (header {raw[:4]!r})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} x {dtype.itemsize} bytes, "
                         f"file has {len(raw) - offset} data bytes")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))


def _read_checked(path: Path) -> torch.Tensor:
    """:func:`read_idx`, or DataMissingError naming the file when it is truncated, not an idx
    file, or not valid gzip."""
    try:
        return read_idx(path)
    except (ValueError, OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        reason = (str(e).splitlines() or [type(e).__name__])[0].replace(f"{path}: ", "")
        raise DataMissingError(f"the MNIST file {path} is damaged ({reason}); download it again "
                               f"(torchvision.datasets.MNIST(root, download=True))") from e


def _find_file(root: Path, stem: str) -> Path | None:
    for d in (root / "MNIST" / "raw", root / "raw", root, root / "mnist" / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(N, 1, H, W)`` -> uint8 ``(N, 1, size, size)`` (bilinear, antialiased)."""
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear",
                        align_corners=False, antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


def load_mnist(root, split: str = "train", limit: int | None = None,
               size: int | None = None) -> DataSplit:
    """Load one MNIST split.

    Args:
        root: folder holding the raw idx files (see module docstring).
        split: "train" (60,000) or "test" (10,000).
        limit: keep only the first ``limit`` images of each digit.
        size: resize the 28x28 digits to ``size x size`` (None keeps 28).

    Returns:
        DataSplit "mnist/<split>": images ``(N, 3, S, S)`` uint8 (grey replicated to 3 channels),
        labels ``(N,)`` int64, classes "0".."9".
    """
    if split not in _PREFIX:
        raise ValueError(f"MNIST split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser()
    stems = [f"{_PREFIX[split]}-images-idx3-ubyte", f"{_PREFIX[split]}-labels-idx1-ubyte"]
    paths = [_find_file(root, s) for s in stems]
    if None in paths:
        raise DataMissingError(
            f"MNIST ({split}) not found: looked for {stems[0]}[.gz] and {stems[1]}[.gz] in "
            f"{root}/MNIST/raw, {root}/raw and {root}. Pass --data-root pointing at a folder "
            f"with MNIST/raw/ (torchvision.datasets.MNIST(root, download=True) creates it, or "
            f"get the idx files from http://yann.lecun.com/exdb/mnist/).")
    images, labels = _read_checked(paths[0]), _read_checked(paths[1]).to(torch.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataMissingError(f"MNIST files disagree: {paths[0]} holds {tuple(images.shape)} images, "
                               f"{paths[1]} {tuple(labels.shape)} labels; download them again")
    if limit is not None:
        idx = first_per_class(labels, limit)
        images, labels = images[idx], labels[idx]
    images = images.to(torch.uint8).unsqueeze(1)
    if size is not None and size != images.shape[-1]:
        images = _resize(images, size)
    gz = paths[0].name.endswith(".gz")
    identity = {"source": str(paths[0].parent), "format": "idx.gz" if gz else "idx",
                "files": [p.name for p in paths]}
    if limit is not None:
        identity["limit_per_class"] = limit
    if size is not None:
        identity["size"] = size
    return DataSplit(f"mnist/{split}", images.repeat(1, 3, 1, 1), labels, list(MNIST_CLASSES),
                     identity=identity)
