"""The integrity record (:mod:`grader.integrity`): the grader's and the implementation's files
hashed at the start of a run and again at its end; a file changed in between fails the grade, and
``verify`` names any file that differs from a report's record."""

import pytest

from grader import integrity
from grader.run import verdict
from grader.verify import integrity_problems


@pytest.fixture
def tree(tmp_path):
    for part in integrity.GRADER_PARTS:
        (tmp_path / part).mkdir()
        (tmp_path / part / "a.py").write_text(f"# {part}\n")
    (tmp_path / "grader" / "__pycache__").mkdir()
    (tmp_path / "grader" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"cache")
    (tmp_path / "grader.py").write_text("# entry\n")
    impl = tmp_path / "impl" / "mmsys"
    impl.mkdir(parents=True)
    (impl / "vit.py").write_text("class ViT: ...\n")
    return tmp_path, impl


def test_snapshot_hashes_every_file_but_caches(tree):
    repo, impl = tree
    rec = integrity.snapshot(impl, repo)
    assert set(rec["grader"]["files"]) == {f"{p}/a.py" for p in integrity.GRADER_PARTS} | {"grader.py"}
    assert rec["implementation"]["files"].keys() == {"vit.py"} and rec["implementation"]["n_files"] == 1
    assert integrity.differences(rec, integrity.snapshot(impl, repo)) == []
    assert integrity.summary(rec)["grader"]["n_files"] == len(integrity.GRADER_PARTS) + 1


def test_a_changed_missing_or_added_file_is_named(tree):
    repo, impl = tree
    rec = integrity.snapshot(impl, repo)
    (repo / "eval" / "a.py").write_text("def accuracy(*a): return 1.0  # rewritten by the code under test\n")
    (impl / "vit.py").unlink()
    (repo / "milestones" / "b.py").write_text("# new\n")
    diff = integrity.differences(rec, integrity.snapshot(impl, repo))
    assert diff == ["grader eval/a.py: changed", "grader milestones/b.py: added", "implementation vit.py: missing"]


def test_files_changed_during_the_run_fail_the_grade():
    rows = [{"gate": "acc", "value": 0.9, "threshold": 0.5, "passed": True, "direction": ">"}]
    ok = verdict({"passed": True}, True, rows, [], False)
    bad = verdict({"passed": True}, True, rows, [], False, (), ["grader eval/a.py: changed"])
    assert ok["status"] == "pass" and bad["status"] == "fail"
    assert "changed while the run ran (first: grader eval/a.py: changed)" in bad["failures"][0]


def test_verify_names_files_that_differ_from_the_record():
    from milestones.adapters import BUNDLED
    rec = integrity.snapshot(BUNDLED)
    assert integrity_problems({"integrity": rec}) == []
    assert integrity_problems({}) == []  # a report made before the record existed
    first = sorted(rec["grader"]["files"])[0]
    rec["grader"]["files"][first] = "0" * 64
    problems = integrity_problems({"integrity": {**rec, "changed_during_run": ["implementation vit.py: changed"]}})
    assert f"grader {first}: changed" in problems[0] and "not the code that graded it" in problems[0]
    assert "changed during its run" in problems[1]
