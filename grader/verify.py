"""``python grader.py verify REPORT.json``: an auditor re-derives a report's gates.

1. The report's checkpoint is found and its sha256 checked (missing or different: exit 2).
2. The milestone is run again in evaluation mode (``--checkpoint``) with the recorded profile,
   seed, data root and implementation, into a temporary folder (the audited run folder is not
   touched); the data it loads must have the recorded identities and hashes (else exit 2).
3. Every gate is printed recorded vs re-measured with the tolerance; each recorded verdict is
   also re-derived from the recorded value and threshold, and the thresholds compared with the
   milestone's own. Exit 0 when everything agrees, 1 when anything differs.

Evaluation of a fixed checkpoint is deterministic for a given seed; what can differ on another
machine or thread count is the float summation order, which can move a metric by a few
units in the last decimal places or flip a borderline sample. The default tolerance
(``|recorded - measured| <= 1e-3 * max(1, |recorded|)``, i.e. two images of 2,000 for an
accuracy) covers that and nothing more; ``--tolerance`` sets the factor.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from grader import EXIT_FAIL, EXIT_PASS, UsageError
from grader.report import ISA_FLAGS

DEFAULT_TOLERANCE = 1e-3


def isa_difference(recorded_device: dict) -> str | None:
    """A line saying how this CPU's kernel features differ from the recorded run's, or None
    when they agree. Different features mean different float (above all bf16) kernels: a
    bf16 sampler's images, and so its metrics, can then move beyond the tolerance."""
    from grader.report import cpu_isa
    here, there = cpu_isa(), recorded_device.get("cpu_isa")
    if there is None:
        return (f"the report does not record its CPU's kernel features (this machine: {here['capability']}, "
                f"{' '.join(here['flags']) or 'none of ' + ' '.join(ISA_FLAGS)}); a difference there can move "
                f"bf16 metrics beyond the tolerance")
    if there == here:
        return None
    def says(isa: dict) -> str:
        bf16 = {True: ", bf16 autocast", False: ", float32"}.get(isa.get("bf16"), "")
        return f"{isa['capability']} ({' '.join(isa['flags']) or '-'}{bf16})"
    return (f"recorded on {says(there)}, re-measured on {says(here)}: other float kernels"
            f"{' and another number format' if there.get('bf16') != here.get('bf16') else ''}, so metrics can "
            f"differ beyond the tolerance")


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="grader.py verify", description="re-measure a report's gates from its checkpoint")
    p.add_argument("report", type=Path, help="a report.json written by grader.py")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"relative tolerance per gate: |a - b| <= tol * max(1, |a|) (default {DEFAULT_TOLERANCE})")
    p.add_argument("--data-root", type=Path, default=None, help="where the data is now, if not where the report says")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def load_report(path: Path) -> dict:
    """The report dict; UsageError (exit 2) when it is missing or is not a grader report."""
    if not path.is_file():
        raise UsageError(f"verify: no report at {path}")
    try:
        report = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"verify: {path} is not JSON ({e}); give a report.json written by grader.py") from None
    missing = [k for k in ("milestone", "profile", "gates", "checkpoint", "provenance", "datasets") if k not in report]
    if missing:
        raise UsageError(f"verify: {path} lacks {', '.join(missing)}: not a report written by grader.py")
    if not report["checkpoint"]:
        raise UsageError(f"verify: {path} names no checkpoint (the run did not get as far as a model)")
    return report


def find_checkpoint(report: dict, report_path: Path) -> Path:
    """The report's checkpoint: its recorded path, else a file of that name beside the report;
    UsageError (exit 2) when neither exists or the sha256 differs from the recorded one."""
    from milestones.common import sha256_file
    recorded = Path(report["checkpoint"]["path"])
    for path in (recorded, report_path.parent / recorded.name):
        if path.is_file():
            digest = sha256_file(path)
            if digest != report["checkpoint"]["sha256"]:
                raise UsageError(f"verify: checkpoint {path} has sha256 {digest[:12]}..., the report recorded "
                                 f"{report['checkpoint']['sha256'][:12]}...: not the checkpoint that was graded")
            return path
    raise UsageError(f"verify: the report's checkpoint {recorded} is missing (looked there and beside the report)")


def agrees(recorded, measured, tol: float) -> bool:
    """Two gate values agree within the relative tolerance (None/NaN agree only with each other)."""
    bad = [v is None or (isinstance(v, float) and math.isnan(v)) for v in (recorded, measured)]
    if any(bad):
        return all(bad)
    return abs(recorded - measured) <= tol * max(1.0, abs(recorded))


def _key(d: dict) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def line(name: str, recorded, measured, tol: float) -> dict:
    """One re-measured number: recorded, measured, their difference, the tolerance, agree."""
    both = None not in (recorded, measured)
    return {"gate": name, "recorded": recorded, "measured": measured,
            "diff": abs(recorded - measured) if both else None,
            "tolerance": tol * max(1.0, abs(recorded)) if recorded is not None else None,
            "agree": agrees(recorded, measured, tol)}


