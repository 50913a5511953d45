"""Calibrate a milestone's quick thresholds from several honest runs and their controls.

    python -m benchmarks.calibrate m1                 3 runs: (seed, world seed) = (0, 0), (1, 1), (2, 2)
    python -m benchmarks.calibrate m1 m2 --jobs 2     two runs at a time, one torch thread each
    python -m benchmarks.calibrate m1 --collect-only  rebuild the tables from runs already made
    python -m benchmarks.calibrate m4 --pairs 1,1 2,2 run only these (seed, world seed) pairs, then
                                                      tabulate every run of PAIRS found
    python -m benchmarks.calibrate m4 --tag float32   another kind of machine's calibration, kept
                                                      apart: runs, table and copies named m4-float32
    python -m benchmarks.calibrate m4 --precision float32
                                                      graded with --precision float32 (never bf16):
                                                      a float32-only CPU's numbers on any CPU, tagged
                                                      float32

Each run is ``grader.py MID --seed S --world-seed W`` (training seed and world seed both differ),
into ``runs/calibration/MID/sS-wW/``; its report.json and report.md are copied to
``results/calibration/runs/``. The table ``results/calibration/MID.md`` (and ``.json``) lists,
per gate, every honest run's value and every control's, the worst honest run, the best control,
the threshold in force and its margins to both, and the CPU each run trained on (torch's kernel
level and whether it has native bf16: a recipe that asks for bf16 trains in float32 without it,
and the two need not agree, results/calibration/m4-float32.md). The rule for a threshold: it
lies beyond the best control and below the worst honest run by at least ``margin = max(SIGMAS x the honest
runs' standard deviation, REL x |worst honest|)`` (a gate's spread across seeds, and a floor for
when three runs happen to agree); the 'suggested' column is ``worst honest - margin`` (in the
gate's direction). Moving a threshold is a commit that cites this table.

While runs are in progress the tables are not written (``--collect-only`` refuses, exit 2):
files written into ``results/`` then would be untracked changes in the tree those runs record,
and every report made meanwhile would say "dirty". A run in progress is a file
``runs/calibration/.running/PID`` whose process is alive.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "calibration"
RESULTS = REPO / "results" / "calibration"
PAIRS = ((0, 0), (1, 1), (2, 2))  # (training seed, world seed): (0, 0) is what CI grades
SIGMAS = 3.0  # the margin below the worst honest run, in standard deviations of the honest runs ...
REL = 0.02  # ... and at least this share of the worst honest value


class CalibrationBusy(RuntimeError):
    """Tables asked for while calibration runs are in progress."""


def running_pids() -> list[int]:
    """The pids of calibration processes whose runs are in progress (stale lock files removed)."""
    live = []
    for lock in sorted((RUNS / ".running").glob("*")) if (RUNS / ".running").is_dir() else []:
        try:
            pid = int(lock.name)
            os.kill(pid, 0)
            live.append(pid)
        except (ValueError, ProcessLookupError):
            lock.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            live.append(int(lock.name))
    return live


def table_name(mid: str, tag: str | None = None) -> str:
    """``MID`` or ``MID-TAG``: the name of a calibration's runs folder, table and report copies."""
    return f"{mid}-{tag}" if tag else mid


def run_folder(mid: str, seed: int, world: int, tag: str | None = None) -> Path:
    return RUNS / table_name(mid, tag) / f"s{seed}-w{world}"


def command(mid: str, seed: int, world: int, tag: str | None = None, precision: str = "auto") -> list[str]:
    return [sys.executable, str(REPO / "grader.py"), mid, "--seed", str(seed), "--world-seed", str(world),
            "--out", str(run_folder(mid, seed, world, tag)), "--no-progress", "--skip-tests", "--precision", precision]


