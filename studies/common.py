"""What every study shares: the run context one setting trains in, the command line's common
checks, and the provenance its record starts from (command, commit, machine, threads)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def one_thread_run(seed: int) -> Iterator:
    """A :class:`milestones.base.RunContext` in a temporary folder (seed ``seed``, no progress
    bars) with torch on one thread; the thread count is restored afterwards."""
    import torch
    from milestones.base import RunContext
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            yield RunContext(out_dir=Path(tmp), seed=seed, progress=False)
    finally:
        torch.set_num_threads(threads)


def add_common_args(p: argparse.ArgumentParser, default_out: Path, what: str = "settings") -> None:
    """``--jobs``, ``--seed`` and ``--out``, the options every study has."""
    p.add_argument("--jobs", type=int, default=1, help=f"{what} trained at a time, one torch thread each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=default_out, help=f"output folder (default {default_out})")


def check_common_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse (one line, exit 2, nothing written) a ``--jobs`` below 1 or an ``--out`` that is a file."""
    if a.jobs < 1:
        p.error(f"--jobs must be at least 1, got {a.jobs}")
    if a.out.exists() and not a.out.is_dir():
        p.error(f"--out {a.out} is a file: give a folder")


def provenance(module: str, argv, a: argparse.Namespace) -> dict:
    """The start of a study's record, taken before anything is written (the output folder may be in
    the tree): the command, the commit and whether the tree was dirty, the CPU, one torch thread
    per setting, ``--jobs`` and ``--seed``."""
    from grader.report import device_info, git_state
    git, dev = git_state(REPO), device_info("cpu")
    command = f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:])
    return {"command": command.strip(), "commit": git["commit"][:7], "dirty": git["dirty"],
            "cpu": dev.get("cpu", "?"), "cpu_isa": dev["cpu_isa"], "torch_threads": 1, "jobs": a.jobs, "seed": a.seed}
