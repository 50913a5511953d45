"""Data parallelism through the engine, two CPU ranks under torchrun (gloo): DDP and FSDP2 runs
end with the weights one process gets on the same global batch; a checkpoint resumes on another
number of processes; two "nodes" meet through the c10d rendezvous. Workers: tests/ddp_worker.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with the gloo backend is not available")]

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun(out: Path, env: dict, *worker_args: str, launcher=("--standalone", "--nproc_per_node=2"),
             worker: str = "ddp_worker.py"):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(HERE / worker), str(out), *worker_args]
    return subprocess.Popen(cmd, env={k: v for k, v in env.items() if k not in TORCHRUN_VARS},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(*procs) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out[-4000:]


def ranks(out: Path, n: int = 2) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(n)]


def assert_weights_close(got: dict, want: dict) -> None:
    """Every weight within 1e-5, except the key half of an attention's ``kv.bias``: it moves no
    output (softmax is shift-invariant along each query's keys), so its exact gradient is 0 and
    what it gets is rounding noise, which AdamW's normalisation turns into lr-sized steps (2.9e-3
    apart after 6 steps here, every other weight 1.2e-7). That half is checked through the
    outputs instead: the model's predictions on the data agree within 1e-5."""
    assert got.keys() == want.keys()
    for k, v in want.items():
        a, b = (x[len(x) // 2:] if k.endswith("attn.kv.bias") else x for x in (got[k], v))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=k)
    from ddp_worker import Tiny, X
    models = [Tiny(), Tiny()]
    for m, state in zip(models, (got, want)):
        m.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(models[0](X), models[1](X), atol=1e-5, rtol=0)


def reference(steps: int = 6, ema: bool = True) -> dict:
    """One process, the same global batch of 8, no accumulation."""
    from ddp_worker import build_and_train
    model, _ = build_and_train(None, grad_accum=1, steps=steps, ema=ema)
    return model.state_dict()


def test_ddp_two_ranks_match_single_process(tmp_path, repo_env):
    finished(torchrun(tmp_path, repo_env, "--parallel", "ddp", "--grad-accum", "2"))
    r0, r1 = ranks(tmp_path)
    assert r0["world_size"] == r1["world_size"] == 2 and r0["main"] and not r1["main"]
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
        assert torch.equal(r0["ema"][k], r1["ema"][k]), k
    assert_weights_close(r0["model"], reference())
    run = tmp_path / "run"  # only rank 0 wrote the log and the checkpoint
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [3, 6]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "train_summary.json"]


def test_fsdp_two_ranks_match_single_process(tmp_path, repo_env):
    finished(torchrun(tmp_path, repo_env, "--parallel", "fsdp", "--grad-accum", "2"))
    r0, r1 = ranks(tmp_path)
    want = reference(ema=False)
    assert_weights_close(r0["model"], want)  # each rank's evaluation copy holds the gathered weights
    assert_weights_close(r1["model"], want)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)  # the full state, plain keys
    assert_weights_close(ck["model"], want)
    assert sorted(ck["optimizer"]["state"]) == list(range(len(want)))  # positional, as a plain run's


def test_resume_on_another_number_of_processes(tmp_path, repo_env):
    from ddp_worker import build_and_train
    want_ema, want = reference(ema=True), reference(ema=False)
    # two DDP ranks train steps 1-3, one process resumes their checkpoint for steps 4-6
    a = tmp_path / "a"
    finished(torchrun(a, repo_env, "--parallel", "ddp", "--grad-accum", "1", "--steps", "3"))
    model, trainer = build_and_train(str(a / "run"), grad_accum=1, steps=6, ema=True, resume=True)
    assert trainer.resumed_from["step"] == 3
    assert_weights_close(model.state_dict(), want_ema)
    # one process trains steps 1-3, two FSDP ranks resume for steps 4-6
    b = tmp_path / "b"
    build_and_train(str(b / "run"), grad_accum=1, steps=3, ema=False)
    finished(torchrun(b, repo_env, "--parallel", "fsdp", "--grad-accum", "1", "--steps", "6", "--resume"))
    assert_weights_close(ranks(b)[0]["model"], want)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_meet_through_c10d_rendezvous(tmp_path, repo_env):
    """Two launchers, one process each, as two machines would run them (README: multi-node)."""
    launcher = ("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "mmsys-test")
    finished(*(torchrun(tmp_path, repo_env, "--parallel", "ddp", "--grad-accum", "2", launcher=launcher)
               for _ in range(2)))
    r0, r1 = ranks(tmp_path)
    assert r0["world_size"] == 2 and r0["main"] and not r1["main"]
    assert_weights_close(r0["model"], reference())


# the milestones' own training: m1's ViT loss through DDP, m2's GradCache step with the global-batch
# CLIP loss (its gradients averaged after the step). Measured apart from one process after 4 steps:
# m1 2.6e-8 (the key bias 2.4e-6), m2 4.2e-5 (AdamW's first steps are lr x sign(gradient), so
# rounding in the two-rank reduction order shows up to a few percent of lr = 2e-3)
MILESTONE_ATOL = {"m1": 1e-5, "m2": 2e-4}


@pytest.mark.parametrize("milestone", sorted(MILESTONE_ATOL))
def test_milestone_training_on_two_ranks_matches_one_process(milestone, tmp_path, repo_env):
    from ddp_milestone_worker import train
    finished(torchrun(tmp_path, repo_env, milestone, worker="ddp_milestone_worker.py"))
    r0, r1 = ranks(tmp_path)
    want = train(milestone, tmp_path / "one-process")
    assert r0.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(r0[k], r1[k]), k
        a, b = (x[len(x) // 2:] if k.endswith("attn.kv.bias") else x for x in (r0[k], v))  # see assert_weights_close
        torch.testing.assert_close(a, b, atol=MILESTONE_ATOL[milestone], rtol=0, msg=k)
