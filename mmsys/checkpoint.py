"""Checkpoints: atomic save, validated load, content hash.

A checkpoint is one ``torch.save``'d dict of plain data (tensors, numbers, strings, lists, tuples,
dicts), so it loads with ``torch.load(weights_only=True)``: loading never runs pickled code.
Configs are stored as plain dicts (``dataclasses.asdict``), never as dataclass objects.

Payload convention (``format_version`` 1)::

    {"kind": "vit" | "clip" | "captioner" | "unet" | ...,  # what model this is
     "format_version": 1,
     "step": int,                    # optimizer steps completed
     "model": state_dict, "optimizer": state_dict, "scheduler": state_dict,
     "ema": state_dict | None, "rng": dict,
     "config": dict,                 # TrainConfig as a dict
     "model_config": dict,           # enough to rebuild the model
     "extra": dict}                  # e.g. tokenizer state

Only ``kind``, ``format_version`` and ``model`` are required by :func:`load_checkpoint`; callers
that need more (the trainer's resume) pass ``required=``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import torch

from .tempfiles import make_temp, remove_stale_temps

FORMAT_VERSION = 1
REQUIRED_KEYS = ("kind", "format_version", "model")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used. The message says what is wrong and what to do."""


def eval_weights(checkpoint: dict) -> dict:
    """The weights a checkpoint is evaluated and sampled with: the EMA copy when the run kept
    one (``checkpoint["ema"]["module"]``), else the trained model's state dict."""
    return checkpoint["ema"]["module"] if checkpoint.get("ema") else checkpoint["model"]


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically.

    The dict is written to a temporary file in the same directory, flushed and fsync'ed, then
    moved over ``path`` with ``os.replace`` (atomic on POSIX and Windows). If anything fails the
    temporary file is removed and an existing ``path`` is left untouched, so a crash never leaves
    a partial checkpoint. Temporaries of ``path`` that a killed earlier save left behind are
    removed first (:func:`mmsys.tempfiles.remove_stale_temps`). ``format_version`` is filled in
    when missing.
    """
    if not isinstance(payload, dict) or "kind" not in payload:
        raise ValueError("checkpoint payload must be a dict with a 'kind' entry")
    payload = {"format_version": FORMAT_VERSION, **payload}
    _check_plain(payload, "payload")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = make_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (best effort; not possible on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


_PLAIN = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _check_plain(x, where: str) -> None:
    """Raise ValueError naming the first entry ``weights_only`` loading would refuse."""
    if type(x) in (dict, OrderedDict):
        for k, v in x.items():
            _check_plain(k, f"{where} key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
    elif type(x) in (list, tuple):
        for i, v in enumerate(x):
            _check_plain(v, f"{where}[{i}]")
    elif not (type(x) in _PLAIN or isinstance(x, torch.Tensor)):
        raise ValueError(f"checkpoint {where} is a {type(x).__module__}.{type(x).__qualname__}; store "
                         f"only tensors, numbers, strings and lists/tuples/dicts of them (configs via "
                         f"dataclasses.asdict, numpy values via float()/torch.from_numpy)")


def load_checkpoint(path: str | os.PathLike, expect_kind: str | None = None, *,
                    required: tuple[str, ...] = (), map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint file.
        expect_kind: if given, the checkpoint's ``kind`` must equal it.
        required: keys needed beyond ``kind``, ``format_version`` and ``model``.
        map_location: where tensors are loaded (default CPU; ``load_state_dict`` moves them).

    Raises:
        CheckpointError: missing file, not a torch checkpoint (corrupt or truncated), contains
            non-plain objects, wrong ``kind``, unknown ``format_version`` or missing keys.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: train first (it is written to "
                              f"<out_dir>/checkpoint.pt) or pass the right path")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises KeyError, RuntimeError, EOFError ... on junk bytes
        msg = str(e)
        if isinstance(e, pickle.UnpicklingError) and "weights only" in msg.lower():
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors and plain containers, so it "
                f"was not written by mmsys.checkpoint.save_checkpoint; store configs as dicts and "
                f"re-save it (or, only if you trust the file, torch.load(weights_only=False))"
            ) from e
        first = msg.splitlines()[0][:200] if msg else ""
        raise CheckpointError(f"checkpoint {path} is not a readable torch checkpoint (corrupt or "
                              f"truncated?): {type(e).__name__}: {first}. Delete it and train "
                              f"again.") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not an mmsys "
                              f"checkpoint dict; save it with mmsys.checkpoint.save_checkpoint")
    missing = [k for k in (*REQUIRED_KEYS, *required) if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing keys {missing} (has {sorted(ckpt)}); "
                              f"it was not written by this version of mmsys: train again")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format_version {ckpt['format_version']}, this "
                              f"mmsys reads version {FORMAT_VERSION}: train again with this version")
    if expect_kind is not None and ckpt["kind"] != expect_kind:
        raise CheckpointError(f"checkpoint {path} is a '{ckpt['kind']}' checkpoint, expected "
                              f"'{expect_kind}': pass the checkpoint of the right milestone")
    return ckpt


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read in chunks), for provenance in reports."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()
