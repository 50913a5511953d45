"""mmsys grader: proves each milestone works.

    python grader.py m1                 shape tests, train (quick profile), gates, report
    python grader.py m2 --profile full  the spec's thresholds on real data (--data-root)
    python grader.py m1 --checkpoint runs/m1/checkpoint.pt   evaluate instead of training
    python grader.py m1 --impl ~/my-impl  grade the mmsys package in ~/my-impl
    python grader.py m1 --force         runs/m1 holds a run: move it aside (runs/m1.previous-<UTC time>/), grade again
    python grader.py all                every milestone in order
    python grader.py all --jobs 2       every milestone, two at a time (one thread each on a 2-core CPU)
    python grader.py list               what there is
    python grader.py verify runs/m1/report.json   re-measure a report's gates from its checkpoint
    python grader.py regrade            every quick milestone at HEAD, from a clean tree, into results/quick/

For each milestone: run its pytest shape tests against the implementation (stop if any fail) ->
train with its recipe or load --checkpoint -> evaluate every gate -> print a table -> write
report.json / .md / .xml. Every option, the --checkpoint file and the output folder are checked
before any work; a folder that already holds a run is never overwritten (--resume continues it,
--force moves it aside). Exit codes: 0 all gates pass, 1 a test or gate failed, 2 bad usage,
missing data or bad checkpoint (nothing written).
"""

from __future__ import annotations

import argparse
import os
import secrets
import re
import sys
from pathlib import Path

from grader import EXIT_PASS, EXIT_USAGE, REPO, UsageError
from milestones.base import PRECISIONS


SEED_LIMIT = 2 ** 32  # seeds are 0 <= seed < 2**32: every seed derived from it stays in torch's range


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (``grader: error: ...``, exit 2) like every other
    usage error, instead of the usage block."""

    def error(self, message):
        raise UsageError(f"{message} (see python grader.py --help)")


def seed_value(text: str) -> int:
    """``--seed``: an integer 0 <= seed < 2**32 (the m5 sampler multiplies it by 1,000,003 and
    the result must still fit ``torch.manual_seed``)."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= seed < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{text} is out of range: give 0 <= seed < 2**32 ({SEED_LIMIT})")
    return seed


