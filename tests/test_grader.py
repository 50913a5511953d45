"""The grader's command line: exit codes, clear errors, nothing written on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def grader(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "grader.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.integration
def test_list():
    r = grader("list")
    assert r.returncode == 0 and "m1" in r.stdout and "test_accuracy" in r.stdout


@pytest.mark.parametrize("args, message", [
    (("m9",), "unknown milestone"),
    (("m1", "--checkpoint", "/nonexistent.pt"), "no such file"),
    (("m1", "--impl", "/nonexistent"), "no mmsys package"),
    (("all", "--checkpoint", "x.pt"), "not 'all'"),
    (("m1", "--device", "cuda:7"), "cuda"),
    (("m2", "--resume"), "cannot resume"),
    (("m1", "--resume", "--checkpoint", "x.pt"), "use one"),
    (("all", "--jobs", "0"), "--jobs 0"),
])
@pytest.mark.integration
def test_bad_usage_exits_2_with_one_clear_line(args, message, tmp_path):
    if "cuda" in args[-1] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = grader(*args, "--out", str(tmp_path / "runs"))
    assert r.returncode == 2
    assert message in r.stderr.lower() or message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("report.json"))


@pytest.mark.integration
def test_bad_checkpoint_exits_2_and_keeps_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = grader("m1", "--checkpoint", str(bad), "--skip-tests", "--out", str(tmp_path / "runs"), "--no-progress")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "checkpoint" in r.stderr.lower() and len(r.stderr.strip().splitlines()) == 1
    assert bad.read_bytes() == b"not a checkpoint"


@pytest.mark.integration
def test_missing_data_full_profile_exits_2(tmp_path):
    r = grader("m1", "--profile", "full", "--data-root", str(tmp_path / "nowhere"), "--skip-tests",
               "--out", str(tmp_path / "runs"), "--no-progress")
    assert r.returncode == 2
    assert "cifar" in r.stderr.lower() and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.integration
def test_all_in_parallel_logs_each_milestone_and_keeps_exit_codes(tmp_path):
    """``all --jobs 2``: one child process per milestone (heaviest first), each with its log;
    here every child stops on missing data (exit 2) and the parent returns the worst code."""
    from milestones import available
    runs = tmp_path / "runs"
    r = grader("all", "--jobs", "2", "--profile", "full", "--data-root", str(tmp_path / "nowhere"), "--skip-tests",
               "--out", str(runs))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    from milestones import load
    ids = [m for m in available() if "full" in load(m).thresholds]
    started = [line.split(":")[0].removeprefix("== ") for line in r.stdout.splitlines() if "started" in line]
    assert started == sorted(ids, reverse=True)
    for mid in set(available()) - set(ids):  # a milestone without the profile is named, not dropped silently
        assert any(line.startswith("== ") and mid in line and "no 'full' profile, not graded" in line
                   for line in r.stdout.splitlines()), r.stdout
    for mid in ids:
        log = (runs / f"{mid}-full.log").read_text()
        assert "grader: error:" in log and "nowhere" in log, log  # --data-root reached the child
        assert f"{mid}: FAIL (exit 2)" in r.stdout


@pytest.mark.slow
def test_checkpoint_evaluation_writes_report(tmp_path):
    """Evaluate a (tiny, untrained) m1 checkpoint: gate fails -> exit 1, full report written."""
    from mmsys.checkpoint import save_checkpoint
    from mmsys.vit import ViT, ViTConfig
    cfg = dict(image_size=32, patch_size=8, dim=32, depth=1, n_heads=2, mlp_ratio=2.0, n_classes=10)
    ck = tmp_path / "untrained.pt"
    save_checkpoint(ck, {"kind": "vit", "model": ViT(ViTConfig(**cfg)).state_dict(), "model_config": cfg})
    r = grader("m1", "--checkpoint", str(ck), "--skip-tests", "--out", str(tmp_path / "runs"), "--no-progress")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "runs" / "m1" / "report.json").read_text())
    assert rep["status"] == "fail" and rep["gates"][0]["passed"] is False
    assert rep["checkpoint"]["sha256"] and rep["provenance"]["network"]["blocked"]
    assert (tmp_path / "runs" / "m1" / "report.xml").read_text().count("<failure") >= 1
    assert (tmp_path / "runs" / "m1" / "attention_maps.png").exists()
