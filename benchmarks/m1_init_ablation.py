"""Short CIFAR-10 runs of the m1 full recipe's ViT that differ only in initialisation.

A full m1 run costs hours on a 2-core CPU, so a change of recipe is first tried here: the same
model, data order, augmentation and schedule (a short warm-up + cosine of ``--steps`` steps at
32x32, no progressive resizing, no mixing: mixing slows short runs too much to read them), once
per ``--init``. Prints test accuracy on the 10,000 test images and the mean attention distance
(in patches) of the first block at initialisation, i.e. how local attention starts out.

    OMP_NUM_THREADS=1 python -m benchmarks.m1_init_ablation --init trunc_normal --steps 1200 &
    OMP_NUM_THREADS=1 python -m benchmarks.m1_init_ablation --init mimetic --steps 1200
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from milestones import m1_vit as m1
from milestones.base import RunContext
from mmsys.data.split import to_float
from mmsys.vit import ViT, ViTConfig


def attention_distance(model: ViT, x: torch.Tensor) -> float:
    """Mean distance (in patches) from each patch query to the patches it attends to, block 1."""
    w = model.attention_maps(x)[0][:, :, 1:, 1:].float()  # (B, H, N, N), patches only
    w = w / w.sum(-1, keepdim=True)
    g = round(w.shape[-1] ** 0.5)
    r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    pos = torch.stack([r.flatten(), c.flatten()], 1).float()
    dist = torch.cdist(pos, pos)  # (N, N)
    return (w * dist).sum(-1).mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", default="trunc_normal", choices=["trunc_normal", "mimetic"])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--data-root", default="../shared/data/cifar10")
    a = p.parse_args()

    full = m1.RECIPES["full"]
    recipe = replace(full, model={**full.model, "init": a.init}, steps=a.steps, warmup_steps=a.steps // 12,
                     low_res=0, low_res_steps=0, mixup=0.0, cutmix=0.0, ckpt_every=0, restarts=())
    ctx = RunContext(profile="full", data_root=Path(a.data_root), progress=False,
                     out_dir=Path(tempfile.mkdtemp(prefix=f"m1-{a.init}-")))
    train, test = m1.load_data(recipe, ctx)
    torch.manual_seed(ctx.seed)
    d0 = attention_distance(ViT(ViTConfig(**recipe.model)), to_float(test.images[:64]))
    t = time.time()
    model, summary = m1.train(recipe, train, ctx)
    acc = m1.evaluate(model, test)["test_accuracy"]
    print(f"init {a.init}: {a.steps} steps x {recipe.batch_size} in {time.time() - t:.0f} s, "
          f"test accuracy {acc:.4f}, final training loss {summary['final_metrics']['loss']:.3f}, "
          f"attention distance at init {d0:.2f} patches (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