def device_value(text: str) -> str:
    """``--device``: cpu, cuda or cuda:N (whether that device exists is checked by check_usage)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="grader.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("milestone", help="m1..m5, 'all' or 'list' (or 'verify REPORT.json')")
    p.add_argument("--profile", choices=("quick", "full"), default="quick",
                   help="quick: embedded world on a CPU in minutes (default); full: real data, the spec's thresholds")
    p.add_argument("--smoke", action="store_true",
                   help="run the profile's smoke recipe (tiny models, few steps): proves the path on a CPU, "
                        "not the quality; the report says so")
    p.add_argument("--data-root", type=Path, default=None, help="folder holding the real datasets (full profile)")
    p.add_argument("--out", type=Path, default=REPO / "runs", help="output folder (default: runs/); reports go to OUT/<milestone>/")
    p.add_argument("--seed", type=seed_value, default=0, help="training seed, 0 <= seed < 2**32 (default 0)")
    p.add_argument("--world-seed", type=seed_value, default=0,
                   help="the embedded world's seed, 0 <= seed < 2**32 (default 0): every split of the world "
                        "(train, val, test, held-out) is drawn from it; calibration varies it with --seed")
    p.add_argument("--hidden-seed", action="store_true",
                   help="draw the world seed of the test splits (test, held-out) at random for this run and "
                        "reveal it only in the report: an implementation cannot regenerate the test split, and "
                        "so its labels, from its own copy of the world (train and val stay on --world-seed)")
    p.add_argument("--test-world-seed", type=seed_value, default=None, help=argparse.SUPPRESS)  # --jobs children
    p.add_argument("--require-human", action="store_true",
                   help="a gate that waits for a person (m5's human evaluation) fails while no answers are "
                        "recorded, instead of reading 'pending' (exit 0)")
    p.add_argument("--device", type=device_value, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 where a recipe asks for it and the device runs bf16 natively, "
                        "float32 elsewhere; float32: never bf16, so a machine with native bf16 trains in the "
                        "number format of one without it (the CPU's kernel level still differs: the same seed "
                        "agrees in distribution, not bit for bit; benchmarks/calibrate.py --precision float32)")
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
    p.add_argument("--force", action="store_true",
                   help="OUT/<milestone> already holds a run: move it aside to OUT/<milestone>.previous-<UTC time>/ "
                        "and grade again (m5: a person's human_eval answers are copied into the new folder)")
    p.add_argument("--jobs", type=int, default=1,
                   help="with 'all': grade this many milestones at once, each in its own process with "
                        "cores/jobs torch threads and its log in OUT/<milestone>.log (default 1: in turn)")
    p.add_argument("--nproc", type=int, default=1,
                   help="train on this many processes (ranks) at once: the grader starts one copy of itself per "
                        "rank, the engine splits each global batch across them (DistributedDataParallel); rank 0 "
                        "writes the report (grader/ranks.py). Default 1")
    p.add_argument("--isolation", choices=("none", "process"), default="process",
                   help="process (default): import the implementation only in a child process (no grader package "
                        "importable there, its own folder, as nobody when root; grader/candidate.py) and query "
                        "it; none: import it in the grader's own process, for debugging (the report says which)")
    p.add_argument("--call-timeout", type=float, default=None,
                   help="with --isolation process: seconds the candidate may stay silent in one call before the "
                        "run fails (default 1800; its start, importing torch, may take up to max(this, 300) s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--format", choices=("gradescope",), default=None,
                   help="also write OUT/<milestone>/results.json in Gradescope's autograder format (points per "
                        "gate from the milestone's POINTS, hidden gates kept out of the public feedback); the "
                        "JSON, Markdown and JUnit reports are written as always")
    args = p.parse_args(argv)
    if args.test_world_seed is None:  # drawn here, once: `all --jobs N` passes it to every child
        args.test_world_seed = secrets.randbelow(SEED_LIMIT) if args.hidden_seed else args.world_seed
    return args


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
    if args.resume and args.force:
        raise UsageError("--resume continues the run in OUT/<milestone>; --force moves it aside and starts again: use one")
    not_resumable = [m for m in ids if not load(m).resumable] if args.resume else []
    if not_resumable:
        raise UsageError(f"--resume: {', '.join(not_resumable)} cannot resume "
                         f"training (only {', '.join(m for m in available() if load(m).resumable)}); drop --resume")
    no_profile = [m for m in ids if args.profile not in load(m).thresholds]
    if no_profile and args.milestone != "all":
        why = load(no_profile[0]).data_needed.get(args.profile)
        raise UsageError(f"{no_profile[0]} has no '{args.profile}' profile" + (f" ({why})" if why else ""))
    if no_profile:  # `all`: graded without them, and said so
        print(f"== {', '.join(no_profile)}: no '{args.profile}' profile, not graded "
              f"({', '.join(load(m).data_needed.get(args.profile, 'quick only') for m in no_profile)})", flush=True)
        ids = [m for m in ids if m not in no_profile]
    no_smoke = [m for m in ids if args.smoke and args.profile not in load(m).smoke_recipes]
    if no_smoke:
        raise UsageError(f"--smoke: {', '.join(no_smoke)} has no smoke recipe for the {args.profile} profile; drop --smoke")
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: give a number of processes >= 1")
    if args.nproc < 1:
        raise UsageError(f"--nproc {args.nproc}: give a number of processes >= 1")
    if args.nproc > 1 and len(ids) > 1:
        raise UsageError("--nproc spreads one milestone's training over processes: name one milestone "
                         "(grade several at once with 'all --jobs N')")
    if args.nproc > 1 and args.checkpoint:
        raise UsageError("--nproc spreads training; --checkpoint evaluates without training: drop --nproc")
    check_device(args.device)
    if args.checkpoint is not None:
        check_checkpoint(args.checkpoint, load(ids[0]))
    from grader.outdir import check_no_earlier_run, check_writable
    folders = out_folders(ids, args)
    check_writable(args.out, list(folders.values()))
    check_no_earlier_run(folders, args.force, args.resume)
    return ids


def check_device(device: str) -> None:
    """UsageError unless ``device`` (cpu, cuda or cuda:N) exists here."""
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device here; use --device cpu")
        index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")


def check_checkpoint(path: Path, milestone) -> None:
    """Open ``--checkpoint`` with the grader's reader before anything runs: a missing, empty,
    truncated or foreign file, or one of another milestone's kind, stops here (exit 2, nothing
    written) instead of after the shape tests and the judges' training."""
    if not path.is_file():
        raise UsageError(f"--checkpoint {path}: no such file (train first with `python grader.py {milestone.id}`)")
    from milestones.common import read_checkpoint
    read_checkpoint(path, milestone.checkpoint_kind or None)  # CheckpointError -> exit 2 (is_user_error)


def out_folders(ids: list[str], args: argparse.Namespace) -> dict[str, Path]:
    """{milestone id: its run folder OUT/<mid>[-profile][-smoke]}."""
    from grader.run import out_dir_for
    return {mid: out_dir_for(mid, args) for mid in ids}


def is_user_error(e: Exception) -> bool:
    """Missing data, a bad checkpoint or an implementation that cannot be loaded: the user's to
    fix (one line, exit 2). The grader's own error types and the implementation's engine's
    (same names: its checkpoint reader may raise on --resume) both count, and so do their
    subclasses (e.g. the spoken world's EspeakMissingError, a DataMissingError)."""
    from milestones.adapters import ImplementationError
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, ImplementationError) or bool(names & {"DataMissingError", "CheckpointError"})


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["verify"]:
            from grader.verify import main as verify_main
            return verify_main(argv[1:])
        if argv[:1] == ["regrade"]:
            from grader.regrade import main as regrade_main
            return regrade_main(argv[1:])
        args = parse_args(argv)
        launching = args.nproc > 1 and "RANK" not in os.environ  # --nproc: this process starts the ranks
        if "RANK" in os.environ and getattr(args, "isolation", "none") == "process":
            from grader.ranks import take_rank_env
            take_rank_env()  # a rank (grader/ranks.py): its candidate process trains, on the rank's variables
        if getattr(args, "isolation", "none") == "process":
            from grader.candidate import isolate
            from grader.candidate import grader_folders
            # the implementation is imported in the child only, which reads nothing of the grader's
            # started now (an implementation that cannot be imported: exit 2 before any work), except
            # where this process grades nothing itself: 'list', 'all --jobs N' and '--nproc N' (its children do)
            grades_here = args.milestone != "list" and not (args.milestone == "all" and args.jobs > 1) \
                and not launching
            impl = isolate(args.impl, args.call_timeout, grader_folders(args.data_root, args.out), start=grades_here)
        else:
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
        from grader.outdir import prepare
        prepare(out_folders(ids, args), args.force, args.checkpoint)  # --force: earlier runs moved aside
        if launching:
            from grader.ranks import launch
            return launch(ids[0], args)
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
