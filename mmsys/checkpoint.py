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
that need more (the trainer's resume) pass ``required=``. :func:`load_into` rebuilds the model a
checkpoint holds with every check on its contents (config keys, finite weights, shapes, a
parameter limit, ``$MMSYS_MAX_PARAMS``, checked on the meta device before anything is allocated).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

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


def _not_torch_file(path: Path) -> str | None:
    """Why ``path``'s first bytes rule out a ``torch.save`` file (a zip archive, or a pickle in
    torch's legacy format), or None when they could be one."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not head:
        return "is empty (0 bytes): not a torch checkpoint (an interrupted copy or save?)"
    if head.startswith(b"PK") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return None  # a zip archive (torch's format) or a pickle, protocol 2..5 (its legacy format)
    return f"is not a torch checkpoint (it starts with {head!r}: neither a zip archive nor a pickle)"


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
    foreign = _not_torch_file(path)
    if foreign:
        raise CheckpointError(f"checkpoint {path} {foreign}: pass the checkpoint.pt a training run wrote")
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
    odd = [k for k in ckpt if not isinstance(k, str)]
    if odd:
        raise CheckpointError(f"checkpoint {path} has keys that are not strings ({_first(odd)}): it was "
                              f"not written by mmsys.checkpoint.save_checkpoint; train again")
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


# ------------------------------------------------------------------ using a checkpoint's contents
MAX_PARAMS_ENV = "MMSYS_MAX_PARAMS"
DEFAULT_MAX_PARAMS = 200_000_000  # far above every bundled recipe (the largest, m4 full, has ~38 M)


def max_params() -> int:
    """The most values (parameters and buffers) a checkpoint's model may have before it is
    built: ``$MMSYS_MAX_PARAMS`` (e.g. ``5e8``), default :data:`DEFAULT_MAX_PARAMS`."""
    raw = os.environ.get(MAX_PARAMS_ENV)
    if not raw:
        return DEFAULT_MAX_PARAMS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value == value and 0 < value < float("inf")):
        raise CheckpointError(f"{MAX_PARAMS_ENV}={raw!r} is not a positive number of parameters (e.g. 5e8)")
    return int(value)


def _first(items, n: int = 3) -> str:
    """The first ``n`` of ``items`` as ``a, b, c (+4 more)``."""
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(repr(x) if not isinstance(x, str) else x for x in items[:n]) + more


def _too_big(path, n: int, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: {what} {n:,} values (parameters and buffers), more than the "
                           f"limit of {max_params():,}: "
                           f"not built (set {MAX_PARAMS_ENV}, e.g. {MAX_PARAMS_ENV}=1e9, if the model is meant "
                           f"to be that large)")


def check_contents(path, ck: dict, *, required_extra: tuple[str, ...] = (), use_ema: bool = True) -> dict:
    """Check what a model is rebuilt from and return the weights to load (EMA when kept and
    ``use_ema``): ``model_config`` a dict with string keys, ``extra`` a dict holding
    ``required_extra``, the weights a dict of string names to finite tensors, at most
    :func:`max_params` values in all. Raises CheckpointError, one line naming ``path``."""
    mc = ck.get("model_config")
    if not isinstance(mc, dict):
        raise CheckpointError(f"checkpoint {path} has no model_config dict (found {type(mc).__name__}): "
                              f"the model cannot be rebuilt; train again")
    odd = [k for k in mc if not isinstance(k, str)]
    if odd:
        raise CheckpointError(f"checkpoint {path}: model_config has keys that are not strings ({_first(odd)})")
    extra = ck.get("extra")
    if required_extra and not isinstance(extra, dict):
        raise CheckpointError(f"checkpoint {path} has no extra dict (it needs extra[{required_extra[0]!r}]): "
                              f"train again")
    lacking = [k for k in required_extra if k not in extra]
    if lacking:
        has = f"extra has {_first(sorted(map(str, extra)), 6)}" if extra else "extra is empty"
        raise CheckpointError(f"checkpoint {path} has no extra[{lacking[0]!r}] ({has}): train again")
    ema = ck.get("ema") if use_ema else None
    if ema and not (isinstance(ema, dict) and isinstance(ema.get("module"), dict)):
        raise CheckpointError(f"checkpoint {path}: 'ema' is not a dict with a 'module' state dict")
    where = "ema['module']" if ema else "model"
    weights = ema["module"] if ema else ck["model"]
    if not isinstance(weights, dict):
        raise CheckpointError(f"checkpoint {path}: {where} is a {type(weights).__name__}, not a state dict")
    odd = [k for k in weights if not isinstance(k, str)]
    if odd:
        raise CheckpointError(f"checkpoint {path}: {where} has weight names that are not strings ({_first(odd)})")
    not_tensor = [k for k, v in weights.items() if not isinstance(v, torch.Tensor) and not k.endswith("_extra_state")]
    if not_tensor:
        raise CheckpointError(f"checkpoint {path}: {where} entries are not tensors: {_first(not_tensor)}")
    tensors = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    bad = [k for k, v in tensors.items() if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path}: {where} has NaN or infinite values in {_first(bad)}: the run "
                              f"diverged; use an earlier checkpoint or train again")
    n = sum(v.numel() for v in tensors.values())
    if n > max_params():
        raise _too_big(path, n, f"{where} holds")
    return weights


def _mismatch(expected: dict, weights: dict) -> str | None:
    """What keeps ``weights`` from loading strictly into a model whose state dict has the
    shapes ``expected`` (name -> shape), or None."""
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [f"{k} {tuple(weights[k].shape)} vs the model's {tuple(s)}" for k, s in expected.items()
             if k in weights and isinstance(weights[k], torch.Tensor) and tuple(weights[k].shape) != tuple(s)]
    parts = [f"{label} {_first(keys)}" for label, keys in
             (("wrong shape:", wrong), ("missing", missing), ("unexpected", unexpected)) if keys]
    return "; ".join(parts) or None


@contextlib.contextmanager
def config_errors(path, what: str = "model_config"):
    """Turn a TypeError / ValueError / KeyError / AssertionError raised while building from
    ``what`` (an unknown or bad config key), or an implementation's own CheckpointError, into
    one CheckpointError line naming ``path``."""
    try:
        yield
    except (TypeError, ValueError, KeyError, AssertionError) as e:
        raise CheckpointError(f"checkpoint {path}: {what} does not describe a model this code can build: "
                              f"{type(e).__name__}: {_one_line(e)}") from e
    except Exception as e:
        if type(e).__name__ != "CheckpointError":  # this module's class or an --impl's own
            raise
        text = _one_line(e)
        raise CheckpointError(text if str(path) in text else f"checkpoint {path}: {text}") from e


def _one_line(e: BaseException, limit: int = 300) -> str:
    """``e``'s message on one line, cut after its last full sentence within ``limit`` characters."""
    text = " ".join(str(e).split())
    if len(text) <= limit:
        return text
    head = text[:limit]
    return (head.rsplit(". ", 1)[0] + "." if ". " in head else head) + " ..."


def _meta_unsupported(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) says an operation cannot run on meta tensors."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (RuntimeError, NotImplementedError)) and type(e).__name__ != "CheckpointError" \
                and "meta" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def _sized_up(path, model: nn.Module) -> dict:
    """``model``'s state dict shapes (name -> shape); CheckpointError when it holds more than
    :func:`max_params` values (parameters and buffers)."""
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    if n > max_params():
        raise _too_big(path, n, "model_config asks for a model of")
    return {k: v.shape for k, v in model.state_dict().items()}


def load_into(path, ck: dict, build, *, required_extra: tuple[str, ...] = (), use_ema: bool = True):
    """The model a read checkpoint ``ck`` (from :func:`load_checkpoint`) holds, checked at
    every step, each failure one CheckpointError line naming ``path``:

    1. :func:`check_contents` (model_config, extra, finite weights, their size);
    2. ``build(ck["model_config"]) -> nn.Module`` first on the meta device (nothing is
       allocated): config errors, more values than :func:`max_params`, and weights that do not
       fit (missing / unexpected names, wrong shapes) are found before any memory is used. A
       build that cannot run on the meta device skips this step (then the real model is
       sized up, after it was built);
    3. the real build and ``load_state_dict(strict=True)`` of the eval weights.

    ``build`` may also load the weights itself (the result is loaded again, the same values).
    Returns the model (on CPU, in the mode ``build`` left it)."""
    weights = check_contents(path, ck, required_extra=required_extra, use_ema=use_ema)
    mc = ck["model_config"]
    expected = None
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying ... to a meta parameter is a no-op"
            with config_errors(path):
                meta = build(mc)
    except Exception as e:
        if not _meta_unsupported(e):
            raise
        meta = None  # a build that needs real tensors: sized up after the real build only
    if callable(getattr(meta, "state_dict", None)):  # an nn.Module, here or in the candidate process
        expected = _sized_up(path, meta)
        del meta
    if expected is not None and (why := _mismatch(expected, weights)):
        raise CheckpointError(f"checkpoint {path}: the weights do not fit the model its model_config builds: {why}")
    with config_errors(path):
        model = build(mc)
    if expected is None and (why := _mismatch(_sized_up(path, model), weights)):
        raise CheckpointError(f"checkpoint {path}: the weights do not fit the model its model_config builds: {why}")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: the weights do not load: {_one_line(e)}") from e
    return model


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read in chunks), for provenance in reports."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()
