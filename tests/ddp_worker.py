"""Worker for tests/test_ddp.py: train a tiny model with the engine, save each rank's weights.

Run as ``torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT_DIR``; without
torchrun, ``build_and_train(out_dir, grad_accum)`` is the single-process reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from mmsys.train import Trainer, TrainConfig, cleanup_distributed, is_main_process, seed_everything

X = torch.randn(48, 6, generator=torch.Generator().manual_seed(7))
Y = torch.sin(X.sum(-1))


def build_and_train(out_dir: str | None, grad_accum: int) -> tuple[nn.Module, Trainer]:
    seed_everything(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 1))
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=2, grad_accum=grad_accum,
                      ema_decay=0.9, log_every=3, out_dir=out_dir, progress=False)

    def loss_fn(m, batch):
        x, y = batch
        return ((m(x).squeeze(-1) - y) ** 2).mean(), {}

    trainer = Trainer(model, cfg, loss_fn=loss_fn, data_size=len(X), get_batch=lambda idx, g: (X[idx], Y[idx]),
                      kind="ddp-test", model_config={"d": 6})
    trainer.fit()
    return model, trainer


if __name__ == "__main__":
    out = Path(sys.argv[1])
    model, trainer = build_and_train(str(out / "run"), grad_accum=2)
    torch.save({"model": model.state_dict(), "ema": trainer.ema.module.state_dict(),
                "world_size": trainer.dist.world_size, "main": is_main_process()},
               out / f"rank{trainer.dist.rank}.pt")
    cleanup_distributed()
