"""Issue 18, the grader's own rows: every bad input is one line, exit 2, checked before any work,
and nothing in the output folder changes; an earlier run is never overwritten.

- a run folder that already holds a run: refused without --force / --resume; --force moves it
  aside (m5's human_eval answers and the --checkpoint being re-graded are copied back);
- an empty / truncated / random-bytes / wrong-kind --checkpoint: refused before the shape tests;
- --out a file, under a file, read-only or unwritable: refused before any work;
- --seed out of torch's range, --device foo: argparse-style one-line errors;
- ``all --jobs 2``: a child's old report.json is not shown as this run's result.
"""

import argparse
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def grader(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "grader.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env=env)


def snapshot(root: Path) -> dict:
    """Every file and folder under ``root``: name -> (sha256 of the bytes, mtime in ns)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                       p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def one_line_usage_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert exit 2 with a single ``grader: error:`` line (no traceback) containing ``needles``."""
    err = r.stderr.strip()
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(err.splitlines()) == 1 and err.startswith("grader: error: "), err
    assert "Traceback" not in r.stderr + r.stdout
    for needle in needles:
        assert needle in err, err
    return err


def fake_run(folder: Path, mid: str = "m1") -> None:
    """What a finished run leaves in its folder (the bytes do not matter to the refusal)."""
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"milestone": mid, "status": "pass", "gates": [
        {"gate": "test_accuracy", "description": "old", "value": 0.987654, "direction": ">", "threshold": 0.5,
         "passed": True}]}))
    (folder / "checkpoint.pt").write_bytes(b"PK old checkpoint bytes")
    (folder / "metrics.jsonl").write_text('{"step": 250, "loss": 0.1}\n')


# ------------------------------------------------------------------ an earlier run in the folder
@pytest.mark.integration
def test_rerun_into_a_folder_holding_a_run_is_refused(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "m1")
    before = snapshot(runs)
    err = one_line_usage_error(grader("m1", "--out", str(runs), "--no-progress"),
                               "already holds a run", "--force", "--resume")
    assert "report.json" in err and "checkpoint.pt" in err and "metrics.jsonl" in err
    assert snapshot(runs) == before


@pytest.mark.integration
def test_m5_refusal_says_the_answers_are_carried_over(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "m5", "m5")
    before = snapshot(runs)
    one_line_usage_error(grader("m5", "--out", str(runs), "--no-progress"), "already holds a run", "human_eval")
    assert snapshot(runs) == before


@pytest.mark.integration
def test_force_moves_the_earlier_run_aside(tmp_path):
    """--force: the earlier folder is renamed whole (bytes and times unchanged) and said so on
    stdout; the new run then starts in a fresh folder (here it stops on missing data, exit 2)."""
    runs = tmp_path / "runs"
    fake_run(runs / "m1-full")
    before = snapshot(runs / "m1-full")
    r = grader("m1", "--force", "--profile", "full", "--data-root", str(tmp_path / "nowhere"), "--skip-tests",
               "--out", str(runs), "--no-progress")
    one_line_usage_error(r, "cifar")
    aside = [p for p in runs.iterdir() if p.name.startswith("m1-full.previous-")]
    assert len(aside) == 1 and aside[0].name.endswith("Z"), sorted(runs.iterdir())
    assert snapshot(aside[0]) == before
    assert "moved aside to" in r.stdout and aside[0].name in r.stdout
    assert not any((runs / "m1-full" / name).exists() for name in ("report.json", "checkpoint.pt", "metrics.jsonl"))


