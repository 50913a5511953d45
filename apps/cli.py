"""What the command lines (``python -m apps.<program>``) share:
one ``error:`` line on stderr and exit code 2 for bad input, and the same wording for a
missing checkpoint or an output file that is already there."""

from __future__ import annotations

import sys
from pathlib import Path


def fail(msg: str) -> int:
    """Print ``error: msg`` to stderr; return the bad-input exit code 2."""
    print(f"error: {msg}", file=sys.stderr)
    return 2


def missing_checkpoint(path: str | Path, what: str, milestone: str) -> str | None:
    """The error message when ``path`` is not a file (None when it is)."""
    if Path(path).is_file():
        return None
    return (f"no {what} checkpoint at {path}: train one first with `python grader.py {milestone}` "
            f"(it writes runs/{milestone}/checkpoint.pt), or pass --checkpoint PATH")


def would_overwrite(paths, force: bool) -> str | None:
    """The error message when one of ``paths`` exists and ``force`` is off (None otherwise)."""
    for p in paths:
        if p is not None and Path(p).exists() and not force:
            return f"{p} exists: pass --force to overwrite it or choose another output path"
    return None
