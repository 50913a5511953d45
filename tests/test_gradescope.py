"""Gradescope's autograder format (``--format gradescope``, :mod:`grader.gradescope`): the file
has only the published schema's fields with their types, a failed gate costs its own points, a
gate whose control cleared it earns none, a pending gate earns none, and a hidden gate's
threshold, value and protocol stay out of the public feedback."""

import json
from pathlib import Path

import pytest

from grader.gradescope import to_gradescope
from milestones import available, load

REPO = Path(__file__).resolve().parents[1]
# https://gradescope-autograders.readthedocs.io/en/latest/specs/ (the results.json fields)
TOP = {"score": (int, float), "execution_time": int, "output": str, "output_format": str, "test_output_format": str,
       "test_name_format": str, "visibility": str, "stdout_visibility": str, "extra_data": dict, "tests": list,
       "leaderboard": list}
TEST = {"score": (int, float), "max_score": (int, float), "status": str, "name": str, "name_format": str,
        "number": str, "output": str, "output_format": str, "tags": list, "visibility": str, "extra_data": dict}
VISIBILITY = {"hidden", "after_due_date", "after_published", "visible"}


def validate(results: dict) -> None:
    """Every field is one the schema names, of its type; visibilities and statuses are the schema's."""
    assert set(results) <= set(TOP), set(results) - set(TOP)
    for k, v in results.items():
        assert isinstance(v, TOP[k]), (k, v)
    assert results["visibility"] in VISIBILITY and results["stdout_visibility"] in VISIBILITY
    for t in results["tests"]:
        assert set(t) <= set(TEST) and {"name", "score", "max_score"} <= set(t), t
        for k, v in t.items():
            assert isinstance(v, TEST[k]), (k, v)
        assert t["visibility"] in VISIBILITY and t.get("status", "passed") in {"passed", "failed"}
        assert 0 <= t["score"] <= t["max_score"] or t["max_score"] == 0
    assert results["score"] == pytest.approx(sum(t["score"] for t in results["tests"]))


def row(gate, value, threshold, passed, direction=">", **kw):
    return {"gate": gate, "value": value, "threshold": threshold, "passed": passed, "direction": direction,
            "description": f"the protocol of {gate}", **kw}


def report(gates, controls=()):
    return {"milestone": "m2", "profile": "quick", "status": "fail", "headline": "fail", "error": None,
            "tests": {"passed": True, "summary": "12 passed"}, "gates": gates, "controls": list(controls),
            "provenance": {"wall_time_s": 12.4}}


def test_a_failed_gate_costs_its_own_points():
    r = to_gradescope(report([row("zeroshot_top5", 0.9, 0.8, True), row("t2i_R@10", 0.4, 0.85, False)]),
                      {"zeroshot_top5": 4, "t2i_R@10": 4}, ())
    validate(r)
    assert r["score"] == 4 and r["execution_time"] == 12 and r["extra_data"]["max_score"] == 8
    by = {t["name"]: t for t in r["tests"]}
    assert by["t2i_R@10"]["status"] == "failed" and "FAIL" in by["t2i_R@10"]["output"]


def test_a_gate_its_control_cleared_earns_nothing():
    ctrl = {"control": "untrained model", "gate": "zeroshot_top5", "value": 0.85, "threshold": 0.8,
            "direction": ">", "passed": False, "cleared": True, "status": "CLEARS THE GATE"}
    r = to_gradescope(report([row("zeroshot_top5", 0.9, 0.8, True)], [ctrl]), {"zeroshot_top5": 4}, ())
    validate(r)
    assert r["score"] == 0 and "cannot fail" in r["tests"][1]["output"]
    assert r["tests"][-1]["visibility"] == "hidden" and r["tests"][-1]["name"].startswith("control")


def test_a_pending_gate_earns_nothing_yet():
    r = to_gradescope(report([row("human_prompt_match", None, 0.7, False, status="pending",
                                  pending="no answers recorded")]), {"human_prompt_match": 2}, ())
    validate(r)
    assert r["score"] == 0 and r["tests"][1]["output"].startswith("pending: no answers recorded")


def test_hidden_gates_stay_out_of_the_public_feedback():
    gates = [row("zeroshot_top5", 0.9, 0.8, True), row("zeroshot_top1", 0.3712, 0.126, True)]
    r = to_gradescope(report(gates), {"zeroshot_top5": 4, "zeroshot_top1": 2}, ("zeroshot_top1",))
    validate(r)
    hidden = next(t for t in r["tests"] if t["name"] == "zeroshot_top1")
    public = r["output"] + "".join(t["output"] + t["name"] for t in r["tests"] if t["visibility"] == "visible")
    assert hidden["visibility"] == "hidden" and hidden["score"] == 2
    assert "0.126" not in public and "0.3712" not in public and "protocol of zeroshot_top1" not in public
    assert "1 hidden gate(s)" in r["output"]


@pytest.mark.parametrize("mid", available())
def test_points_beside_every_gate_and_the_committed_reports_convert(mid):
    """Each milestone declares points for every gate (hidden ones among its gates), and its
    committed quick report, made by the bundled implementation, converts to a valid file."""
    m = load(mid)
    keys = {g.key for g in m.all_gates()}
    assert set(m.points) == keys and set(m.hidden_gates) <= keys and all(p > 0 for p in m.points.values())
    path = REPO / "results" / "quick" / mid / "report.json"
    if not path.exists():
        pytest.skip(f"{path} is not committed")
    r = to_gradescope(json.loads(path.read_text()), m.points, m.hidden_gates)
    validate(r)
    assert {t["name"] for t in r["tests"]} >= keys
