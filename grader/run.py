"""Grade one milestone: shape tests -> train or load -> every gate -> report.

The shape tests run in a child pytest with the grader's checkout first on ``sys.path`` and
``MMSYS_IMPL`` naming the implementation folder, so they test the implementation (through
:mod:`milestones.adapters`) while the tests, data and metrics stay the grader's.
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

from grader import EXIT_FAIL, EXIT_PASS, REPO
from grader.ranks import RANK_VARS, world_size


def run_shape_tests(milestone, out_dir: Path, skip: bool, impl: dict) -> dict:
    """Run the milestone's pytest tests (its marker, integration tests included, not slow) against the implementation
    ``impl`` (:func:`milestones.adapters.use_implementation`'s record); junit XML in out_dir."""
    if skip:
        return {"passed": False, "skipped": True, "summary": "skipped by --skip-tests"}
    junit = out_dir / "pytest.xml"
    files = [str(REPO / f) for f in milestone.test_files]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO),
           "-m", f"{milestone.marker} and not slow", f"--junitxml={junit}", *files]
    from grader.offline import child_env
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    env = child_env(env)  # the offline guard holds in the pytest child and whatever it starts
    env.pop("MMSYS_IMPL", None)
    for k in RANK_VARS:  # a --nproc rank's tests run single-process
        env.pop(k, None)
    if not impl["bundled"]:
        env["MMSYS_IMPL"] = str(Path(impl["path"]).parent)
    print(f"== {milestone.id}: shape tests against {impl['path']}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = junit_summary(junit) or (lines[-1] if lines else "no output")
    if proc.returncode != 0:
        print(proc.stdout[-20000:], proc.stderr[-5000:], sep="\n", flush=True)
    else:
        print(f"   {summary}", flush=True)
    return {"passed": proc.returncode == 0, "returncode": proc.returncode, "summary": summary,
            "implementation": impl["path"],
            "command": " ".join(["python"] + cmd[1:]).replace(str(REPO) + "/", ""), "junit": str(junit)}


def junit_summary(junit: Path) -> str | None:
    """"N passed, M failed, K errors, S skipped in T s" from a pytest junit XML (None when the
    file is missing or unreadable: pytest did not get as far as writing it)."""
    import xml.etree.ElementTree as ET
    try:
        suites = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [suites] if suites.tag == "testsuite" else list(suites.iter("testsuite"))
    n = {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}
    seconds = sum(float(x.get("time", 0)) for x in suites)
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return (f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped "
            f"in {seconds:.1f} s")


def slow_tests(milestone) -> list[str]:
    """Node ids of the milestone's shape tests marked slow: the grader does not run them."""
    files = [str(REPO / f) for f in milestone.test_files]
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "--collect-only", "-q",
           "--rootdir", str(REPO), "-m", f"{milestone.marker} and slow", *files]
    from grader.offline import child_env
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=child_env())
    return [ln.strip() for ln in proc.stdout.splitlines() if "::" in ln]


def criteria_rows(milestone, tests: dict) -> list[dict]:
    """Each acceptance criterion and whether this grading ran its proof: a gate is always
    measured; a test proof counts only if the shape tests ran and none of the tests it names is
    a slow one the grader skips (``claimed`` False otherwise, with the reason)."""
    slow = slow_tests(milestone) if not tests.get("skipped") else []
    rows = []
    for c in milestone.criteria:
        row = {"text": c.text, "proof": c.proof, "claimed": True}
        if c.proof.startswith("test:"):
            target = c.proof[len("test:"):]
            skipped = [n for n in slow if n == target or n.startswith(target + "::") or n.startswith(target + "[")]
            if tests.get("skipped"):
                row.update(claimed=False, not_claimed="the shape tests were skipped (--skip-tests)")
            elif target.split("::")[0] not in milestone.test_files:
                row.update(claimed=False, not_claimed=f"{target.split('::')[0]} is not among the shape tests the "
                           f"grader runs ({', '.join(milestone.test_files)})")
            elif skipped:
                row.update(claimed=False, not_claimed=f"its slow test(s) are not run at grading: "
                           f"{', '.join(skipped)}; run them with `python -m pytest -m slow {target}`")
        rows.append(row)
    return rows


