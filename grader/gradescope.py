"""A report in Gradescope's autograder format (``--format gradescope``: ``OUT/<mid>/results.json``).

Gradescope reads ``score``, ``execution_time``, ``output``, ``visibility``, ``stdout_visibility``
and ``tests[]`` (``score``, ``max_score``, ``name``, ``number``, ``output``, ``status``,
``visibility``) from the file. Here each gate is a test worth its ``POINTS`` (declared beside the
milestone's thresholds): a failed gate costs its own points, not the milestone's. A gate earns
them only when it passed *and* every control of it failed, as a control must (a gate that could
not fail proves nothing); a pending gate (m5's human evaluation) earns none until a person's
answers are recorded. The shape tests are a test of 0 points that must pass for any gate to be
measured; the controls are 0-point tests visible to the instructor only.

Hidden gates (``HIDDEN`` beside the thresholds) are tests with ``visibility: "hidden"``; the public
``output`` and the visible tests never show their threshold, value or protocol, only that some
were graded. The JSON report, the Markdown report and JUnit are written as always.
"""

from __future__ import annotations

PUBLIC, HIDDEN = "visible", "hidden"


def gate_test(row: dict, number: str, points: float, controls: list[dict], hidden: bool) -> dict:
    """One gate as a Gradescope test."""
    bad = [c for c in controls if c["gate"] == row["gate"] and not c["passed"]]
    pending = row.get("status") == "pending"
    ok = row["passed"] and not bad and not pending
    earned = points if ok else 0.0
    value = "not measured" if row["value"] is None else f"{row['value']:.4g}"
    if pending:
        out = f"pending: {row.get('pending', 'waits for a person')}"
    else:
        out = f"{row['gate']} = {value} (needs {row['direction']} {row['threshold']:g}): {'pass' if row['passed'] else 'FAIL'}"
    out += f"\nmeasured on: {row['description']}"
    if bad:
        out += "\nthis gate cannot fail as measured: " + "; ".join(
            f"the control '{c['control']}' scored {c['value']}" for c in bad)
    return {"name": row["gate"], "number": number, "score": float(earned), "max_score": float(points),
            "status": "passed" if ok else "failed",
            "output": out, "visibility": HIDDEN if hidden else PUBLIC}


def to_gradescope(report: dict, points: dict[str, float], hidden: tuple[str, ...]) -> dict:
    """The Gradescope ``results.json`` of a grader report (``report.json``'s dict)."""
    tests_ = report.get("tests") or {}
    shape_ok = bool(tests_.get("passed") or tests_.get("skipped"))
    tests = [{"name": "shape tests", "number": "0", "score": 0.0, "max_score": 0.0,
              "status": "passed" if shape_ok else "failed",
              "output": tests_.get("summary", "not run"), "visibility": PUBLIC}]
    controls = report.get("controls") or []
    for i, row in enumerate(report.get("gates") or [], 1):
        tests.append(gate_test(row, str(i), float(points.get(row["gate"], 0.0)), controls, row["gate"] in hidden))
    for j, c in enumerate(controls, 1):
        tests.append({"name": f"control: {c['control']} / {c['gate']}", "number": f"c{j}", "score": 0.0,
                      "max_score": 0.0, "status": "passed" if c["passed"] else "failed",
                      "output": f"{c['value']} against {c['direction']} {c['threshold']}: "
                                f"{'fails, as it must' if c['passed'] else c.get('status', 'cleared its gate')}",
                      "visibility": HIDDEN})
    public = [t for t in tests[1:] if t["visibility"] == PUBLIC and not t["name"].startswith("control")]
    n_hidden = sum(1 for row in report.get("gates") or [] if row["gate"] in hidden)
    lines = [f"{report['milestone']} ({report['profile']} profile): {report.get('headline', report['status'])}"
             if not n_hidden else f"{report['milestone']} ({report['profile']} profile)"]
    lines += [t["output"].split("\n")[0] for t in public]
    if n_hidden:
        lines.append(f"{n_hidden} hidden gate(s) graded as well (their results are shown after grading is published)")
    if report.get("error"):
        lines.append(f"error: {report['error']}")
    return {"score": float(sum(t["score"] for t in tests)), "execution_time": int(round(
                (report.get("provenance") or {}).get("wall_time_s", 0))),
            "output": "\n".join(lines), "visibility": PUBLIC, "stdout_visibility": HIDDEN, "tests": tests,
            "extra_data": {"milestone": report["milestone"], "status": report["status"],
                           "max_score": float(sum(points.values()))}}