def compare(report: dict, rows: list[dict], datasets: list[dict], milestone, tol: float,
            controls: list[dict] = (), validation: dict | None = None) -> tuple[list[dict], list[str]]:
    """(one line per gate, per control row and per validation number: recorded, measured,
    difference, agree; problems found in the report)."""
    problems = []
    if sorted(map(_key, datasets)) != sorted(map(_key, report["datasets"])):
        raise UsageError("verify: the data loaded now does not match the report's dataset identities and hashes "
                         "(another dataset version or --data-root)")
    own = milestone.thresholds[report["profile"]]
    if report.get("thresholds") != own:
        problems.append(f"thresholds in the report {report.get('thresholds')} differ from the milestone's {own}")
    recorded, gates = {r["gate"]: r for r in report["gates"]}, {g.key: g for g in milestone.all_gates()}
    lines = []
    for row in rows:
        if row.get("status") == "pending":  # waits for a person: nothing to re-measure
            continue
        rec = recorded.get(row["gate"])
        if rec is None:
            problems.append(f"gate {row['gate']} is missing from the report")
            continue
        gate, threshold = gates.get(row["gate"]), own.get(row["gate"])
        if gate is not None and threshold is not None and gate.passes(rec["value"], threshold) != bool(rec["passed"]):
            problems.append(f"gate {row['gate']}: recorded verdict {'pass' if rec['passed'] else 'fail'} does not "
                            f"follow from its recorded value {rec['value']} and threshold {threshold}")
        lines.append(line(row["gate"], rec["value"], row["value"], tol))
    rec_controls = {(c["control"], c["gate"]): c for c in report.get("controls", [])}
    for row in controls:
        rec = rec_controls.get((row["control"], row["gate"]))
        name = f"control {row['control']} / {row['gate']}"
        if rec is None:
            problems.append(f"{name} is missing from the report")
            continue
        lines.append(line(name, rec["value"], row["value"], tol))
    rec_val = (report.get("validation") or {}).get("metrics", {})
    measured_val = ((validation or {}).get("metrics") or {}) if "validation" in report else {}  # older reports: none
    for key, value in measured_val.items():
        if key not in rec_val:
            problems.append(f"validation {key} is missing from the report")
            continue
        lines.append(line(f"validation {key}", rec_val[key], value, tol))
    from grader.run import verdict
    require_human = bool((report["provenance"].get("options") or {}).get("require_human"))
    expected = verdict(report.get("tests") or {}, True, report["gates"], report.get("controls", []), require_human)
    if report.get("status") != expected["status"]:
        problems.append(f"status {report.get('status')!r} does not follow from the recorded tests, gate verdicts "
                        f"and controls")
    return lines, problems


def integrity_problems(report: dict) -> list[str]:
    """The grader's and the implementation's files that differ now from the report's integrity
    record (:mod:`grader.integrity`): another version of the code than the one that graded, or a
    file changed since; and any change the run itself recorded. None for a report without one."""
    from grader.integrity import differences, snapshot
    rec = report.get("integrity")
    if not rec:
        return []
    now = snapshot(Path(rec["implementation"]["path"]))
    diff = differences(rec, now)
    out = [f"{len(diff)} file(s) differ from the report's integrity record (first: {diff[0]}): this is not the "
           f"code that graded it"] if diff else []
    if rec.get("changed_during_run"):
        out.append(f"the report records files changed during its run: {', '.join(rec['changed_during_run'][:3])}")
    return out


def table(lines: list[dict]) -> str:
    def f(v):
        return "-" if v is None else f"{v:.6g}"
    out = [f"{'gate':28s} {'recorded':>12s} {'re-measured':>12s} {'|diff|':>10s} {'tolerance':>10s}  agree"]
    out += [f"{r['gate']:28s} {f(r['recorded']):>12s} {f(r['measured']):>12s} {f(r['diff']):>10s} "
            f"{f(r['tolerance']):>10s}  {'yes' if r['agree'] else 'NO'}" for r in lines]
    return "\n".join(out)


def main(argv) -> int:
    args = parse_args(argv)
    report = load_report(args.report)
    ckpt = find_checkpoint(report, args.report)
    opts = report["provenance"].get("options") or {}
    from milestones.adapters import use_implementation
    use_implementation(opts.get("impl"))
    from grader.offline import block_network
    block_network()
    from grader.run import control_rows, gate_rows, measure
    from milestones import MODULES, load
    if report["milestone"] not in MODULES:
        raise UsageError(f"verify: unknown milestone {report['milestone']!r} in {args.report}")
    milestone = load(report["milestone"])
    data_root = args.data_root or (Path(opts["data_root"]) if opts.get("data_root") else None)
    run_args = argparse.Namespace(profile=report["profile"], smoke=bool(opts.get("smoke")),
                                  seed=report["provenance"].get("seed", 0), device=opts.get("device", "cpu"),
                                  world_seed=report["provenance"].get("world_seed", 0),
                                  test_world_seed=report["provenance"].get("test_world_seed"),
                                  data_root=data_root, download=False, resume=False, no_progress=args.no_progress,
                                  precision=opts.get("precision", "auto"))
    print(f"== verify {args.report}: {report['milestone']} {report['profile']} profile, seed {run_args.seed}, "
          f"checkpoint {ckpt} (sha256 {report['checkpoint']['sha256'][:12]}... matches)", flush=True)
    isa_note = isa_difference(report["provenance"].get("device") or {})
    if isa_note:
        print(f"note: {isa_note}", flush=True)
    with tempfile.TemporaryDirectory(prefix="mmsys-verify-") as tmp:
        result = measure(milestone, run_args, Path(tmp), ckpt)
        rows = gate_rows(milestone, result, report["profile"])
        controls = control_rows(milestone, result, report["profile"])
    lines, problems = compare(report, rows, result.datasets, milestone, args.tolerance, controls, result.validation)
    problems += integrity_problems(report)
    print(table(lines))
    for p in problems:
        print(f"report problem: {p}")
    ok = all(r["agree"] for r in lines) and not problems
    print(f"== verify: {'every gate agrees' if ok else 'DIFFERS'} (tolerance {args.tolerance:g} relative; "
          f"recorded at commit {report['provenance'].get('git', {}).get('commit', '?')[:12]})", flush=True)
    return EXIT_PASS if ok else EXIT_FAIL
