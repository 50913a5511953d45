#!/usr/bin/env python
"""mmsys grader: proves each milestone works.

    python grader.py m1                 shape tests, train (quick profile), gates, report
    python grader.py m2 --profile full  the spec's thresholds on real data (--data-root)
    python grader.py m1 --checkpoint runs/m1/checkpoint.pt   evaluate instead of training
    python grader.py all                every milestone in order
    python grader.py all --jobs 2       every milestone, two at a time (one thread each on a 2-core CPU)
    python grader.py list               what there is

For each milestone: run its pytest shape tests (stop if any fail) -> train with its recipe or
load --checkpoint -> evaluate every gate -> print a table -> write report.json / .md / .xml.
Exit codes: 0 all gates pass, 1 a test or gate failed, 2 bad usage, missing data or bad checkpoint.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input: the message says what to do; exit code 2."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="grader.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("milestone", help="m1..m5, 'all' or 'list'")
    p.add_argument("--profile", choices=("quick", "full"), default="quick",
                   help="quick: embedded world on a CPU in minutes (default); full: real data, the spec's thresholds")
    p.add_argument("--data-root", type=Path, default=None, help="folder holding the real datasets (full profile)")
    p.add_argument("--out", type=Path, default=REPO / "runs", help="output folder (default: runs/); reports go to OUT/<milestone>/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--checkpoint", type=Path, default=None, help="evaluate this checkpoint instead of training")
    p.add_argument("--impl", type=Path, default=None, help="grade another implementation: folder containing an 'mmsys' package")
    p.add_argument("--download", action="store_true", help="allow downloading datasets (off by default: the grader runs offline)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the shape tests first (the report says so)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted training run from its last checkpoint in OUT/<milestone>/ "
                        "(same recipe and seed, or one that only extends it with a warm restart; resume "
                        "is exact); milestones that support it: m1")
    p.add_argument("--jobs", type=int, default=1,
                   help="with 'all': grade this many milestones at once, each in its own process with "
                        "cores/jobs torch threads and its log in OUT/<milestone>.log (default 1: in turn)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def use_implementation(impl: Path | None) -> str:
    """Make ``import mmsys`` load the implementation at ``impl`` (for us and for pytest)."""
    if impl is None:
        return str(REPO / "mmsys")
    impl = impl.resolve()
    if not (impl / "mmsys" / "__init__.py").is_file():
        raise UsageError(f"--impl {impl}: no mmsys package there (expected {impl / 'mmsys' / '__init__.py'})")
    sys.path.insert(0, str(impl))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(impl), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return str(impl / "mmsys")


def run_shape_tests(milestone, out_dir: Path, skip: bool) -> dict:
    """Run the milestone's fast pytest tests (marker, not slow); junit XML in out_dir."""
    if skip:
        return {"passed": False, "skipped": True, "summary": "skipped by --skip-tests"}
    junit = out_dir / "pytest.xml"
    files = [str(REPO / f) for f in milestone.test_files]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", f"{milestone.marker} and not slow",
           f"--junitxml={junit}", *files]
    print(f"== {milestone.id}: shape tests: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else "no output"
    if proc.returncode != 0:
        print(proc.stdout[-20000:], proc.stderr[-5000:], sep="\n", flush=True)
    else:
        print(f"   {summary}", flush=True)
    return {"passed": proc.returncode == 0, "returncode": proc.returncode, "summary": summary,
            "command": " ".join(["python"] + cmd[1:]).replace(str(REPO) + "/", ""), "junit": str(junit)}


def out_dir_for(mid: str, args: argparse.Namespace) -> Path:
    """OUT/<mid> for the quick profile, OUT/<mid>-<profile> otherwise."""
    return args.out / (mid if args.profile == "quick" else f"{mid}-{args.profile}")


def grade(mid: str, args: argparse.Namespace, impl_path: str) -> int:
    from milestones import load
    from milestones.base import RunContext
    import torch

    from milestones.offline import record
    from milestones.report import command_line, device_info, gate_table, git_state, library_versions, write_report

    milestone = load(mid)
    if args.profile not in milestone.thresholds:
        raise UsageError(f"{mid} has no '{args.profile}' profile; choose one of {', '.join(milestone.thresholds)}")
    out_dir = out_dir_for(mid, args)
    out_dir.mkdir(parents=True, exist_ok=True)
    start, cpu_start, git = time.time(), time.process_time(), git_state(REPO)  # the code as it was at the start
    report = {"milestone": mid, "title": milestone.title, "profile": args.profile,
              "criteria": [c.__dict__ for c in milestone.criteria],
              "thresholds": milestone.thresholds[args.profile], "interface": milestone.interface,
              "data_needed": milestone.data_needed.get(args.profile)}
    tests = run_shape_tests(milestone, out_dir, args.skip_tests)
    report["tests"] = tests
    result, error = None, None
    if tests["passed"] or tests.get("skipped"):
        ctx = RunContext(profile=args.profile, seed=args.seed, out_dir=out_dir, device=args.device,
                         data_root=args.data_root, checkpoint=args.checkpoint, download=args.download,
                         progress=not args.no_progress, resume=args.resume)
        print(f"== {mid}: {milestone.title} ({args.profile} profile)", flush=True)
        result = milestone.run(ctx)  # DataMissingError / CheckpointError propagate to main -> exit 2
    else:
        error = "shape tests failed: gates not evaluated"
    rows = milestone.verdicts(result, args.profile) if result else [
        {"gate": g.key, "description": g.description, "value": None, "direction": g.direction,
         "threshold": milestone.thresholds[args.profile][g.key], "passed": False} for g in milestone.gates]
    ok = bool(result) and all(r["passed"] for r in rows) and (tests["passed"] or tests.get("skipped"))
    ckpt = None
    if result and result.checkpoint:
        from mmsys.checkpoint import sha256_file
        ckpt = {"path": result.checkpoint, "sha256": sha256_file(result.checkpoint),
                "trained_here": args.checkpoint is None}
    report.update({
        "status": "pass" if ok else "fail", "error": error, "gates": rows,
        "metrics": result.metrics if result else {}, "info": result.info if result else {},
        "datasets": result.datasets if result else [], "checkpoint": ckpt,
        "config": result.config if result else {}, "figures": result.figures if result else [],
        "provenance": {"git": git, "command": command_line(), "seed": args.seed,
                       "implementation": impl_path, "libraries": library_versions(),
                       "device": device_info(args.device), "wall_time_s": time.time() - start,
                       # on a shared machine wall time depends on the load: CPU seconds of this
                       # process (all its threads; shape tests excluded) and the load averages
                       "cpu_time_s": time.process_time() - cpu_start, "torch_threads": torch.get_num_threads(),
                       "loadavg_end": list(os.getloadavg()),
                       "network": record(args.download),
                       "note": "BLEU and accuracies are fractions in [0, 1] unless a key says otherwise"},
    })
    paths = write_report(report, out_dir)
    print(f"\n== {mid} ({args.profile}): {report['status'].upper()}  [{time.time() - start:.0f} s]")
    print(gate_table(rows))
    print(f"report: {paths['markdown']}  (json: {paths['json']}, junit: {paths['junit']})\n", flush=True)
    return EXIT_PASS if ok else EXIT_FAIL


def grade_in_parallel(ids: list[str], args: argparse.Namespace) -> dict[str, int]:
    """Grade ``ids`` in ``args.jobs`` child processes (``grader.py <mid>`` with the same options),
    the later, heavier milestones first; each child gets cores/jobs torch threads (unless
    OMP_NUM_THREADS is set) and writes its output to OUT/<mid>.log. Returns {mid: exit code}."""
    import json
    from milestones.report import gate_table
    rest = ["--profile", args.profile, "--out", str(args.out), "--seed", str(args.seed), "--device", args.device,
            "--no-progress"]
    for flag, value in (("--data-root", args.data_root), ("--impl", args.impl)):
        rest += [flag, str(value)] if value else []
    rest += [flag for flag, on in (("--download", args.download), ("--skip-tests", args.skip_tests)) if on]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    args.out.mkdir(parents=True, exist_ok=True)
    queue, running, codes = sorted(ids, reverse=True), {}, {}
    while queue or running:
        while queue and len(running) < args.jobs:
            mid = queue.pop(0)
            log = out_dir_for(mid, args).with_suffix(".log")
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
    for mid in sorted(codes):
        report = out_dir_for(mid, args) / "report.json"
        if report.is_file():
            print(f"\n== {mid}\n" + gate_table(json.loads(report.read_text())["gates"]))
    return codes


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        impl_path = use_implementation(args.impl)
        if not args.download:
            from milestones.offline import block_network
            block_network()
        from milestones import MODULES, available, load
        if args.milestone == "list":
            for mid in available():
                m = load(mid)
                print(f"{mid}  {m.title}\n    quick: {m.thresholds.get('quick')}\n    full:  {m.thresholds.get('full')}")
            return EXIT_PASS
        if args.milestone == "all":
            if args.checkpoint:
                raise UsageError("--checkpoint names one milestone's checkpoint: use it with m1..m5, not 'all'")
            ids = available()
        elif args.milestone in MODULES:
            if args.milestone not in available():
                raise UsageError(f"{args.milestone} is not implemented yet; available: {', '.join(available())}")
            ids = [args.milestone]
        else:
            raise UsageError(f"unknown milestone {args.milestone!r}: use one of {', '.join(MODULES)}, 'all' or 'list'")
        if args.resume and args.checkpoint:
            raise UsageError("--resume continues a training run; --checkpoint evaluates one without training: use one")
        not_resumable = [m for m in ids if not load(m).resumable] if args.resume else []
        if not_resumable:
            raise UsageError(f"--resume: {', '.join(not_resumable)} cannot resume "
                             f"training (only {', '.join(m for m in available() if load(m).resumable)}); drop --resume")
        if args.checkpoint is not None and not args.checkpoint.is_file():
            raise UsageError(f"--checkpoint {args.checkpoint}: no such file (train first with `python grader.py {ids[0]}`)")
        if args.device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                raise UsageError(f"--device {args.device}: no CUDA device here; use --device cpu")
        if args.jobs < 1:
            raise UsageError(f"--jobs {args.jobs}: give a number of processes >= 1")
        if args.jobs > 1 and len(ids) > 1:
            codes = grade_in_parallel(ids, args)
        else:
            codes = {mid: grade(mid, args, impl_path) for mid in ids}
        if len(ids) > 1:
            print("== summary: " + ", ".join(f"{m} {'PASS' if c == 0 else 'FAIL'}" for m, c in codes.items()))
        return max(codes.values())
    except UsageError as e:
        print(f"grader: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # data/checkpoint problems are the user's to fix: one line, exit 2
        from mmsys.checkpoint import CheckpointError
        from mmsys.data.split import DataMissingError
        if isinstance(e, (DataMissingError, CheckpointError)):
            print(f"grader: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
