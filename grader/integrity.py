"""The integrity record: sha256 of the grader's own files and of the implementation graded.

A report's ``integrity`` holds, as they were when the run started, the hash of every file of
the grader's gates, metrics, judges, data and shape tests (``grader/``, ``milestones/``,
``eval/``, ``tests/``, ``grader.py`` and the bundled ``mmsys/`` that ``eval.reference`` loads its
instruments from), and of every file of the
implementation folder (``--impl PATH/mmsys``; the bundled package when there is none). The same
files are hashed again when the run ends: a file that changed in between (code under test
rewriting the grader's metric, say) fails the grade and is named in the report. ``grader.py
verify`` hashes them once more and reports any file that differs from the record.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRADER_PARTS = ("grader", "milestones", "eval", "mmsys", "tests")  # mmsys: eval.reference's instruments
GRADER_FILES = ("grader.py", "pyproject.toml")
SKIP_DIRS = {"__pycache__", ".pytest_cache"}


def tree_hashes(root: Path) -> dict[str, str]:
    """``{path relative to root: sha256}`` of every file under ``root`` (caches left out)."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and not SKIP_DIRS & set(path.relative_to(root).parts) and path.suffix != ".pyc":
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def digest(hashes: dict[str, str]) -> str:
    """One sha256 over a listing ``{path: sha256}`` (path order)."""
    return hashlib.sha256("".join(f"{p}\0{h}\n" for p, h in sorted(hashes.items())).encode()).hexdigest()


def grader_hashes(repo: Path = REPO) -> dict[str, str]:
    """``{path relative to the repo: sha256}`` of the grader's files (:data:`GRADER_PARTS`, :data:`GRADER_FILES`)."""
    out = {f"{part}/{p}": h for part in GRADER_PARTS for p, h in tree_hashes(repo / part).items()}
    out.update({f: hashlib.sha256((repo / f).read_bytes()).hexdigest() for f in GRADER_FILES if (repo / f).is_file()})
    return out


def snapshot(impl_package: Path, repo: Path = REPO) -> dict:
    """The record: ``{"grader": {"digest", "n_files", "files"}, "implementation": {"path",
    "digest", "n_files", "files"}}`` (``impl_package``: the ``mmsys`` folder graded)."""
    g, i = grader_hashes(repo), tree_hashes(impl_package)
    return {"grader": {"digest": digest(g), "n_files": len(g), "files": g},
            "implementation": {"path": str(impl_package), "digest": digest(i), "n_files": len(i), "files": i}}


def differences(recorded: dict, now: dict) -> list[str]:
    """Files of a record that differ now: ``"<part> <path>: changed | missing | added"``."""
    out = []
    for part in ("grader", "implementation"):
        a, b = recorded.get(part, {}).get("files", {}), now.get(part, {}).get("files", {})
        out += [f"{part} {p}: {'changed' if p in b else 'missing'}" for p in sorted(a) if a[p] != b.get(p)]
        out += [f"{part} {p}: added" for p in sorted(set(b) - set(a))]
    return out


def summary(record: dict) -> dict:
    """The record without the per-file listings (what the Markdown report shows)."""
    return {part: {k: v for k, v in rec.items() if k != "files"} for part, rec in record.items()
            if isinstance(rec, dict) and "digest" in rec}
