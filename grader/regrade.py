"""``python grader.py regrade``: every quick milestone re-graded at HEAD into ``results/quick/``.

A committed report must be made at the commit it describes, from a clean tree. So this command
refuses to start on a working tree with changes or untracked files (exit 2), grades every
milestone (``grader.py all --jobs N``) into a git-ignored staging folder, and only when all of
them ran replaces ``results/quick/`` with it, adding ``REGRADE.md`` (commit, command, exit code
and wall time of each milestone). Commit ``results/quick/`` afterwards: the reports then name
the commit just before the one that adds them, which is the code they measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from grader import EXIT_USAGE, REPO, UsageError

STAGING = REPO / "results" / ".incoming"  # git-ignored: the tree stays clean while the children run


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="grader.py regrade", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="milestones graded at once (default 2)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "quick", help="where the reports go (default results/quick)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="grade a tree with uncommitted changes anyway (the reports say dirty; do not commit them)")
    return p.parse_args(argv)


def tree_changes(repo: Path) -> list[str]:
    """``git status --porcelain`` lines: tracked changes and untracked files git does not ignore."""
    out = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=all"],
                         capture_output=True, text=True, check=True).stdout
    return [ln for ln in out.splitlines() if ln.strip()]


def main(argv) -> int:
    args = parse_args(argv)
    try:
        changes = tree_changes(REPO)
        if changes and not args.allow_dirty:
            raise UsageError(f"the working tree has {len(changes)} uncommitted change(s) (first: {changes[0].strip()}): "
                             f"commit or stash them first, a committed report must describe a commit")
        if args.jobs < 1:
            raise UsageError(f"--jobs {args.jobs}: give a number of processes >= 1")
    except (UsageError, subprocess.CalledProcessError) as e:
        print(f"grader: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    shutil.rmtree(STAGING, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "grader.py"), "all", "--jobs", str(args.jobs), "--out", str(STAGING), "--no-progress"]
    print(f"== regrade at {commit[:12]}: {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    code = subprocess.run(cmd, cwd=REPO).returncode
    rows = []
    for report in sorted(STAGING.glob("*/report.json")):
        r = json.loads(report.read_text())
        rows.append(f"| {r['milestone']} | {r.get('headline', r['status'])} | {r['provenance']['wall_time_s']:.0f} s | "
                    f"`{r['provenance']['git']['commit'][:12]}`{' (dirty)' if r['provenance']['git']['dirty'] else ''} |")
    (STAGING / "REGRADE.md").write_text(
        f"# Quick profile, every milestone, at `{commit}`\n\n"
        f"`python grader.py regrade --jobs {args.jobs}` (ran `{' '.join(['python'] + cmd[1:]).replace(str(REPO) + '/', '')}`), "
        f"exit {code}, {time.time() - start:.0f} s wall in all.\n\n"
        "| milestone | result | wall time | commit |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    STAGING.rename(args.out)
    print(f"== regrade: exit {code}; reports in {args.out} (commit them)", flush=True)
    return code