def run_all(jobs: list[tuple[str, int, int]], parallel: int, tag: str | None = None, precision: str = "auto") -> None:
    """Run the grader for each (mid, seed, world) not yet graded, ``parallel`` at a time."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    lock = RUNS / ".running" / str(os.getpid())
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    try:
        _run_jobs(jobs, parallel, env, tag, precision)
    finally:
        lock.unlink(missing_ok=True)


def _run_jobs(jobs: list[tuple[str, int, int]], parallel: int, env: dict, tag: str | None, precision: str) -> None:
    todo = [j for j in jobs if not (run_folder(*j, tag) / j[0] / "report.json").exists()]
    running: list[tuple[subprocess.Popen, tuple, float]] = []
    while todo or running:
        while todo and len(running) < parallel:
            job = todo.pop(0)
            folder = run_folder(*job, tag)
            shutil.rmtree(folder, ignore_errors=True)  # an interrupted run: start it again
            folder.mkdir(parents=True)
            log = open(folder.with_suffix(".log"), "w")
            running.append((subprocess.Popen(command(*job, tag, precision), stdout=log, stderr=subprocess.STDOUT, env=env), job, time.time()))
            print(f"== {job[0]} seed {job[1]} world {job[2]}: started", flush=True)
        time.sleep(5)
        for item in list(running):
            proc, job, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"== {job[0]} seed {job[1]} world {job[2]}: exit {proc.returncode} [{time.time() - t0:.0f} s]",
                      flush=True)


def cpu_of(report: dict) -> str | None:
    """The CPU a run trained on, as the table shows it ("AVX2, no native bf16"); None for a
    report made before reports recorded it."""
    isa = report["provenance"].get("device", {}).get("cpu_isa")
    if not isa:
        return None
    forced = report["provenance"].get("options", {}).get("precision") == "float32"
    return f"{isa['capability']}, {'native bf16' if isa['bf16'] else 'no native bf16'}" + (", float32 forced" if forced else "")


def collect(mid: str, pairs=PAIRS, tag: str | None = None, precision: str = "auto") -> dict:
    """The calibration table of ``mid`` from its runs' reports (refused with
    :class:`CalibrationBusy` while calibration runs are in progress)."""
    from milestones import load
    busy = running_pids()
    if busy:
        raise CalibrationBusy(f"calibration runs are in progress (pid {', '.join(map(str, busy))}): collect when "
                              f"they end, a table written now would make their reports dirty")
    m = load(mid)
    runs = []
    for seed, world in pairs:
        path = run_folder(mid, seed, world, tag) / mid / "report.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        runs.append({"seed": seed, "world_seed": world, "status": r["status"], "commit": r["provenance"]["git"]["commit"],
                     "dirty": r["provenance"]["git"]["dirty"], "wall_time_s": r["provenance"]["wall_time_s"],
                     "cpu": cpu_of(r),
                     "gates": {g["gate"]: g["value"] for g in r["gates"]},
                     "controls": [{"control": c["control"], "gate": c["gate"], "value": c["value"]}
                                  for c in r.get("controls", [])]})
        dest = RESULTS / "runs" / table_name(mid, tag) / f"s{seed}-w{world}"
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("report.json", "report.md"):
            shutil.copy2(path.parent / name, dest / name)
    gates = []
    for g in m.all_gates():
        honest = [r["gates"].get(g.key) for r in runs if r["gates"].get(g.key) is not None]
        controls = [c["value"] for r in runs for c in r["controls"] if c["gate"] == g.key and c["value"] is not None]
        threshold = m.thresholds["quick"].get(g.key)
        row = {"gate": g.key, "direction": g.direction, "threshold": threshold, "honest": honest, "controls": controls}
        if honest and controls:
            sign = 1 if g.direction == ">" else -1
            worst = min(honest, key=lambda v: sign * v)
            best_control = max(controls, key=lambda v: sign * v)
            gap = sign * (worst - best_control)
            mean = sum(honest) / len(honest)
            sd = (sum((v - mean) ** 2 for v in honest) / (len(honest) - 1)) ** 0.5 if len(honest) > 1 else float("nan")
            margin = max(SIGMAS * sd if sd == sd else 0.0, REL * abs(worst))
            suggested = worst - sign * margin
            row.update(worst_honest=worst, best_control=best_control, gap=gap, sd=sd, margin=margin,
                       suggested=suggested if sign * (suggested - best_control) > 0 else None, separated=gap > 0)
            if threshold is not None:
                below, above = sign * (worst - threshold), sign * (threshold - best_control)
                row.update(margin_below_worst=below, margin_above_control=above,
                           margin_below_worst_sd=below / sd if sd and sd == sd else None,
                           threshold_ok=below >= margin and above > 0)
        gates.append(row)
    return {"milestone": mid, "tag": tag, "precision": precision, "pairs": [list(p) for p in pairs], "margin_rule": {"sigmas": SIGMAS, "relative": REL},
            "runs": runs, "gates": gates}


def to_markdown(table: dict) -> str:
    def f(v):
        return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    runs = table["runs"]
    mid, tag, precision = table["milestone"], table.get("tag"), table.get("precision", "auto")
    flags = (f" --tag {tag}" if tag else "") + (f" --precision {precision}" if precision != "auto" else "")
    out = [f"# Calibration of {mid} (quick profile){f', {tag}' if tag else ''}", "",
           f"Made by `python -m benchmarks.calibrate {mid}{flags}`: {len(runs)} honest runs, training seed and "
           f"world seed both varied; every control measured in each run with its gate's protocol. Rule: a threshold "
           f"lies beyond the best control and at least margin = max({SIGMAS:g} sd of the honest runs, {REL:.0%} of the "
           f"worst honest value) below the worst honest run; 'suggested' = worst honest - margin.", "",
           "| run (seed, world seed) | status | commit | wall time | CPU |", "|---|---|---|---|---|"]
    out += [f"| ({r['seed']}, {r['world_seed']}) | {r['status']} | `{r['commit'][:12]}`{' (dirty)' if r['dirty'] else ''} | "
            f"{r['wall_time_s']:.0f} s | {r.get('cpu') or 'not recorded'} |" for r in runs]
    out += ["", "| gate | honest runs | sd | best control | threshold | below worst honest (sd) | above best control | "
            "suggested | rule met |", "|---|---|---|---|---|---|---|---|---|"]
    for g in table["gates"]:
        sds = f" ({g['margin_below_worst_sd']:.1f})" if g.get("margin_below_worst_sd") is not None else ""
        out.append(f"| {g['gate']} ({g['direction']}) | {', '.join(map(f, g['honest']))} | {f(g.get('sd'))} | "
                   f"{f(g.get('best_control'))} | {f(g['threshold'])} | {f(g.get('margin_below_worst'))}{sds} | "
                   f"{f(g.get('margin_above_control'))} | {f(g.get('suggested'))} | "
                   f"{'yes' if g.get('threshold_ok') else 'NO' if 'threshold_ok' in g else 'n/a'} |")
    out += ["", "Per run and control:", "", "| run | control | gate | value |", "|---|---|---|---|"]
    out += [f"| ({r['seed']}, {r['world_seed']}) | {c['control']} | {c['gate']} | {f(c['value'])} |"
            for r in runs for c in r["controls"]]
    return "\n".join(out) + "\n"


def pair(text: str) -> tuple[int, int]:
    """``--pairs`` item ``S,W``: one of :data:`PAIRS` (the tables read those)."""
    try:
        value = tuple(int(v) for v in text.split(","))
    except ValueError:
        value = ()
    if value not in PAIRS:
        raise argparse.ArgumentTypeError(f"{text!r}: give SEED,WORLD, one of " + " ".join(f"{s},{w}" for s, w in PAIRS))
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("milestones", nargs="+")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--collect-only", action="store_true", help="only rebuild the tables from existing runs")
    p.add_argument("--pairs", nargs="+", type=pair, default=list(PAIRS), metavar="S,W",
                   help="the (seed, world seed) pairs to run, of " + " ".join(f"{s},{w}" for s, w in PAIRS))
    p.add_argument("--tag", help="name this calibration MID-TAG (runs, table, report copies): another kind of "
                                 "machine's, kept apart from MID's (e.g. float32)")
    from milestones.base import PRECISIONS
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="grade with this --precision; float32 (never bf16) tags the calibration 'float32' "
                        "unless --tag names it: a float32-only CPU's numbers, made on any CPU")
    args = p.parse_args(argv)
    if args.precision == "float32" and args.tag is None:
        args.tag = "float32"
    if args.tag is not None and not args.tag.replace("-", "").isalnum():
        print(f"calibrate: error: --tag {args.tag!r}: use letters, digits and '-' (it names files)", file=sys.stderr)
        return 2
    if not args.collect_only:
        run_all([(mid, s, w) for mid in args.milestones for s, w in args.pairs], args.jobs, args.tag, args.precision)
    try:
        tables = [collect(mid, tag=args.tag, precision=args.precision) for mid in args.milestones]
    except CalibrationBusy as e:
        print(f"calibrate: error: {e}", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    for table in tables:
        name = table_name(table["milestone"], table["tag"])
        (RESULTS / f"{name}.json").write_text(json.dumps(table, indent=2))
        (RESULTS / f"{name}.md").write_text(to_markdown(table))
        print(to_markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
