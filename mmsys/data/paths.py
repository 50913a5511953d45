"""Where data and caches live, and small file helpers shared by the real-data loaders.

- :func:`shared_data_root` finds the optional offline data folder (never required).
- :func:`cache_dir` is where loaders keep extracted archives and decoded tensors.
- :func:`atomic_torch_save` / :func:`sha256_file` / :func:`fingerprint` support those caches;
  :func:`write_checked_cache` / :func:`read_checked_cache` keep a checksum of a cache's contents,
  so a damaged cache file is noticed (and rebuilt by the caller) instead of failing every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
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


def atomic_write_with(path: Path, write) -> None:
    """``write(tmp)`` writes a temp file in ``path``'s folder, then it is renamed to ``path``:
    readers never see half a file (stale temporaries of ``path`` left by a killed earlier write are
    removed first; the temp file is removed if ``write`` fails)."""
    remove_stale_temps(path)
    fd, tmp = make_temp(path)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename (:func:`atomic_write_with`)."""
    atomic_write_with(path, lambda tmp: torch.save(obj, tmp))


def content_sha256(blob: dict) -> str:
    """sha256 over a dict of tensors and JSON-able values (keys sorted; a tensor by its dtype,
    shape and raw bytes): the checksum :func:`write_checked_cache` stores."""
    h = hashlib.sha256()
    for key in sorted(blob):
        value = blob[key]
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        else:
            h.update(json.dumps(value, sort_keys=True).encode())
    return h.hexdigest()


def write_checked_cache(blob: dict, path: Path) -> None:
    """Save ``blob`` (tensors and JSON-able values) atomically with its :func:`content_sha256`."""
    atomic_torch_save({"data": blob, "sha256": content_sha256(blob)}, path)


def read_checked_cache(path: Path, what: str) -> dict | None:
    """The dict :func:`write_checked_cache` saved at ``path``; None when there is none, or when the
    file cannot be loaded or its contents do not match the stored checksum: then the file is
    removed and one warning line goes to stderr, and the caller rebuilds the cache."""
    if not path.is_file():
        return None
    why = None
    try:
        saved = torch.load(path, weights_only=True)
        if not isinstance(saved, dict) or not isinstance(saved.get("data"), dict):
            why = "not a checked cache file"
        elif content_sha256(saved["data"]) != saved.get("sha256"):
            why = "its contents do not match the stored checksum"
    except Exception as e:  # truncated zip, random bytes, unpickling refused ...
        why = (str(e).splitlines() or [type(e).__name__])[0]
    if why is None:
        return saved["data"]
    print(f"warning: the {what} {path} is corrupt ({why}); rebuilding it", file=sys.stderr, flush=True)
    path.unlink(missing_ok=True)
    return None
