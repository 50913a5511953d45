"""What the command lines (``python -m apps.<program>``) share: one ``error:`` line on stderr and
exit code 2 for bad input, found before any work (no model is loaded, nothing is written).

- :class:`ArgumentParser`: argparse whose errors are that one line (no usage block).
- argparse ``type=`` validators: :func:`positive_int`, :func:`seed`, :func:`finite_float`
  (a finite number in a range), :func:`device` (one that exists on this machine).
- checks returning the error message or None: :func:`missing_checkpoint`, :func:`unwritable`
  (the output's folder exists and can be written), :func:`would_overwrite`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

SEED_MAX = 2 ** 32 - 1  # the samplers seed sample i from (seed, i); larger seeds would wrap or overflow
GUIDANCE_MAX = 100.0  # far past any useful guidance scale (the recipes use 1-7.5); larger only saturates


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, ``error: <what> (see <prog> --help)``,
    with exit code 2 (sub-commands made by ``add_subparsers`` are of this class too)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def fail(msg: str) -> int:
    """Print ``error: msg`` to stderr; return the bad-input exit code 2."""
    print(f"error: {msg}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- argparse types

def positive_int(text: str) -> int:
    """An integer >= 1 (argparse ``type=``)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def seed(text: str) -> int:
    """A seed, an integer in [0, 2^32 - 1] (argparse ``type=``)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{v} is outside [0, {SEED_MAX}]")
    return v


def finite_float(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """An argparse ``type=``: a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``;
    None = unbounded on that side). NaN and infinities are refused."""
    left = "(" if lo_open else "["
    where = f"{left}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v:g} is outside {where}")
        return v

    parse.__name__ = "number"  # argparse names the type in its messages
    return parse


def device(text: str) -> str:
    """A torch device that exists here: ``cpu``, ``cuda[:N]`` with a GPU N, ``mps`` on a Mac
    (argparse ``type=``)."""
    import torch
    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu or cuda[:N]") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device here; use --device cpu")
        if d.index is not None and d.index >= n:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif d.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise argparse.ArgumentTypeError(f"{text}: no MPS device here; use --device cpu")
    elif d.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu or cuda[:N]")
    return text


# ----------------------------------------------------------------------------- checks

def missing_checkpoint(path: str | Path, what: str, milestone: str) -> str | None:
    """The error message when ``path`` is not a file (None when it is)."""
    if Path(path).is_file():
        return None
    return (f"no {what} checkpoint at {path}: train one first with `python grader.py {milestone}` "
            f"(it writes runs/{milestone}/checkpoint.pt), or pass --checkpoint PATH")


def unwritable(path: str | Path | None, option: str, create_parents: bool = False,
               folder: bool = False) -> str | None:
    """The error message when output ``path`` (given by ``option``) cannot be written (None when
    it can, or when ``path`` is None): its folder is missing (allowed with ``create_parents``:
    then the nearest existing ancestor must be a writable folder), is not a folder or is not
    writable, or ``path`` itself is a folder (or, with ``folder``, is a file)."""
    if path is None:
        return None
    p = Path(path)
    if folder:
        if p.exists() and not p.is_dir():
            return f"{option} {p} is a file: give a folder"
        if p.is_dir():
            return None if os.access(p, os.W_OK | os.X_OK) else f"{option} {p}: the folder is not writable"
    elif p.is_dir():
        return f"{option} {p} is a folder: give a file name"
    parent = p.parent
    if create_parents:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.exists():
        return f"{option} {p}: the folder {parent} does not exist (create it first)"
    if not parent.is_dir():
        return f"{option} {p}: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{option} {p}: the folder {parent} is not writable"
    if p.exists() and not os.access(p, os.W_OK):
        return f"{option} {p} is not writable"
    return None


def would_overwrite(paths, force: bool) -> str | None:
    """The error message when one of ``paths`` exists and ``force`` is off (None otherwise)."""
    for p in paths:
        if p is not None and Path(p).exists() and not force:
            return f"{p} exists: pass --force to overwrite it or choose another output path"
    return None
