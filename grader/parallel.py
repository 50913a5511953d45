"""``grader.py all --jobs N``: grade milestones in N child processes at once."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from grader import REPO


def child_options(args: argparse.Namespace) -> list[str]:
    """The command-line options every child gets: the parent's, minus --jobs, plus --no-progress
    (--force too: the parent has already moved the earlier runs aside, so the children find none)."""
    rest = ["--profile", args.profile, "--out", str(args.out), "--seed", str(args.seed),
            "--world-seed", str(args.world_seed), "--device", args.device, "--no-progress",
            "--precision", getattr(args, "precision", "auto")]
    for flag, value in (("--data-root", args.data_root), ("--impl", args.impl), ("--format", getattr(args, "format", None)),
                        ("--isolation", getattr(args, "isolation", None)),
                        ("--test-world-seed", getattr(args, "test_world_seed", None)),
                        ("--call-timeout", getattr(args, "call_timeout", None))):
        rest += [flag, str(value)] if value else []
    rest += [flag for flag, on in (("--download", args.download), ("--skip-tests", args.skip_tests),
                                   ("--smoke", args.smoke), ("--force", getattr(args, "force", False)),
                                   ("--resume", getattr(args, "resume", False)),
                                   ("--require-human", args.require_human),
                                   ("--hidden-seed", getattr(args, "hidden_seed", False))) if on]
    return rest


def stamp(path) -> tuple | None:
    """What identifies one write of a file (inode, mtime in ns, size), or None when it is absent:
    a report whose stamp is unchanged after its child ran was not written by this run."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def grade_in_parallel(ids: list[str], args: argparse.Namespace) -> dict[str, int]:
    """Grade ``ids`` in ``args.jobs`` child processes (``grader.py <mid>`` with the same options),
    the later, heavier milestones first; each child gets cores/jobs torch threads (unless
    OMP_NUM_THREADS is set) and writes its output to OUT/<mid>.log. Returns {mid: exit code}."""
    from grader.report import gate_table
    from grader.run import out_dir_for

    rest = child_options(args)
    from grader.offline import child_env
    env = child_env(os.environ)  # each child (and what it starts) keeps the offline guard
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    args.out.mkdir(parents=True, exist_ok=True)
    queue, running, codes, before = sorted(ids, reverse=True), {}, {}, {}
    while queue or running:
        while queue and len(running) < args.jobs:
            mid = queue.pop(0)
            log = out_dir_for(mid, args).with_suffix(".log")
            before[mid] = stamp(out_dir_for(mid, args) / "report.json")
            with open(log, "w") as f:  # the child keeps its own copy of the descriptor
                proc = subprocess.Popen([sys.executable, str(REPO / "grader.py"), mid, *rest],
                                        stdout=f, stderr=subprocess.STDOUT, env=env)
            running[mid] = (proc, time.time(), log)
            print(f"== {mid}: started ({env['OMP_NUM_THREADS']} threads), log {log}", flush=True)
        time.sleep(2)
        for mid, (proc, t0, log) in list(running.items()):
            if proc.poll() is not None:
                codes[mid] = proc.returncode
                del running[mid]
                print(f"== {mid}: {'PASS' if proc.returncode == 0 else 'FAIL'} (exit {proc.returncode}) "
                      f"[{time.time() - t0:.0f} s]", flush=True)
    for mid in sorted(codes):  # only the reports this run wrote: an older one may lie in a resumed folder
        report = out_dir_for(mid, args) / "report.json"
        now = stamp(report)
        if now is not None and now != before[mid]:
            print(f"\n== {mid}\n" + gate_table(json.loads(report.read_text())["gates"]))
        else:
            log = out_dir_for(mid, args).with_suffix(".log")
            print(f"\n== {mid}: no report written by this run (exit {codes[mid]}): see {log}")
    return codes
