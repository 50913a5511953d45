"""Worker for tests/test_ddp.py: train a tiny model with the engine, save each rank's weights.

Run under torchrun (``--standalone --nproc_per_node=2``, or two ``--nnodes 2`` launchers)::

    tests/ddp_worker.py OUT_DIR [--parallel ddp|fsdp] [--grad-accum N] [--steps N] [--resume]

Without torchrun it is the single-process reference; :func:`build_and_train` is the same run
called in the test's own process. The model holds one transformer block (FSDP2 shards it as
its own unit) between a linear embedding and a linear head. The learning rate is constant
after warm-up, so a run of 3 steps is a prefix of a run of 6 (a resumed run may extend it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from mmsys.train import Trainer, TrainConfig, cleanup_distributed, is_main_process, seed_everything
from mmsys.transformer import Block

X = torch.randn(48, 6, generator=torch.Generator().manual_seed(7))
Y = torch.sin(X.sum(-1))


class Tiny(nn.Module):
    """(B, 6) -> (B,): embed to 4 tokens of width 16, one block, mean-pool, linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 4 * 16)
        self.block = Block(16, n_heads=2, mlp_ratio=2.0)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        h, _, _ = self.block(self.embed(x).view(len(x), 4, 16))
        return self.head(h.mean(1)).squeeze(-1)


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean(), {}


def build_and_train(out_dir: str | None, grad_accum: int = 1, steps: int = 6, parallel: str = "ddp",
                    ema: bool = True, resume: bool = False) -> tuple[nn.Module, Trainer]:
    seed_everything(0)
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=2, min_lr_ratio=1.0, grad_accum=grad_accum,
                      ema_decay=0.9 if ema else None, log_every=3, out_dir=out_dir, progress=False, parallel=parallel)
    trainer = Trainer(Tiny(), cfg, loss_fn=loss_fn, data_size=len(X), get_batch=lambda idx, g: (X[idx], Y[idx]),
                      kind="ddp-test", model_config={"d": 6}, resume_from="auto" if resume else None)
    trainer.fit()
    return trainer.eval_model() if not ema else trainer.model, trainer


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--parallel", default="ddp")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    ema = a.parallel == "ddp"
    model, trainer = build_and_train(str(a.out / "run"), a.grad_accum, a.steps, a.parallel, ema, a.resume)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"model": weights, "ema": trainer.ema.module.state_dict() if ema else None,
                "world_size": trainer.dist.world_size, "main": is_main_process()},
               a.out / f"rank{trainer.dist.rank}.pt")
    cleanup_distributed()
    sys.exit(0)
