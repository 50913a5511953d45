"""DDP through the engine: two CPU ranks under torchrun (gloo) end with identical weights, equal
to one process training on the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available")
def test_two_ranks_match_single_process(tmp_path, repo_env):
    from ddp_worker import build_and_train

    env = {k: v for k, v in repo_env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["main"] and not r1["main"]
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
        assert torch.equal(r0["ema"][k], r1["ema"][k]), k

    ref, _ = build_and_train(None, grad_accum=1)  # one process, same global batch of 8
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(r0["model"][k], v, atol=1e-5, rtol=0)

    run = tmp_path / "run"  # only rank 0 wrote the log and the checkpoint
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [3, 6]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "train_summary.json"]