def out_dir_for(mid: str, args: argparse.Namespace) -> Path:
    """OUT/<mid> for the quick profile, OUT/<mid>-<profile> otherwise (+ "-smoke" for --smoke)."""
    name = mid if args.profile == "quick" else f"{mid}-{args.profile}"
    return args.out / (f"{name}-smoke" if getattr(args, "smoke", False) else name)


def options(args: argparse.Namespace) -> dict:
    """The options a run depended on, as plain data (``verify`` re-runs with them)."""
    return {"profile": args.profile, "smoke": bool(getattr(args, "smoke", False)), "seed": args.seed,
            "device": args.device, "data_root": str(args.data_root) if args.data_root else None,
            "checkpoint": str(args.checkpoint) if args.checkpoint else None,
            "impl": str(Path(args.impl).resolve()) if args.impl else None, "download": args.download,
            "skip_tests": args.skip_tests, "resume": args.resume, "world_seed": args.world_seed,
            "hidden_seed": bool(getattr(args, "hidden_seed", False)),
            "test_world_seed": getattr(args, "test_world_seed", args.world_seed),
            "require_human": args.require_human, "format": getattr(args, "format", None),
            "isolation": getattr(args, "isolation", "none"), "precision": getattr(args, "precision", "auto")}


def gate_rows(milestone, result, profile: str) -> list[dict]:
    """The gate rows of a run: the milestone's verdicts (failed ones with the pitfalls their
    symptoms show), or every gate unmeasured (value None, failed) when nothing was run."""
    if result:
        rows = milestone.verdicts(result, profile)
        milestone.diagnose(rows, result)
        return rows
    return [g.row(None, milestone.thresholds[profile][g.key], note="not measured") for g in milestone.gates]


def control_rows(milestone, result, profile: str) -> list[dict]:
    """The control rows of a run (none when nothing was run: the gates are unmeasured too)."""
    return milestone.control_rows(result, profile) if result else []


def verdict(tests: dict, result, rows: list[dict], controls: list[dict], require_human: bool,
            spec_rows: list[dict] = (), changed_files: list[str] = ()) -> dict:
    """The grade: ``status`` "pass" or "fail", ``headline`` (e.g. "pass — human evaluation
    pending", "pass — spec gate not met: fid_ddim50 = 136 (spec < 50)"), ``pending`` (gates
    waiting for a person), ``failures`` (one line each: failed gates, controls that cleared
    their gate or were not measured). ``spec_rows``: the spec's own numbers where a profile
    gates on another (the milestone's ``info["spec_rows"]``: gate, spec, value, status); one not
    met is said in the headline, never hidden behind a pass. ``changed_files``: grader or
    implementation files that changed while the run ran (:mod:`grader.integrity`): a fail."""
    pending = [r["gate"] for r in rows if r.get("status") == "pending"]
    failures = [f"{r['gate']} = {r['value']} does not clear {r['direction']} {r['threshold']}"
                for r in rows if not r["passed"] and r.get("status") != "pending"]
    if require_human:
        failures += [f"{g} is pending ({r['pending']}) and --require-human was given" for g in pending
                     for r in rows if r["gate"] == g]
    for c in controls:
        if c["cleared"]:
            failures.append(f"{c['gate']} cannot fail: the control '{c['control']}' scored {c['value']} "
                            f"({c['direction']} {c['threshold']} passes)")
        elif not c["passed"]:
            failures.append(f"control '{c['control']}' of {c['gate']} was not measured")
    if changed_files:
        failures.append(f"{len(changed_files)} file(s) of the grader or the implementation changed while the run "
                        f"ran (first: {changed_files[0]}): the gates may not have measured what the report says")
    ok = bool(result) and not failures and (tests["passed"] or tests.get("skipped"))
    headline = "pass" if ok else "fail"
    if ok and pending:
        headline = "pass — " + ", ".join(("human evaluation" if g.startswith("human") else g) for g in pending) + " pending"
    unmet = [f"{r['gate']} = {r['value']:.4g} (spec {r['spec']})" for r in spec_rows if r.get("status") != "spec gate met"]
    if unmet:
        headline += " — spec gate not met: " + ", ".join(unmet)
    return {"status": "pass" if ok else "fail", "headline": headline, "pending": pending, "failures": failures,
            "spec_rows": list(spec_rows)}


