"""Temporary files of atomic writes: how they are named, and removing the ones an interrupted
write left behind.

An atomic write (:func:`mmsys.checkpoint.save_checkpoint`, :func:`mmsys.data.paths.atomic_torch_save`,
:func:`mmsys.data.paths.atomic_write_text`) writes ``<dir>/.<name>.<pid>.<random>.tmp`` and renames
it over ``<dir>/<name>``. A process killed mid-write (SIGKILL, out of memory) leaves that file
behind — for a checkpoint, hundreds of MB. :func:`remove_stale_temps` removes them the next time
that target is written (or a Trainer starts on it), and only them:

- only files named exactly like this module's temporaries *of that target* (so a folder's other
  files, and other targets' temporaries, are never touched), or like the ones earlier versions
  wrote (``.<name>.<random>.tmp`` / ``.<name>.<random>``);
- only stale ones: the writing process (the pid in the name) is gone, or the file has not been
  written to for :data:`STALE_AFTER_S` seconds (names without a pid, a pid reused since). A live
  writer's temporary — another process saving the same file right now — is left alone.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

STALE_AFTER_S = 300.0  # a writer appends continuously: a temporary this long untouched is abandoned
_RAND = r"[a-z0-9_]{8}"  # tempfile.mkstemp's random part


def make_temp(path: Path) -> tuple[int, str]:
    """Create ``.<name>.<pid>.<random>.tmp`` next to ``path``: ``(fd, temp path)`` as
    :func:`tempfile.mkstemp` returns them."""
    return tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)


def _writer_alive(pid: int) -> bool:
    """Whether process ``pid`` exists here (True when that cannot be told)."""
    if pid == os.getpid() or os.name == "nt":  # os.kill(pid, 0) would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the stale temporaries of atomic writes to ``path`` (see the module docstring);
    returns the paths removed. A folder that does not exist yet has none."""
    path = Path(path)
    name = re.escape(path.name)
    ours = re.compile(rf"\.{name}\.(\d+)\.{_RAND}\.tmp")
    legacy = re.compile(rf"\.{name}\.{_RAND}(\.tmp)?")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for entry in entries:
        m = ours.fullmatch(entry.name)
        if not (m or legacy.fullmatch(entry.name)) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            idle = now - entry.stat(follow_symlinks=False).st_mtime
            if idle >= STALE_AFTER_S or (m and not _writer_alive(int(m.group(1)))):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            pass
    return removed
