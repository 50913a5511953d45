"""Where data and caches live, and small file helpers shared by the real-data loaders.

- :func:`shared_data_root` finds the optional offline data folder (never required).
- :func:`cache_dir` is where loaders keep extracted archives and decoded tensors.
- :func:`atomic_torch_save` / :func:`sha256_file` / :func:`fingerprint` support those caches.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..tempfiles import make_temp, remove_stale_temps

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_root() -> Path | None:
    """The shared offline data folder, or None when it is absent.

    Looks at ``$MMSYS_SHARED_DATA`` when set, else ``<repo_root>/../shared/data``.
    """
    env = os.environ.get("MMSYS_SHARED_DATA")
    path = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


def cache_dir(*parts: str) -> Path:
    """A (created) cache folder: ``$MMSYS_CACHE`` or ``~/.cache/mmsys``, joined with ``parts``."""
    env = os.environ.get("MMSYS_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "mmsys"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fingerprint(*parts) -> str:
    """A short stable hex key from strings/numbers (cache file names)."""
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def file_fingerprint(path: Path) -> str:
    """Key of a file from its resolved path, size and mtime (no content read)."""
    st = Path(path).stat()
    return fingerprint(Path(path).resolve(), st.st_size, st.st_mtime_ns)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cached_sha256(path: Path) -> str:
    """sha256 of a (large) file, computed once and kept in the cache keyed by path+size+mtime."""
    side = cache_dir("sha256") / f"{file_fingerprint(path)}.txt"
    if side.is_file():
        return side.read_text().strip()
    digest = sha256_file(path)
    atomic_write_text(side, digest + "\n")
    return digest


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to ``path`` via a temp file in the same folder and a rename (stale temporaries
    of ``path`` left by a killed earlier write are removed first: :mod:`mmsys.tempfiles`)."""
    remove_stale_temps(path)
    fd, tmp = make_temp(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename: readers never see half a file
    (stale temporaries of ``path`` left by a killed earlier save are removed first)."""
    remove_stale_temps(path)
    fd, tmp = make_temp(path)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