def measure(milestone, args: argparse.Namespace, out_dir: Path, checkpoint: Path | None):
    """Train (or load ``checkpoint``) and evaluate every gate: the milestone's RunResult."""
    from milestones.base import RunContext
    ctx = RunContext(profile=args.profile, seed=args.seed, world_seed=args.world_seed,
                     test_world_seed=getattr(args, "test_world_seed", None), out_dir=out_dir, device=args.device,
                     data_root=args.data_root, checkpoint=checkpoint, download=args.download,
                     progress=not args.no_progress, resume=args.resume, smoke=getattr(args, "smoke", False),
                     precision=getattr(args, "precision", "auto"))
    return milestone.run(ctx)  # DataMissingError / CheckpointError propagate to main -> exit 2


def training_diverged(e: BaseException) -> dict | None:
    """What a run that stopped on a non-finite loss or gradient says about it (step, what, likely
    cause), or None for any other error. By class name, like :func:`grader.cli.is_user_error`:
    the engine may be an implementation's (``--impl``) whose ``TrainingDiverged`` is its own."""
    if not any(c.__name__ == "TrainingDiverged" for c in type(e).__mro__):
        return None
    return {"message": " ".join(str(e).split()), "step": getattr(e, "step", None),
            "what": getattr(e, "what", None), "likely_cause": getattr(e, "likely_cause", None)}


def grade(mid: str, args: argparse.Namespace, impl: dict) -> int:
    """Grade milestone ``mid`` with the options ``args``; returns the exit code. When the run
    stops on the user's error (missing data, a bad checkpoint: exit 2), whatever it wrote into
    its output folder (pytest.xml, logs, the folder itself) is removed again: nothing is written."""
    from grader.cli import is_user_error
    out_dir = out_dir_for(mid, args)
    created = out_dir  # the topmost folder this run creates (None: the run folder exists already)
    while not created.parent.exists():
        created = created.parent
    segments, segments_before = out_dir / "segments.jsonl", None
    if out_dir.exists():
        created, before = None, set(out_dir.iterdir())
        segments_before = segments.read_bytes() if segments.exists() else None
    try:
        return _grade_into(mid, args, impl, out_dir)
    except Exception as e:
        if is_user_error(e):
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            else:
                for entry in set(out_dir.iterdir()) - before:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                if segments_before is not None:  # the segment this run appended: taken back
                    segments.write_bytes(segments_before)
        raise


