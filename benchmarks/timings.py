"""How long grading takes, against the targets of issue 22 ("grade in half the time").

    python -m benchmarks.timings                      the table of the reports in results/quick/
    python -m benchmarks.timings --reports runs       ... of any folder of graded milestones
    python -m benchmarks.timings --run                grade `all --jobs 2` and run the test command
                                                      now (into runs/timings/), then print the table

Each row is read from a milestone's report.json: wall time, CPU seconds (grader and candidate
process), torch threads, the training's own wall time, the commit and the machine. ``--run``
also times the two commands CI runs. The targets are per milestone on one torch thread (one
lane of ``--jobs 2``); a figure measured with more threads or on a loaded machine says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = {"m1": 180, "m2": 180, "m3": 180, "m4": 480, "m5": 720, "m6": 300, "m7": 300}  # quick, one thread
ALL_TARGET_S = 15 * 60  # `grader.py all --jobs 2`
PYTEST_TARGET_S = 3 * 60  # `python -m pytest -q`: the fast tests (slow and integration deselected)


def rows(folder: Path) -> list[dict]:
    """One row per milestone report under ``folder`` (OUT/<mid>/report.json, quick profile)."""
    out = []
    for mid in sorted(TARGET_S):
        path = folder / mid / "report.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        p, info = r["provenance"], r.get("info") or {}
        training = info.get("training") if isinstance(info.get("training"), dict) else {}
        out.append({"milestone": mid, "status": r["status"], "wall_s": p["wall_time_s"],
                    "cpu_s": p.get("cpu_time_s"), "threads": p.get("torch_threads"),
                    "train_wall_s": training.get("wall_s"), "commit": p["git"]["commit"][:7],
                    "dirty": p["git"]["dirty"], "cpu": (p.get("device") or {}).get("cpu", "?"),
                    "load": (p.get("loadavg_end") or ["?"])[0]})
    return out


def table(found: list[dict]) -> str:
    lines = ["| milestone | result | wall | training | CPU s | threads | target (one thread) | met | commit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in found:
        target = TARGET_S[r["milestone"]]
        train = f"{r['train_wall_s']:.0f} s" if r["train_wall_s"] else "-"
        lines.append(f"| {r['milestone']} | {r['status']} | {r['wall_s']:.0f} s | {train} | {r['cpu_s'] or 0:.0f} | "
                     f"{r['threads']} | <= {target} s | {'yes' if r['wall_s'] <= target else 'no'} | "
                     f"{r['commit']}{' (dirty)' if r['dirty'] else ''} |")
    return "\n".join(lines)


def timed(cmd: list[str], env: dict) -> tuple[int, float]:
    t0 = time.perf_counter()
    code = subprocess.run(cmd, cwd=REPO, env=env).returncode
    return code, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reports", type=Path, default=REPO / "results" / "quick")
    p.add_argument("--run", action="store_true", help="grade all --jobs 2 and run the tests now, timing both")
    a = p.parse_args(argv)
    env = {**os.environ}
    extra = []
    if a.run:
        out = REPO / "runs" / "timings"
        code, wall = timed([sys.executable, "grader.py", "all", "--jobs", "2", "--skip-tests", "--force", "--out",
                            str(out), "--no-progress"], env)
        extra.append(f"`grader.py all --jobs 2 --skip-tests`: {wall:.0f} s (exit {code}; target <= {ALL_TARGET_S} s)")
        code, wall = timed([sys.executable, "-m", "pytest", "-q"], env)
        extra.append(f"`python -m pytest -q` (the fast tests): {wall:.0f} s (exit {code}; target <= {PYTEST_TARGET_S} s)")
        code, wall = timed([sys.executable, "-m", "pytest", "-q", "-n", "auto", "--dist", "loadfile", "-m",
                            "slow or not slow"], env)
        extra.append(f"`python -m pytest -q -n auto --dist loadfile -m \"slow or not slow\"` (every test, CI's): "
                     f"{wall:.0f} s (exit {code})")
        a.reports = out
    found = rows(a.reports)
    if not found:
        print(f"no milestone reports under {a.reports}", file=sys.stderr)
        return 2
    print(f"reports: {a.reports}; machine: {found[0]['cpu']} ({os.cpu_count()} cores here, {platform.machine()})")
    print(table(found))
    for line in extra:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
