"""What crosses between the grader and the candidate process, byte by byte.

A message is a pickle of builtins only: :func:`loads` refuses every global (:class:`_NoGlobals`),
so no message can make its receiver import or build a class. Tensor bytes travel through a
shared-memory :class:`Arena` (or inline when they do not fit); exceptions as a record of class
names, message and traceback (:func:`exception_record`), raised on the other side as a class of
the same name over the nearest builtin base (:func:`rebuild_exception`). Standalone (stdlib +
torch): copied into the candidate process with :mod:`grader.candidate_protocol`.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import traceback

import torch

TAG = "\0"  # tagged values are tuples whose first item starts with it


class ProtocolError(Exception):
    """A malformed or unexpected message."""


class _NoGlobals(pickle.Unpickler):
    """Builtins only: a message that names any class or function is refused."""

    def find_class(self, module, name):
        raise ProtocolError(f"refused: the message would import {module}.{name}")


def loads(data: bytes):
    """Unpickle a message with :class:`_NoGlobals`."""
    return _NoGlobals(io.BytesIO(data)).load()


def dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=5)


# ------------------------------------------------------------------ tensors
class Arena:
    """A shared-memory file (``/dev/shm``) one side writes tensor bytes into and the other copies
    them out of: a message then carries only (offset, length). The calls are strictly nested, so
    the receiver has copied a message's tensors before the sender can send again, and the sender
    starts at offset 0 with every message (:meth:`reset`). Tensors that do not fit cross inline."""

    def __init__(self, path: str, size: int, create: bool):
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.buf, self.size, self.pos = torch.frombuffer(self.mm, dtype=torch.uint8), size, 0

    def reset(self):
        self.pos = 0

    def put(self, flat: torch.Tensor):
        """Offset of the uint8 tensor ``flat`` written here, or None when it does not fit."""
        n = flat.numel()
        if self.pos + n > self.size:
            return None
        off, self.pos = self.pos, self.pos + (n + 63) // 64 * 64
        self.buf[off:off + n].copy_(flat)
        return off

    def get(self, off: int, n: int) -> torch.Tensor:
        if not (isinstance(off, int) and isinstance(n, int) and 0 <= off and 0 <= n and off + n <= self.size):
            raise ProtocolError(f"tensor bytes outside the shared arena: {off} + {n}")
        return self.buf[off:off + n].clone()


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 CPU tensor (a view when already contiguous on the CPU)."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def tensor_from(dtype: str, shape, device: str, flat: torch.Tensor) -> torch.Tensor:
    dt = getattr(torch, dtype)
    if not isinstance(dt, torch.dtype):
        raise ProtocolError(f"not a dtype: {dtype}")
    t = flat.view(dt) if flat.numel() else torch.empty(0, dtype=dt)
    t = t.reshape(tuple(shape))
    return t if device == "cpu" else t.to(device)


def exception_record(e: BaseException, token=None) -> dict:
    """What crosses for an exception: class names up to the builtin base, message, traceback,
    plain attributes, and the token of a callback error it carries (see :func:`rebuild_exception`)."""
    names, builtin = [], "Exception"
    for c in type(e).__mro__:
        if c.__module__ == "builtins":
            builtin = c.__name__
            break
        names.append(c.__name__)
    attrs = {k: v for k, v in vars(e).items() if isinstance(v, (str, int, float, bool, type(None)))} \
        if hasattr(e, "__dict__") else {}
    chain, seen = e, 0
    while token is None and chain is not None and seen < 20:
        token, chain, seen = getattr(chain, "_wire_token", None), chain.__cause__ or chain.__context__, seen + 1
    return {"names": names, "builtin": builtin, "message": str(e), "attrs": attrs, "token": token,
            "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__))[-8000:]}


class RemoteError(Exception):
    """Base of every exception raised on the other side: ``remote_traceback`` is its traceback there."""


_classes: dict = {}


def rebuild_exception(rec: dict) -> BaseException:
    """An exception of a class named as the remote one's (chain of names over the nearest builtin
    base, e.g. ``TrainingDiverged(RemoteError, RuntimeError)``), so checks by class name and
    ``except ValueError`` behave as in one process; attributes copied."""
    import builtins
    base = getattr(builtins, rec.get("builtin", "Exception"), Exception)
    if not (isinstance(base, type) and issubclass(base, Exception)):
        base = Exception
    cls = base
    names = [str(n) for n in rec.get("names", [])]
    if not names:
        names = [base.__name__]
    for i, name in enumerate(reversed(names)):
        key = (base.__name__, tuple(names[len(names) - 1 - i:]))
        if key not in _classes:
            _classes[key] = type(name, (RemoteError, cls) if cls is base else (cls,), {})
        cls = _classes[key]
    e = cls(rec.get("message", ""))
    for k, v in rec.get("attrs", {}).items():
        try:
            setattr(e, k, v)
        except Exception:
            pass
    e.remote_traceback = rec.get("traceback", "")
    e._wire_token = rec.get("token")
    return e