def _grade_into(mid: str, args: argparse.Namespace, impl: dict, out_dir: Path) -> int:
    """:func:`grade`'s work, into the run folder ``out_dir``."""
    import torch

    from grader.candidate import CandidateError, current
    from grader.integrity import differences, snapshot
    from grader.offline import record
    from grader.report import (command_line, device_info, gate_table, git_state, library_versions, record_segment,
                               run_environment, write_report)
    from milestones import load
    from milestones.adapters import BUNDLED, interface, supplied_by
    from milestones.common import sha256_file
    milestone = load(mid)
    out_dir.mkdir(parents=True, exist_ok=True)
    start, cpu_start, git = time.time(), time.process_time(), git_state(REPO)  # the code as it was at the start
    integrity = snapshot(Path(impl["path"]))  # every file of the grader and of the implementation, hashed
    segments = record_segment(out_dir, git, args)  # every segment of a resumed run, this one last
    report = {"milestone": mid, "title": milestone.title, "profile": args.profile,
              "smoke": bool(getattr(args, "smoke", False)),

              "thresholds": milestone.thresholds[args.profile], "interface": interface(mid),
              "data_needed": milestone.data_needed.get(args.profile)}
    tests = run_shape_tests(milestone, out_dir, args.skip_tests, impl)
    report["tests"] = tests
    report["criteria"] = criteria_rows(milestone, tests)
    result, error, diverged = None, None, None
    if tests["passed"] or tests.get("skipped"):
        print(f"== {mid}: {milestone.title} ({args.profile} profile{', smoke' if report['smoke'] else ''})", flush=True)
        try:
            result = measure(milestone, args, out_dir, args.checkpoint)
        except Exception as e:  # training diverged, or the candidate process crashed or hung: a failed
            diverged = training_diverged(e)  # run (exit 1) with a report, no traceback
            if diverged is None and not isinstance(e, CandidateError):
                raise
            error = diverged["message"] if diverged else f"{type(e).__name__}: {e}"
            print(f"grader: error: {error}", file=sys.stderr, flush=True)
    else:
        error = "shape tests failed: gates not evaluated"
    rows = gate_rows(milestone, result, args.profile)
    controls = control_rows(milestone, result, args.profile)
    integrity["changed_during_run"] = differences(integrity, snapshot(Path(impl["path"])))
    remote = current()
    isolation = {"mode": "none", "note": "the implementation ran inside the grader's process (--isolation none)"}
    if remote is not None and remote.process is not None:
        isolation = remote.process.isolation()
        for a in isolation.get("attempts", []):
            print(f"   candidate sandbox refused: {a['event']} {a['target']}", flush=True)
    grade_ = verdict(tests, result, rows, controls, args.require_human,
                     result.info.get("spec_rows", []) if result else [], integrity["changed_during_run"])
    ok = grade_["status"] == "pass"
    ckpt = None
    if result and result.checkpoint:
        ckpt = {"path": str(Path(result.checkpoint).resolve()), "sha256": sha256_file(result.checkpoint),
                "trained_here": args.checkpoint is None}
    report.update({
        **grade_, "error": error, "gates": rows, "controls": controls, "integrity": integrity,
        "symptoms": result.symptoms if result else {},
        "validation": result.validation if result else {},
        "metrics": result.metrics if result else {},
        "info": result.info if result else ({"training_diverged": diverged} if diverged else {}),
        "datasets": result.datasets if result else [], "checkpoint": ckpt,
        "config": result.config if result else {}, "figures": result.figures if result else [],
        "provenance": {"git": git, "command": command_line(), "seed": args.seed, "world_seed": args.world_seed,
                       # the test splits' world seed (--hidden-seed: drawn for this run, shown here first)
                       "test_world_seed": getattr(args, "test_world_seed", args.world_seed),
                       "hidden_seed": bool(getattr(args, "hidden_seed", False)),
                       # --nproc: training spread over this many ranks (grader/ranks.py); this is rank 0's report
                       "nproc": world_size(),
                       "options": options(args), "environment": run_environment(), "segments": segments,
                       # what was graded, module by module, and what measured it
                       "implementation": {**impl, "supplied_by": supplied_by() if remote is None else
                                          (remote.supplied_by() if remote.process and not remote.process.ep.dead
                                           else {})},
                       "isolation": isolation,
                       "instruments": {"package": "eval.reference (the grader's own copy of the bundled mmsys)",
                                       "path": str(BUNDLED), "data_judges_metrics": "eval/, eval.reference"},
                       "libraries": library_versions(),
                       "device": device_info(args.device), "wall_time_s": time.time() - start,
                       # on a shared machine wall time depends on the load: CPU seconds of this
                       # process and of the candidate process (all their threads; shape tests
                       # excluded), and the load averages
                       "cpu_time_s": time.process_time() - cpu_start + isolation.get("child_cpu_s", 0.0),
                       "cpu_time_grader_s": time.process_time() - cpu_start, "torch_threads": torch.get_num_threads(),
                       "loadavg_end": list(os.getloadavg()),
                       "network": record(args.download),
                       "note": "BLEU and accuracies are fractions in [0, 1] unless a key says otherwise"},
    })
    paths = write_report(report, out_dir)
    if getattr(args, "format", None) == "gradescope":
        from grader.gradescope import to_gradescope
        from grader.report import atomic_write
        paths["gradescope"] = str(out_dir / "results.json")
        atomic_write(Path(paths["gradescope"]), json.dumps(to_gradescope(report, milestone.points,
                                                                         milestone.hidden_gates), indent=2))
    print(f"\n== {mid} ({args.profile}): {report['headline'].upper()}  [{time.time() - start:.0f} s]")
    print(gate_table(rows, controls))
    for line in grade_["failures"]:
        print(f"   - {line}")
    print(f"report: {paths['markdown']}  (json: {paths['json']}, junit: {paths['junit']})\n", flush=True)
    return EXIT_PASS if ok else EXIT_FAIL