def test_force_carries_m5_answers_and_the_regraded_checkpoint(tmp_path):
    """Re-grading m5 to pick up a person's answers: ``m5 --force --checkpoint runs/m5/checkpoint.pt``.
    The old folder is kept whole; the answers (human_eval/ and human_eval.json) and the checkpoint
    are copied into the new folder, so the next grading reads them; a second --force keeps both
    earlier folders."""
    from grader.outdir import prepare
    folder = tmp_path / "runs" / "m5"
    fake_run(folder, "m5")
    (folder / "human_eval" / "images").mkdir(parents=True)
    (folder / "human_eval" / "template.json").write_text('{"items": []}')
    (folder / "human_eval" / "images" / "000.png").write_bytes(b"\x89PNG fake")
    (folder / "human_eval.json").write_text('{"annotator": "ada", "answers": [true, false]}')
    before = snapshot(folder)
    out = io.StringIO()
    with redirect_stdout(out):
        prepare({"m5": folder}, True, folder / "checkpoint.pt")
    aside = sorted(p for p in folder.parent.iterdir() if p.name.startswith("m5.previous-"))
    assert len(aside) == 1 and snapshot(aside[0]) == before  # nothing lost: the old run, whole
    now = {k: v[0] for k, v in snapshot(folder).items()}
    assert now == {k: v[0] for k, v in before.items() if k.startswith("human_eval") or k == "checkpoint.pt"}
    assert "human_eval/" in out.getvalue() and "human_eval.json" in out.getvalue() and "checkpoint.pt" in out.getvalue()
    time.sleep(1.1)  # a new UTC second; same-second names get a suffix anyway
    with redirect_stdout(io.StringIO()):
        prepare({"m5": folder}, True, folder / "checkpoint.pt")  # the copy holds a checkpoint: moved aside again
    assert len([p for p in folder.parent.iterdir() if p.name.startswith("m5.previous-")]) == 2
    assert snapshot(aside[0]) == before
    assert (folder / "human_eval.json").read_text() == '{"annotator": "ada", "answers": [true, false]}'


def test_force_is_passed_to_the_children():
    from grader.cli import parse_args
    from grader.parallel import child_options
    assert "--force" in child_options(parse_args(["all", "--jobs", "2", "--force"]))
    assert "--force" not in child_options(parse_args(["all", "--jobs", "2"]))


# ------------------------------------------------------------------ a bad --checkpoint, found first
def _valid_checkpoint(path: Path, kind: str = "vit") -> bytes:
    from eval.reference.checkpoint import save_checkpoint
    save_checkpoint(path, {"kind": kind, "model": {"w": torch.zeros(256)}, "model_config": {}})
    return path.read_bytes()


def _random_bytes() -> bytes:
    data = random.Random(18).randbytes(4096)
    assert not data.startswith((b"PK", b"\x80")), "pick another seed: these bytes look like a zip/pickle"
    return data


