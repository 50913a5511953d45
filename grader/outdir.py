"""The output folder of a grading run: checked before any work, an earlier run never overwritten.

- :func:`check_writable`: ``--out`` (and each ``OUT/<milestone>``) is a folder this process
  can write in, or can be created in one; otherwise a UsageError (exit 2) before anything runs.
- :func:`check_no_earlier_run`: an ``OUT/<milestone>`` that already holds a run (any of
  :data:`RUN_MARKERS`) is refused unless ``--resume`` (continue it) or ``--force``.
- :func:`move_aside`: with ``--force`` the earlier run folder is renamed to
  ``OUT/<milestone>.previous-<UTC time>/`` (kept whole, never deleted), and what the next run
  reads from it is copied into the fresh folder: a person's m5 answers (every ``human_eval*``
  entry) and the ``--checkpoint`` being re-graded when it lay inside the folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from grader import UsageError

RUN_MARKERS = ("report.json", "checkpoint.pt", "metrics.jsonl")  # files only a run writes
CARRIED = "human_eval"  # entries starting with this (m5's sheet and a person's answers) are carried over


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_writable(out: Path, folders: list[Path]) -> None:
    """Raise UsageError unless ``out`` and every folder in ``folders`` is (or can be created as) a
    folder this process can write in. Writes nothing: the probe is an unnamed temporary file."""
    for folder in (out, *folders):
        base = _nearest_existing(folder)
        if not base.is_dir():
            what = "is a file" if base == Path(os.path.abspath(folder)) else f"lies under the file {base}"
            raise UsageError(f"--out {out}: {folder} {what}, not a folder: pass --out a folder (new or existing)")
        try:
            with tempfile.TemporaryFile(dir=base):
                pass
        except OSError as e:
            raise UsageError(f"--out {out}: cannot write in {base} ({e.strerror or type(e).__name__}): "
                             f"pass --out a folder you can write in") from None


def earlier_run(folder: Path) -> list[str]:
    """The :data:`RUN_MARKERS` present in ``folder`` (empty: no earlier run there)."""
    return [name for name in RUN_MARKERS if (folder / name).exists()]


def check_no_earlier_run(folders: dict[str, Path], force: bool, resume: bool) -> None:
    """Raise UsageError when a milestone's folder already holds a run and neither ``force`` nor
    ``resume`` says what to do with it."""
    if force or resume:
        return
    held = {mid: earlier_run(folder) for mid, folder in folders.items()}
    held = {mid: names for mid, names in held.items() if names}
    if held:
        where = "; ".join(f"{folders[mid]} ({', '.join(names)})" for mid, names in held.items())
        m5 = " (a person's human_eval answers are copied into the new folder)" if any(
            mid.startswith("m5") for mid in held) else ""
        raise UsageError(f"{where} already holds a run: pass --force to move it aside to "
                         f"<folder>.previous-<UTC time>/ and grade again{m5}, --resume to continue its "
                         f"training, or another --out")


def _aside_name(folder: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = folder.with_name(f"{folder.name}.previous-{stamp}"), 1
    while target.exists():
        target, n = folder.with_name(f"{folder.name}.previous-{stamp}-{n}"), n + 1
    return target


def _carry(src: Path, dst: Path, link: bool = False) -> None:
    """Copy ``src`` (file or folder) to ``dst``; a file may be hard-linked instead when ``link``
    (checkpoints are replaced atomically, never rewritten in place, so a link is as safe)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
        return
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def move_aside(mid: str, folder: Path, checkpoint: Path | None) -> None:
    """Rename ``folder`` (holding an earlier run of ``mid``) to ``<folder>.previous-<UTC time>``
    and copy back what the next run reads: every ``human_eval*`` entry, and ``checkpoint`` (the
    ``--checkpoint`` file) when it lay inside the folder, at the same place. OUT/<mid>.log is
    moved along. States what it did on stdout; raises UsageError when the rename fails."""
    target = _aside_name(folder)
    try:
        os.rename(folder, target)
    except OSError as e:
        raise UsageError(f"--force: cannot move {folder} aside to {target} ({e.strerror}): move it yourself "
                         f"or pass another --out") from None
    log = folder.with_suffix(".log")
    if log.is_file():
        os.replace(log, target / log.name)
    carried = [p.name for p in sorted(target.iterdir()) if p.name.startswith(CARRIED)]
    inside = None
    if checkpoint is not None and Path(os.path.abspath(checkpoint)).is_relative_to(os.path.abspath(folder)):
        inside = Path(os.path.abspath(checkpoint)).relative_to(os.path.abspath(folder))
    folder.mkdir(parents=True)
    for name in carried:
        _carry(target / name, folder / name)
    if inside is not None:
        _carry(target / inside, folder / inside, link=True)
    kept = [f"{n}/" if (target / n).is_dir() else n for n in carried] + ([str(inside)] if inside else [])
    note = f"; copied into the new {folder}/ (originals kept): {', '.join(kept)}" if kept else ""
    print(f"== {mid}: --force: the earlier run in {folder}/ was moved aside to {target}/{note}", flush=True)


def prepare(folders: dict[str, Path], force: bool, checkpoint: Path | None) -> None:
    """With ``force``, move every milestone folder that holds an earlier run aside."""
    if not force:
        return
    for mid, folder in folders.items():
        if earlier_run(folder):
            move_aside(mid, folder, checkpoint)
