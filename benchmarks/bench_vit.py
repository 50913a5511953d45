"""Time one training step of the mmsys ViT against torchvision's VisionTransformer.

Same configuration (image 32, patch 4, width, depth, heads, MLP width, 10 classes), same batch,
same AdamW, in one process, interleaved so both see the same machine load. Prints images/s of
each and the ratio mmsys / torchvision (> 1: mmsys is faster).

    python benchmarks/bench_vit.py [--dim 128 --depth 6 --heads 4 --mlp-ratio 2 --batch 128 --iters 10 --bf16]
                                   [--image-size 16] [--compile]

``--image-size 16`` times m1 full's progressive-resizing phase (16 tokens); ``--compile`` runs
both models through ``torch.compile`` (inductor; the first steps compile and are not timed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torchvision.models.vision_transformer import VisionTransformer

from mmsys.vit import ViT, ViTConfig


def step_time(model, x, y, opt, bf16: bool) -> float:
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="torch.compile both models (inductor)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ours = ViT(ViTConfig(image_size=a.image_size, patch_size=4, dim=a.dim, depth=a.depth, n_heads=a.heads,
                         mlp_ratio=a.mlp_ratio, n_classes=10))
    ref = VisionTransformer(image_size=a.image_size, patch_size=4, num_layers=a.depth, num_heads=a.heads,
                            hidden_dim=a.dim, mlp_dim=int(a.dim * a.mlp_ratio), num_classes=10)
    n_ours, n_ref = (sum(p.numel() for p in m.parameters()) for m in (ours, ref))
    x, y = torch.randn(a.batch, 3, a.image_size, a.image_size), torch.randint(0, 10, (a.batch,))
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ours, ref)}
    run = {m: torch.compile(m) if a.compile else m for m in (ours, ref)}  # the same parameters
    times = {ours: [], ref: []}
    for i in range(a.iters + 2):  # two warm-up rounds (compilation with --compile), then timed rounds, interleaved
        for m in (ours, ref):
            dt = step_time(run[m], x, y, opts[m], a.bf16)
            if i >= 2:
                times[m].append(dt)
    med = {m: statistics.median(ts) for m, ts in times.items()}
    print(f"config: dim {a.dim}, depth {a.depth}, heads {a.heads}, mlp {int(a.dim * a.mlp_ratio)}, patch 4, "
          f"image {a.image_size}, batch {a.batch}, {'bf16 autocast' if a.bf16 else 'fp32'}"
          f"{', torch.compile' if a.compile else ''}, threads {torch.get_num_threads()}, "
          f"cpu {torch.backends.cpu.get_cpu_capability()}")
    print(f"parameters: mmsys {n_ours:,}  torchvision {n_ref:,}")
    for name, m in (("mmsys ViT", ours), ("torchvision ViT", ref)):
        print(f"{name:<16} median step {med[m] * 1000:8.1f} ms   {a.batch / med[m]:8.1f} images/s")
    print(f"ratio (mmsys images/s / torchvision images/s): {med[ref] / med[ours]:.3f}")


if __name__ == "__main__":
    main()
