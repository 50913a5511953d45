"""The grader's trust machinery (issue "Gates an auditor can trust"): controls that must fail,
pitfalls named beside failing gates, pending gates, provenance of the tree, the environment and
every segment of a run. Constructed inputs with known answers; no training."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from grader.report import git_state, record_segment, run_environment, to_junit, to_markdown
from grader.run import verdict
from milestones import available, load
from milestones.base import Control, Gate, Milestone, Pitfall, RunResult

GATE = Gate("acc", "accuracy on constructed data")
TESTS_OK = {"passed": True, "summary": "1 passed"}


class Toy(Milestone):
    id, title = "toy", "a toy milestone"
    gates = (GATE,)
    thresholds = {"quick": {"acc": 0.5}}
    controls = (Control("untrained model", "fresh init", ("acc",)), Control("constant output", "class 0", ("acc",)))
    pitfalls = (Pitfall("loss flat after warm-up", ("acc",), "loss_drop", lambda v: v < 0.05,
                        "the loss fell by {value:.0%} after warm-up"),
                Pitfall("attention uniform", ("acc",), "entropy", lambda v: v > 0.98, "entropy {value:.3f}"))


def rows_of(result: RunResult):
    toy = Toy()
    rows = toy.verdicts(result, "quick")
    toy.diagnose(rows, result)
    return rows, toy.control_rows(result, "quick")


def test_controls_that_fail_their_gate_let_the_grade_pass():
    result = RunResult(metrics={"acc": 0.9}, controls={"untrained model": {"acc": 0.1}, "constant output": {"acc": 0.1}})
    rows, controls = rows_of(result)
    v = verdict(TESTS_OK, result, rows, controls, require_human=False)
    assert v["status"] == "pass" and v["failures"] == [] and all(c["passed"] for c in controls)


def test_a_control_that_clears_its_gate_fails_the_grade():
    result = RunResult(metrics={"acc": 0.9}, controls={"untrained model": {"acc": 0.1}, "constant output": {"acc": 0.6}})
    rows, controls = rows_of(result)
    v = verdict(TESTS_OK, result, rows, controls, require_human=False)
    assert v["status"] == "fail"
    assert any("acc cannot fail" in f and "constant output" in f for f in v["failures"])
    assert [c["status"] for c in controls] == ["fails, as it must", "cleared the gate"]


def test_a_declared_control_not_measured_fails_the_grade():
    result = RunResult(metrics={"acc": 0.9}, controls={"untrained model": {"acc": 0.1}})
    rows, controls = rows_of(result)
    v = verdict(TESTS_OK, result, rows, controls, require_human=False)
    assert v["status"] == "fail" and any("constant output" in f and "not measured" in f for f in v["failures"])


def test_failing_gate_names_the_pitfall_its_symptom_shows():
    result = RunResult(metrics={"acc": 0.2}, symptoms={"loss_drop": 0.01, "entropy": 0.5})
    rows, _ = rows_of(result)
    assert [p["pitfall"] for p in rows[0]["likely_pitfalls"]] == ["loss flat after warm-up"]
    assert "fell by 1%" in rows[0]["likely_pitfalls"][0]["explain"]
    # a passing gate gets no diagnosis, and a symptom that was not measured diagnoses nothing
    assert "likely_pitfalls" not in rows_of(RunResult(metrics={"acc": 0.9}, symptoms={"loss_drop": 0.0}))[0][0]
    assert "likely_pitfalls" not in rows_of(RunResult(metrics={"acc": 0.2}))[0][0]


def test_pending_gate_passes_as_pending_and_fails_with_require_human():
    human = Gate("human", "a person says so")
    rows = [GATE.row(0.9, 0.5), human.row(None, 0.7, pending="no answers recorded")]
    assert rows[1]["status"] == "pending" and not rows[1]["passed"]
    result = RunResult(metrics={"acc": 0.9})
    v = verdict(TESTS_OK, result, rows, [], require_human=False)
    assert v["status"] == "pass" and v["headline"] == "pass — human evaluation pending" and v["pending"] == ["human"]
    strict = verdict(TESTS_OK, result, rows, [], require_human=True)
    assert strict["status"] == "fail" and "--require-human" in strict["failures"][0]
    report = {"milestone": "toy", "title": "t", "profile": "quick", "gates": rows, "controls": [], "tests": TESTS_OK,
              "criteria": [], **v, "provenance": {"wall_time_s": 1.0}}
    xml = to_junit(report)
    assert 'skipped="1"' in xml and "<skipped message=" in xml and 'failures="0"' in xml


def test_every_gate_of_every_milestone_has_a_control():
    """A gate without a control that must fail it cannot be shown to be able to fail."""
    missing = []
    for mid in available():
        m = load(mid)
        covered = {g for c in m.controls for g in c.gates}
        for g in m.gates:
            if g.key not in covered:
                missing.append(f"{mid}:{g.key}")
    assert not missing, f"gates without a control: {missing}"


def test_controls_name_only_gates_of_their_milestone():
    for mid in available():
        m = load(mid)
        keys = {g.key for g in m.all_gates()}
        for c in m.controls:
            assert set(c.gates) <= keys, (mid, c.name, c.gates)


def test_git_state_lists_untracked_files(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("a")
    subprocess.run(["git", "-C", str(tmp_path), "add", "a.txt"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "a"],
                   check=True)
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "new.py").write_text("x = 1")
    state = git_state(tmp_path)
    assert state["dirty"] is True and state["untracked"] == ["new.py"] and state["changed"] == []
    (tmp_path / "a.txt").write_text("b")
    assert git_state(tmp_path)["changed"] == ["a.txt"]


def test_environment_and_every_segment_are_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MMSYS_SOMETHING", "x")
    monkeypatch.setenv("HOME_NOT_RECORDED", "y")
    env = run_environment()
    assert env["OMP_NUM_THREADS"] == "1" and env["MMSYS_SOMETHING"] == "x" and "HOME_NOT_RECORDED" not in env
    git = {"commit": "abc", "dirty": False}
    first = record_segment(tmp_path, git, argparse.Namespace(resume=False))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    segments = record_segment(tmp_path, {"commit": "def", "dirty": True}, argparse.Namespace(resume=True))
    assert len(first) == 1 and len(segments) == 2
    assert [s["commit"] for s in segments] == ["abc", "def"] and segments[1]["resume"] is True
    assert [s["environment"]["OMP_NUM_THREADS"] for s in segments] == ["1", "2"]


def test_markdown_shows_controls_pitfalls_and_segments():
    result = RunResult(metrics={"acc": 0.2}, controls={"untrained model": {"acc": 0.3}, "constant output": {"acc": 0.1}},
                       symptoms={"loss_drop": 0.0})
    rows, controls = rows_of(result)
    v = verdict(TESTS_OK, result, rows, controls, require_human=False)
    report = {"milestone": "toy", "title": "t", "profile": "quick", "gates": rows, "controls": controls,
              "tests": TESTS_OK, "criteria": [], **v, "error": None,
              "provenance": {"seed": 0, "git": {"commit": "abc" * 5, "dirty": True, "changed": [], "untracked": ["x.py"]},
                             "wall_time_s": 1.0, "device": {"device": "cpu"}, "command": "python grader.py toy",
                             "environment": {"OMP_NUM_THREADS": "1"}, "network": {"statement": "offline"},
                             "libraries": {}, "segments": [{"started_utc": "T0", "command": "c1", "commit": "abc"},
                                                           {"started_utc": "T1", "command": "c2", "commit": "def"}]}}
    md = to_markdown(report)
    assert "## Controls (each must fail its gate)" in md and "fails, as it must" in md
    assert "loss flat after warm-up" in md and "untracked: x.py" in md and "OMP_NUM_THREADS=1" in md
    assert "segment 1" in md and "segment 2" in md and "`c2`" in md


@pytest.mark.parametrize("argv", [["regrade", "--jobs", "0"]])
def test_regrade_refuses_bad_options_or_a_dirty_tree(argv):
    """regrade refuses a dirty tree or bad options with one line, exit 2 (this checkout may be
    either: both are refusals before any grading)."""
    from grader.cli import main
    assert main(argv) == 2


def test_verify_recomputes_status_from_controls():
    from grader.verify import compare

    class M:
        thresholds = Toy.thresholds

        @staticmethod
        def all_gates():
            return Toy.gates
    result = RunResult(metrics={"acc": 0.9}, controls={"untrained model": {"acc": 0.1}, "constant output": {"acc": 0.7}})
    rows, controls = rows_of(result)
    report = {"profile": "quick", "thresholds": Toy.thresholds["quick"], "gates": rows, "controls": controls,
              "datasets": [], "tests": TESTS_OK, "status": "pass", "provenance": {}}
    lines, problems = compare(report, rows, [], M, 1e-3, controls)
    assert any("does not follow" in p for p in problems)  # a control cleared its gate: "pass" is a lie
    assert len(lines) == 3 and all(line["agree"] for line in lines)
    report["status"] = "fail"
    assert not compare(json.loads(json.dumps(report)), rows, [], M, 1e-3, controls)[1]
    # validation numbers are re-measured too: an edited one differs, a missing one is a problem
    measured = {"split": "world/val", "n": 10, "metrics": {"val_acc": 0.8}}
    report["validation"] = {**measured, "metrics": {"val_acc": 0.85}}
    lines, problems = compare(report, rows, [], M, 1e-3, controls, measured)
    assert lines[-1]["gate"] == "validation val_acc" and not lines[-1]["agree"] and not problems
    report["validation"] = {}
    assert any("validation val_acc is missing" in p for p in compare(report, rows, [], M, 1e-3, controls, measured)[1])


def test_calibration_table_from_runs(tmp_path, monkeypatch):
    """benchmarks.calibrate: worst honest run, best control, the margins of the threshold in
    force and the suggestion, from three reports (constructed)."""
    import benchmarks.calibrate as cal
    monkeypatch.setattr(cal, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(cal, "RESULTS", tmp_path / "results")
    for (seed, world), acc, ctrl in zip(cal.PAIRS, (0.95, 0.93, 0.96), (0.10, 0.12, 0.11)):
        folder = cal.run_folder("m1", seed, world) / "m1"
        folder.mkdir(parents=True)
        report = {"status": "pass", "gates": [{"gate": "test_accuracy", "value": acc}],
                  "controls": [{"control": "untrained model", "gate": "test_accuracy", "value": ctrl}],
                  "provenance": {"git": {"commit": "c" * 40, "dirty": False}, "wall_time_s": 100.0}}
        (folder / "report.json").write_text(json.dumps(report))
        (folder / "report.md").write_text("# report")
    table = cal.collect("m1")
    row = next(g for g in table["gates"] if g["gate"] == "test_accuracy")
    assert row["worst_honest"] == 0.93 and row["best_control"] == 0.12 and row["separated"]
    assert row["sd"] == pytest.approx(0.015275, abs=1e-5)  # sample sd of 0.95, 0.93, 0.96
    assert row["suggested"] == pytest.approx(0.93 - max(cal.SIGMAS * row["sd"], cal.REL * 0.93))
    threshold = load("m1").thresholds["quick"]["test_accuracy"]
    assert row["threshold_ok"] == (0.12 < threshold <= 0.93 - row["margin"])
    md = cal.to_markdown(table)
    assert "| (2, 2) | untrained model | test_accuracy | 0.11 |" in md
    assert (tmp_path / "results" / "runs" / "m1" / "s1-w1" / "report.json").exists()


def test_a_tagged_calibration_is_kept_apart_and_names_each_runs_cpu(tmp_path, monkeypatch, capsys):
    """--tag float32: another kind of machine's runs, table and report copies are MID-TAG, never
    MID's; the table names the CPU each run trained on (or that its report did not record it)."""
    import benchmarks.calibrate as cal
    monkeypatch.setattr(cal, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(cal, "RESULTS", tmp_path / "results")
    for i, (seed, world) in enumerate(cal.PAIRS):
        folder = cal.run_folder("m1", seed, world, "float32") / "m1"
        folder.mkdir(parents=True)
        device = {"cpu_isa": {"capability": "AVX2", "flags": ["avx2"], "bf16": False}} if i else {}
        report = {"status": "pass", "gates": [{"gate": "test_accuracy", "value": 0.95}], "controls": [],
                  "provenance": {"git": {"commit": "c" * 40, "dirty": False}, "wall_time_s": 100.0, "device": device}}
        (folder / "report.json").write_text(json.dumps(report))
        (folder / "report.md").write_text("# report")
    assert cal.main(["m1", "--collect-only", "--tag", "float32"]) == 0
    md = (tmp_path / "results" / "m1-float32.md").read_text()
    assert md.startswith("# Calibration of m1 (quick profile), float32") and "--tag float32" in md
    assert "| (0, 0) | pass | `cccccccccccc` | 100 s | not recorded |" in md
    assert "| (1, 1) | pass | `cccccccccccc` | 100 s | AVX2, no native bf16 |" in md
    assert (tmp_path / "results" / "runs" / "m1-float32" / "s2-w2" / "report.md").exists()
    assert not (tmp_path / "results" / "m1.md").exists() and not (tmp_path / "results" / "runs" / "m1").exists()
    capsys.readouterr()
    assert cal.main(["m1", "--collect-only", "--tag", "../x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tag" in err[0] and not (tmp_path / "x.md").exists()


def test_calibration_tables_wait_for_runs_in_progress(tmp_path, monkeypatch, capsys):
    """Tables written while calibration runs are alive would make those runs' reports dirty: a
    live lock refuses (exit 2, one line), a stale one (dead pid) is removed and collection runs."""
    import benchmarks.calibrate as cal
    monkeypatch.setattr(cal, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(cal, "RESULTS", tmp_path / "results")
    locks = tmp_path / "runs" / ".running"
    locks.mkdir(parents=True)
    (locks / str(os.getpid())).touch()  # this process: alive
    assert cal.main(["m1", "--collect-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in progress" in err[0] and not (tmp_path / "results").exists()
    (locks / str(os.getpid())).unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (locks / dead.stdout.strip()).touch()
    assert cal.main(["m1", "--collect-only"]) == 0 and (tmp_path / "results" / "m1.md").exists()
    assert not list(locks.iterdir())
    with pytest.raises(SystemExit):
        cal.main(["m1", "--pairs", "3,3"])  # not one of PAIRS: argparse's usage error (exit 2)


@pytest.mark.integration
def test_criteria_proved_by_slow_tests_are_not_claimed(tmp_path, monkeypatch):
    """A criterion whose proof is a slow test (not run at grading) is reported as not claimed;
    one proved by a fast test or a gate stays claimed; --skip-tests claims no test proof."""
    from types import SimpleNamespace

    import grader.run
    from grader.run import criteria_rows, slow_tests
    from milestones.base import Criterion
    monkeypatch.setattr(grader.run, "REPO", tmp_path)  # a checkout holding only this test file
    test_file = tmp_path / "test_toy_proofs.py"
    test_file.write_text("import pytest\npytestmark = pytest.mark.m1\n\n"
                         "def test_fast():\n    assert 1\n\n"
                         "@pytest.mark.slow\ndef test_slow():\n    assert 1\n")
    toy = SimpleNamespace(marker="m1", test_files=(test_file.name,), criteria=())
    assert slow_tests(toy) == ["test_toy_proofs.py::test_slow"]
    file_id, slow_id = "test_toy_proofs.py", "test_toy_proofs.py::test_slow"
    toy.criteria = (Criterion("fast", f"test:{file_id}::test_fast"), Criterion("slow", f"test:{slow_id}"),
                    Criterion("whole file", f"test:{file_id}"), Criterion("gate", "gate:acc"))
    rows = criteria_rows(toy, {"passed": True})
    assert [r["claimed"] for r in rows] == [True, False, False, True]
    toy.criteria += (Criterion("elsewhere", "test:tests/test_other.py::test_x"),)
    assert criteria_rows(toy, {"passed": True})[-1]["claimed"] is False  # a file the grader does not run
    assert "python -m pytest -m slow" in rows[1]["not_claimed"]
    rows = criteria_rows(toy, {"passed": False, "skipped": True})
    assert [r["claimed"] for r in rows] == [False, False, False, True, False]


def test_every_criterion_proof_is_a_graded_test_file_or_a_gate():
    """A criterion must cite a test file the grader runs for that milestone, or one of its gates."""
    bad = []
    for mid in available():
        m = load(mid)
        gates = {g.key for g in m.all_gates()}
        for c in m.criteria:
            kind, _, target = c.proof.partition(":")
            if kind == "test" and target.split("::")[0] not in m.test_files:
                bad.append(f"{mid}: {c.proof}")
            elif kind == "gate" and target not in gates:
                bad.append(f"{mid}: {c.proof}")
            elif kind not in ("test", "gate"):
                bad.append(f"{mid}: {c.proof}")
    assert not bad, bad


def test_a_spec_gate_not_met_is_said_in_the_headline():
    """A profile that gates on calibrated numbers still says plainly where the spec's own number
    is not met: in the headline and its own report section, never behind a bare pass."""
    result = RunResult(metrics={"acc": 0.9}, controls={"untrained model": {"acc": 0.1}, "constant output": {"acc": 0.1}})
    rows, controls = rows_of(result)
    spec = [{"gate": "fid", "spec": "< 50", "value": 136.2, "status": "spec gate not met", "note": "400 samples"},
            {"gate": "speed", "spec": "> 15", "value": 24.0, "status": "spec gate met"}]
    v = verdict(TESTS_OK, result, rows, controls, require_human=False, spec_rows=spec)
    assert v["status"] == "pass" and v["headline"] == "pass — spec gate not met: fid = 136.2 (spec < 50)"
    report = {"milestone": "toy", "title": "t", "profile": "quick", "gates": rows, "controls": controls,
              "tests": TESTS_OK, "criteria": [], **v, "error": None,
              "provenance": {"seed": 0, "git": {"commit": "a" * 40, "dirty": False}, "wall_time_s": 1.0,
                             "device": {"device": "cpu"}, "command": "c", "network": {"statement": "offline"},
                             "libraries": {}}}
    md = to_markdown(report)
    assert "SPEC GATE NOT MET" in md.splitlines()[0] and "**spec gate not met**" in md


def test_reports_record_the_cpu_kernel_features_and_verify_names_a_difference():
    """The same seed trains to other weights on another CPU kernel level (bf16 above all): the
    report records the level, its header shows it, and verify says when the auditor's differs."""
    from grader.report import ISA_FLAGS, cpu_isa, device_info
    from grader.verify import isa_difference
    here = device_info("cpu")["cpu_isa"]
    assert here == cpu_isa() and here["capability"] and set(here["flags"]) <= set(ISA_FLAGS)
    assert isa_difference({"cpu_isa": here}) is None
    assert isinstance(here["bf16"], bool)
    other = {"capability": "AVX512" if here["capability"] != "AVX512" else "AVX2", "flags": ["avx512_bf16"],
             "bf16": not here["bf16"]}
    note = isa_difference({"cpu_isa": other})
    assert f"recorded on {other['capability']} (avx512_bf16, " in note and f"re-measured on {here['capability']}" in note
    assert "another number format" in note
    assert "does not record" in isa_difference({"device": "cpu"})
    report = {"milestone": "toy", "title": "t", "profile": "quick", "gates": [], "controls": [], "tests": TESTS_OK,
              "criteria": [], "status": "pass", "error": None,
              "provenance": {"seed": 0, "git": {"commit": "abc" * 5, "dirty": False}, "wall_time_s": 1.0,
                             "device": {"device": "cpu", "cpu": "AMD EPYC", "cpu_isa": other}, "command": "c",
                             "environment": {}, "network": {"statement": "offline"}, "libraries": {}, "segments": []}}
    assert f"on AMD EPYC ({other['capability']})" in to_markdown(report)


def test_precision_float32_turns_every_bf16_switch_off_and_calibrates_apart(tmp_path, monkeypatch):
    """--precision float32: the milestone's recipe with every bf16 switch off (nested recipes
    too), recorded in the options; calibrate passes it to each grade, tags the calibration
    float32 and its table says the CPU's bf16 was not used."""
    import benchmarks.calibrate as cal
    from milestones.base import RunContext
    m4, m6 = load("m4"), load("m6")
    auto, forced = m4.recipe(RunContext()), m4.recipe(RunContext(precision="float32"))
    assert auto.bf16 and auto.sample_bf16 and not forced.bf16 and not forced.sample_bf16
    assert auto.steps == forced.steps and auto.unet == forced.unet
    assert not m6.recipe(RunContext(precision="float32")).clip.bf16
    assert load("m5").recipe(RunContext()).bf16 and not load("m5").recipe(RunContext(precision="float32")).bf16
    assert m4.recipes["quick"].bf16  # the milestone's own recipe is untouched
    assert cal.command("m4", 1, 1, "float32", "float32")[-2:] == ["--precision", "float32"]
    from grader.cli import parse_args
    from grader.parallel import child_options
    from grader.run import options
    args = parse_args(["m4", "--precision", "float32"])
    assert options(args)["precision"] == "float32" and "float32" in child_options(args)
    assert options(parse_args(["m4"]))["precision"] == "auto"
    monkeypatch.setattr(cal, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(cal, "RESULTS", tmp_path / "results")
    folder = cal.run_folder("m1", 0, 0, "float32") / "m1"
    folder.mkdir(parents=True)
    report = {"status": "pass", "gates": [{"gate": "test_accuracy", "value": 0.95}], "controls": [],
              "provenance": {"git": {"commit": "c" * 40, "dirty": False}, "wall_time_s": 100.0,
                             "options": {"precision": "float32"},
                             "device": {"cpu_isa": {"capability": "AVX512", "flags": [], "bf16": True}}}}
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "report.md").write_text("# report")
    assert cal.main(["m1", "--collect-only", "--precision", "float32"]) == 0
    md = (tmp_path / "results" / "m1-float32.md").read_text()
    assert "--tag float32 --precision float32" in md and "AVX512, native bf16, float32 forced" in md
