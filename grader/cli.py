"""mmsys grader: proves each milestone works.

    python grader.py m1                 shape tests, train (quick profile), gates, report
    python grader.py m2 --profile full  the spec's thresholds on real data (--data-root)
    python grader.py m1 --checkpoint runs/m1/checkpoint.pt   evaluate instead of training
    python grader.py m1 --impl ~/my-impl  grade the mmsys package in ~/my-impl
    python grader.py all                every milestone in order
    python grader.py all --jobs 2       every milestone, two at a time (one thread each on a 2-core CPU)
    python grader.py list               what there is
    python grader.py verify runs/m1/report.json   re-measure a report's gates from its checkpoint

For each milestone: run its pytest shape tests against the implementation (stop if any fail) ->
train with its recipe or load --checkpoint -> evaluate every gate -> print a table -> write
report.json / .md / .xml. Exit codes: 0 all gates pass, 1 a test or gate failed, 2 bad usage,
missing data or bad checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grader import EXIT_PASS, EXIT_USAGE, REPO, UsageError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="grader.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("milestone", help="m1..m5, 'all' or 'list' (or 'verify REPORT.json')")
    p.add_argument("--profile", choices=("quick", "full"), default="quick",
                   help="quick: embedded world on a CPU in minutes (default); full: real data, the spec's thresholds")
    p.add_argument("--smoke", action="store_true",
                   help="run the profile's smoke recipe (tiny models, few steps): proves the path on a CPU, "
                        "not the quality; the report says so")
    p.add_argument("--data-root", type=Path, default=None, help="folder holding the real datasets (full profile)")
    p.add_argument("--out", type=Path, default=REPO / "runs", help="output folder (default: runs/); reports go to OUT/<milestone>/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--checkpoint", type=Path, default=None, help="evaluate this checkpoint instead of training")
    p.add_argument("--impl", type=Path, default=None,
                   help="grade another implementation: a folder containing an 'mmsys' package (modules it lacks "
                        "come from the bundled package; the report lists which supplied what)")
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


def check_usage(args: argparse.Namespace) -> list[str]:
    """The milestone ids to grade; raises UsageError for any bad combination of options."""
    from milestones import MODULES, available, load
    if args.milestone == "all":
        if args.checkpoint:
            raise UsageError("--checkpoint names one milestone's checkpoint: use it with m1..m5, not 'all'")
        ids = available()
    elif args.milestone in MODULES:
        if args.milestone not in available():
            raise UsageError(f"{args.milestone} is not implemented yet; available: {', '.join(available())}")
        ids = [args.milestone]
    else:
        raise UsageError(f"unknown milestone {args.milestone!r}: use one of {', '.join(MODULES)}, 'all', 'list' "
                         f"or 'verify REPORT.json'")
    if args.resume and args.checkpoint:
        raise UsageError("--resume continues a training run; --checkpoint evaluates one without training: use one")
    not_resumable = [m for m in ids if not load(m).resumable] if args.resume else []
    if not_resumable:
        raise UsageError(f"--resume: {', '.join(not_resumable)} cannot resume "
                         f"training (only {', '.join(m for m in available() if load(m).resumable)}); drop --resume")
    no_profile = [m for m in ids if args.profile not in load(m).thresholds]
    if no_profile:
        raise UsageError(f"{', '.join(no_profile)} has no '{args.profile}' profile")
    no_smoke = [m for m in ids if args.smoke and args.profile not in load(m).smoke_recipes]
    if no_smoke:
        raise UsageError(f"--smoke: {', '.join(no_smoke)} has no smoke recipe for the {args.profile} profile; drop --smoke")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file (train first with `python grader.py {ids[0]}`)")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device here; use --device cpu")
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: give a number of processes >= 1")
    return ids


def is_user_error(e: Exception) -> bool:
    """Missing data, a bad checkpoint or an implementation that cannot be loaded: the user's to
    fix (one line, exit 2). The grader's own error types and the implementation's engine's
    (same names: its checkpoint reader may raise on --resume) both count."""
    from milestones.adapters import ImplementationError
    return isinstance(e, ImplementationError) or type(e).__name__ in ("DataMissingError", "CheckpointError")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["verify"]:
            from grader.verify import main as verify_main
            return verify_main(argv[1:])
        args = parse_args(argv)
        from milestones.adapters import use_implementation
        impl = use_implementation(args.impl)  # before anything imports mmsys
        if not args.download:
            from grader.offline import block_network
            block_network()
        if args.milestone == "list":
            from milestones import available, load
            for mid in available():
                m = load(mid)
                print(f"{mid}  {m.title}\n    quick: {m.thresholds.get('quick')}\n    full:  {m.thresholds.get('full')}")
            return EXIT_PASS
        ids = check_usage(args)
        if args.jobs > 1 and len(ids) > 1:
            from grader.parallel import grade_in_parallel
            codes = grade_in_parallel(ids, args)
        else:
            from grader.run import grade
            codes = {mid: grade(mid, args, impl) for mid in ids}
        if len(ids) > 1:
            print("== summary: " + ", ".join(f"{m} {'PASS' if c == 0 else 'FAIL'}" for m, c in codes.items()))
        return max(codes.values())
    except UsageError as e:
        print(f"grader: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # data/checkpoint/implementation problems are the user's to fix: one line, exit 2
        if is_user_error(e):
            print(f"grader: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise
