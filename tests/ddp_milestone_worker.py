"""Worker for tests/test_ddp.py: m1's ViT and m2's CLIP trained by the milestones' own training
functions (``milestones.m1_vit.train``, ``milestones.m2_clip.train_clip``: their data, loss,
GradCache step and engine), the weights saved per rank.

Run under torchrun as ``tests/ddp_milestone_worker.py OUT_DIR m1|m2``, or call :func:`train`
in one process for the reference. The recipes are the smoke ones made deterministic per item,
so that a global batch means the same thing however many ranks share it: no random crop or
flip for m1 (each rank draws augmentation from its own generator), one caption per image for
m2 (the caption of a pair is drawn the same way). m2 accumulates two GradCache micro-batches
and its loss is the global-batch one (negatives from every rank).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from milestones import m1_vit, m2_clip
from milestones.base import RunContext
from milestones.common import world_split
from mmsys.distributed import cleanup_distributed, rank


def train(milestone: str, out: Path) -> dict:
    """The trained model's state dict (the run's checkpoint and log in ``out``)."""
    ctx = RunContext(out_dir=out, progress=False)
    if milestone == "m1":
        recipe = replace(m1_vit.SMOKE_RECIPES["quick"], n_train=64, steps=4, batch_size=16, warmup_steps=1,
                         pad=0, flip=False, control_steps=0)
        split = world_split(ctx, "train", recipe.n_train, single=True, captions=False)
        model, _ = m1_vit.train(recipe, split, ctx)
    else:
        recipe = replace(m2_clip.SMOKE_RECIPES["quick"], n_train=64, steps=4, batch_size=16, grad_accum=2,
                         warmup_steps=1, model=dict(m2_clip.RECIPES["quick"].model, vision_depth=1, text_depth=1))
        split = world_split(ctx, "train", recipe.n_train)
        split = replace(split, captions=[c[:1] for c in split.captions])
        model, _, _ = m2_clip.train_clip(recipe, split, seed=0, out_dir=out, progress=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    out, name = Path(sys.argv[1]), sys.argv[2]
    torch.save(train(name, out / "run"), out / f"rank{rank()}.pt")
    cleanup_distributed()
