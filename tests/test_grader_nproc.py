"""``grader.py MID --nproc N`` (grader/ranks.py): the grader starts one copy of itself per rank,
the candidate processes train together on one global batch, rank 0 alone writes the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]


def grader(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, str(REPO / "grader.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env={**env, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("args, message", [
    (["m1", "--nproc", "0"], "--nproc 0: give a number of processes >= 1"),
    (["all", "--nproc", "2"], "name one milestone"),
    (["m1", "--nproc", "2", "--checkpoint", "README.md"], "drop --nproc"),
])
@pytest.mark.integration
def test_bad_nproc_is_one_line_exit_2(args, message, tmp_path):
    proc = grader(*args, "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_ranks_train_one_model_and_rank_0_reports(tmp_path):
    proc = grader("m1", "--smoke", "--nproc", "2", "--out", str(tmp_path), "--no-progress")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]  # a smoke run fails its gates by design
    assert "2 ranks" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m1-smoke"]  # rank 1 wrote nothing here
    report = json.loads((tmp_path / "m1-smoke" / "report.json").read_text())
    assert report["info"]["training"]["world_size"] == 2 and report["provenance"]["nproc"] == 2
    assert report["provenance"]["command"].endswith(f"m1 --smoke --nproc 2 --out {tmp_path} --no-progress")
    assert report["tests"]["passed"] and report["controls"]  # the shape tests and controls ran on rank 0
    assert "2 ranks" in (tmp_path / "m1-smoke" / "report.md").read_text()