@pytest.mark.integration
@pytest.mark.parametrize("case", ["empty", "truncated", "random", "wrong kind"])
def test_bad_checkpoint_is_refused_before_any_work(case, tmp_path):
    """Without --skip-tests: the checkpoint is opened before the shape tests run or any folder is
    made, so it fails in seconds and writes nothing."""
    bad = tmp_path / "given.pt"
    if case == "empty":
        bad.write_bytes(b"")
    elif case == "truncated":
        data = _valid_checkpoint(tmp_path / "ok.pt")
        bad.write_bytes(data[: len(data) // 2])
    elif case == "random":
        bad.write_bytes(_random_bytes())
    else:
        _valid_checkpoint(bad, kind="clip")
    given, runs = bad.read_bytes(), tmp_path / "runs"
    t0 = time.time()
    err = one_line_usage_error(grader("m1", "--checkpoint", str(bad), "--out", str(runs), "--no-progress"),
                               "checkpoint", str(bad))
    assert time.time() - t0 < 120  # no shape tests (~90 s alone), no training
    assert not runs.exists() and bad.read_bytes() == given
    expected = {"empty": "not a torch checkpoint", "truncated": "corrupt or truncated",
                "random": "not a torch checkpoint", "wrong kind": "expected 'vit'"}[case]
    assert expected in err


def test_every_milestone_names_its_checkpoint_kind():
    from milestones import available, load
    expected = {"m1": "vit", "m2": "clip", "m3": "captioner", "m4": "ddpm", "m5": "t2i", "m6": "audio", "m7": "ssl"}
    assert {mid: load(mid).checkpoint_kind for mid in available()} == {mid: expected[mid] for mid in available()}


# ------------------------------------------------------------------ --out
def _out_cases(tmp_path: Path) -> dict[str, Path]:
    afile = tmp_path / "a-file"
    afile.write_text("keep me")
    return {"a file": afile, "under a file": afile / "runs"}


@pytest.mark.integration
@pytest.mark.parametrize("case", ["a file", "under a file"])
def test_out_that_is_not_a_folder_is_refused(case, tmp_path):
    out = _out_cases(tmp_path)[case]
    before = snapshot(tmp_path)
    one_line_usage_error(grader("m1", "--out", str(out), "--no-progress"), "--out", "not a folder")
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                    reason="root writes into read-only folders")
def test_read_only_out_is_refused(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        before = snapshot(tmp_path)
        one_line_usage_error(grader("m1", "--out", str(out / "runs"), "--no-progress"), "cannot write")
        assert snapshot(tmp_path) == before
    finally:
        out.chmod(0o755)


@pytest.mark.integration
def test_unwritable_out_is_refused():
    """A folder on a file system no one may create files in (sysfs), as root too."""
    import tempfile
    if not Path("/sys").is_dir():
        pytest.skip("no sysfs here")
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            pass
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    one_line_usage_error(grader("m1", "--out", "/sys/mmsys-runs", "--no-progress"), "cannot write in /sys")


# ------------------------------------------------------------------ --seed, --device
@pytest.mark.parametrize("args, needle", [
    (("--seed", "18446744073709551616"), "argument --seed"),
    (("--seed", "-1"), "argument --seed"),
    (("--seed", "seven"), "not an integer"),
    (("--device", "foo"), "argument --device"),
    (("--device", "cuda:x"), "cpu, cuda or cuda:N"),
    (("--profile", "huge"), "argument --profile"),
])
def test_bad_seed_or_device_is_one_argparse_line(args, needle, tmp_path):
    one_line_usage_error(grader("m1", *args, "--out", str(tmp_path / "runs")), needle)
    assert not (tmp_path / "runs").exists()


def test_seed_range():
    from grader.cli import parse_args
    assert parse_args(["m1", "--seed", str(2 ** 32 - 1)]).seed == 2 ** 32 - 1
    torch.Generator().manual_seed((2 ** 32 - 1) * 1_000_003 + 1000)  # the largest seed the m5 sampler derives


# ------------------------------------------------------------------ all --jobs 2
@pytest.mark.integration
def test_parallel_shows_only_reports_this_run_wrote(tmp_path):
    """A child that exits 2 (here: its folder holds an earlier run) leaves that run's old PASS
    report.json in place; the parent must not print it as this run's table."""
    from grader.parallel import grade_in_parallel, stamp
    runs = tmp_path / "runs"
    fake_run(runs / "m1-full")
    before = snapshot(runs / "m1-full")
    args = argparse.Namespace(profile="full", out=runs, seed=0, device="cpu", data_root=tmp_path / "nowhere",
                              impl=None, download=False, skip_tests=True, smoke=False, force=False, jobs=2,
                              world_seed=0, require_human=False)
    out = io.StringIO()
    with redirect_stdout(out):
        codes = grade_in_parallel(["m1"], args)
    assert codes == {"m1": 2}
    assert "0.987654" not in out.getvalue() and "no report written by this run (exit 2)" in out.getvalue()
    assert snapshot(runs / "m1-full") == before
    assert "already holds a run" in (runs / "m1-full.log").read_text()
    report = runs / "m1-full" / "report.json"
    first = stamp(report)
    time.sleep(0.01)
    report.write_text(report.read_text())
    assert stamp(report) != first and stamp(tmp_path / "absent") is None


@pytest.mark.slow
def test_missing_data_after_the_shape_tests_leaves_nothing_written(tmp_path):
    """Missing data is found after the shape tests ran (they wrote pytest.xml): exit 2, and
    what the run wrote is removed again, in a new --out and in an existing one."""
    existing = tmp_path / "existing"
    (existing / "m1-full").mkdir(parents=True)
    (existing / "m1-full" / "notes.txt").write_text("mine\n")
    before = snapshot(existing)
    for out in (tmp_path / "new" / "runs", existing):
        r = grader("m1", "--profile", "full", "--data-root", str(tmp_path / "nowhere"), "--out", str(out),
                   "--no-progress")
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        assert "shape tests" in r.stdout  # the tests did run first
        assert len(r.stderr.strip().splitlines()) == 1 and "cifar" in r.stderr.lower()
    assert not (tmp_path / "new").exists()
    after = snapshot(existing)  # same entries, every file untouched (a folder's own mtime moves)
    assert after.keys() == before.keys()
    assert {k: v for k, v in after.items() if v[0] != "dir"} == {k: v for k, v in before.items() if v[0] != "dir"}
