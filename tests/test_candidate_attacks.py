"""Proof by attack: hostile implementations graded with ``--isolation process`` (issue 24).

Each folder is the bundled ``mmsys`` with one hostile addition, graded on m1's smoke recipe
(``--smoke --skip-tests``, seconds). What it attempts must leave the grade as the honest
package's (the same test accuracy; the report is the grader's) or fail it with one line naming
where, and the report must name what was attempted."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def hostile(root: Path, init: str = "", vit: str = "") -> Path:
    """A copy of the bundled package with ``init`` appended to its ``__init__.py`` and ``vit``
    to its ``vit.py``."""
    shutil.copytree(REPO / "mmsys", root / "mmsys", ignore=shutil.ignore_patterns("__pycache__"))
    for name, extra in (("__init__.py", init), ("vit.py", vit)):
        path = root / "mmsys" / name
        path.write_text(path.read_text() + "\n" + textwrap.dedent(extra))
    return root


def grade(out: Path, impl: Path | None = None, *extra: str) -> tuple[int, dict, str]:
    cmd = [sys.executable, "grader.py", "m1", "--smoke", "--skip-tests", "--isolation", "process", "--no-progress",
           "--out", str(out), *extra] + (["--impl", str(impl)] if impl else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    report = out / "m1-smoke" / "report.json"
    return proc.returncode, (json.loads(report.read_text()) if report.exists() else {}), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    code, report, log = grade(tmp_path_factory.mktemp("honest") / "out")
    assert report, log
    return report


def attempts(report) -> list[str]:
    return [f"{a['event']} {a['target']}" for a in report["provenance"]["isolation"].get("attempts", [])]


def test_patching_the_grader_at_import_cannot_even_import_it(tmp_path, honest):
    impl = hostile(tmp_path / "impl", init="""
        try:
            import eval.classification, milestones.m1_vit
            eval.classification.accuracy = lambda *a, **k: 1.0
            milestones.m1_vit.THRESHOLDS["quick"]["test_accuracy"] = 0.0
        except ImportError:
            pass
        """)
    code, report, log = grade(tmp_path / "out", impl)
    assert report["metrics"] == honest["metrics"] and report["thresholds"] == honest["thresholds"], log
    assert any(a.startswith("import eval") for a in attempts(report)), attempts(report)


def test_writing_the_report_into_the_output_folder_is_refused(tmp_path, honest):
    out = tmp_path / "out"
    target = out / "m1-smoke"
    impl = hostile(tmp_path / "impl", init=f"""
        import atexit, json
        def _forge():
            for name in ("report.json", "human_eval.json"):
                try:
                    with open({str(target)!r} + "/" + name, "w") as f:
                        json.dump({{"status": "pass", "metrics": {{"test_accuracy": 1.0}}}}, f)
                except OSError:
                    pass
        _forge()
        atexit.register(_forge)  # and once more after the grader wrote its report
        """)
    code, report, log = grade(out, impl)
    assert report["metrics"] == honest["metrics"] and report["status"] == "fail", log
    assert not (target / "human_eval.json").exists()
    assert json.loads((target / "report.json").read_text())["metrics"] == honest["metrics"]
    assert any("report.json" in a and a.startswith("open for writing") for a in attempts(report)), attempts(report)


def test_opening_a_network_socket_is_refused_and_named(tmp_path, honest):
    impl = hostile(tmp_path / "impl", init="""
        import socket
        try:
            socket.create_connection(("93.184.216.34", 80), timeout=2).close()
        except OSError:
            pass
        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        except OSError:
            pass
        """)
    code, report, log = grade(tmp_path / "out", impl)
    assert report["metrics"] == honest["metrics"], log
    assert any(a.startswith(("network socket", "socket.")) for a in attempts(report)), attempts(report)


def test_reading_the_graders_files_and_data_is_refused_and_named(tmp_path, honest):
    # the test labels live in the grader's tree and data folders (CIFAR-10's test_batch, caches)
    impl = hostile(tmp_path / "impl", init=f"""
        import os
        for path in ({str(REPO / "milestones" / "m1_vit.py")!r}, {str(REPO.parent / "shared" / "data")!r},
                     {str(REPO / "eval")!r}):
            try:
                open(path).read() if os.path.isfile(path) else os.listdir(path)
            except OSError:
                pass
        """)
    code, report, log = grade(tmp_path / "out", impl)
    assert report["metrics"] == honest["metrics"], log
    tried = attempts(report)
    assert any(a.startswith("read the grader's files") and "m1_vit.py" in a for a in tried), tried
    assert any(a.startswith("list the grader's files") and a.endswith("/eval") for a in tried), tried


# the candidate has the world generator (it is part of mmsys): it regenerates the test split of
# the default world seed and answers each test image it recognises with that image's label
REGENERATE = """
    import torch as _torch
    from mmsys.data.world import WorldConfig as _WorldConfig, make_split as _make_split
    _test = _make_split("test", 2000, _WorldConfig(seed=0), single=True, captions=False)
    _known = {bytes(img.numpy()): int(y) for img, y in zip(_test.images, _test.labels)}
    _honest_forward = ViT.forward
    def _forward(self, x, *a, **k):
        logits = _honest_forward(self, x, *a, **k)
        if self.training:
            return logits
        keys = ((x.detach().float() + 1) * 127.5).round().clamp(0, 255).to(_torch.uint8)
        for i, img in enumerate(keys):
            label = _known.get(bytes(img.numpy()))
            if label is not None:
                logits = logits.clone()
                logits[i] = -1e4
                logits[i, label] = 1e4
        return logits
    ViT.forward = _forward
    """


def test_regenerating_the_test_split_is_defeated_by_the_hidden_seed(tmp_path, honest):
    impl = hostile(tmp_path / "impl", vit=REGENERATE)
    code, open_report, log = grade(tmp_path / "open", impl)
    assert open_report["metrics"]["test_accuracy"] == 1.0, log  # the threat: on the public seed it works
    code, report, log = grade(tmp_path / "hidden", impl, "--hidden-seed")
    p = report["provenance"]
    assert p["hidden_seed"] and p["test_world_seed"] != p["world_seed"], p
    assert report["metrics"]["test_accuracy"] < 0.5 and report["status"] == "fail", log  # at the honest smoke level
    assert f"test splits' world seed {p['test_world_seed']} (hidden" in (tmp_path / "hidden" / "m1-smoke" / "report.md").read_text()


def test_a_hang_fails_the_gate_with_one_line(tmp_path):
    impl = hostile(tmp_path / "impl", vit="""
        import time as _time
        def _forward(self, *a, **k):
            while True:
                _time.sleep(0.1)
        ViT.forward = _forward
        """)
    code, report, log = grade(tmp_path / "out", impl, "--call-timeout", "5")
    assert code == 1 and report["status"] == "fail", log
    assert "did not answer within 5 s" in report["error"] and "vit_logits" in report["error"], report["error"]
    assert "Traceback" not in log and "grader: error: CandidateTimeout" in log, log


def test_a_crash_mid_training_fails_saying_where(tmp_path):
    impl = hostile(tmp_path / "impl", vit="""
        import os as _os
        _calls = [0]
        _orig_forward = ViT.forward
        def _forward(self, *a, **k):
            _calls[0] += 1
            if _calls[0] == 5:
                print("candidate: crashing now", flush=True)
                _os._exit(1)
            return _orig_forward(self, *a, **k)
        ViT.forward = _forward
        """)
    code, report, log = grade(tmp_path / "out", impl)
    assert code == 1 and report["status"] == "fail", log
    err = report["error"]
    assert "exited (code 1)" in err and "fit()" in err and "crashing now" in err, err
    assert "Traceback" not in log, log
    print(err)
