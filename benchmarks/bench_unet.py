"""Forward (and optionally train-step) throughput of the diffusion U-Net on this machine.

Compares fp32 vs bf16 autocast, contiguous vs channels_last, and prints images/s.

    python benchmarks/bench_unet.py                       # default UNetConfig, 32x32, batch 128
    python benchmarks/bench_unet.py --base 48 --size 32 --train
    python benchmarks/bench_unet.py --context-dim 128     # with text cross-attention (L=16 tokens)
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from mmsys.diffusion.unet import UNet, UNetConfig


def bench(model, x, t, ctx, mask, *, bf16: bool, channels_last: bool, train: bool, iters: int):
    """(best, median) images per second over ``iters`` timed forward (or forward+backward)
    passes after one warm-up. The best is the number to compare: the CPU here is shared with
    other jobs, so single timings fluctuate by 2-3x."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    model.train(train)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    def once():
        with amp, (nullcontext() if train else torch.inference_mode()):
            out = model(x, t, ctx, mask)
            if train:
                out.float().square().mean().backward()

    once()  # warm-up (allocations, kernel selection)
    rates = []
    for _ in range(iters):
        start = time.perf_counter()
        once()
        rates.append(x.shape[0] / (time.perf_counter() - start))
    return max(rates), statistics.median(rates)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=int, default=UNetConfig.base)
    ap.add_argument("--mults", type=str, default=",".join(map(str, UNetConfig.channel_mults)))
    ap.add_argument("--n-res", type=int, default=UNetConfig.n_res)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--context-dim", type=int, default=None)
    ap.add_argument("--train", action="store_true", help="also time forward+backward")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    cfg = UNetConfig(base=a.base, channel_mults=tuple(int(m) for m in a.mults.split(",")), n_res=a.n_res,
                     context_dim=a.context_dim, image_size=a.size)
    torch.manual_seed(0)
    model = UNet(cfg)
    x = torch.randn(a.batch, cfg.in_ch, a.size, a.size)
    t = torch.randint(0, 1000, (a.batch,))
    ctx = torch.randn(a.batch, 16, a.context_dim) if a.context_dim else None
    mask = torch.zeros(a.batch, 16, dtype=torch.bool) if a.context_dim else None
    print(f"{cfg}\nparams {model.n_params() / 1e6:.2f} M, batch {a.batch}, {a.size}x{a.size}, "
          f"threads {torch.get_num_threads()}")
    for train in ([False, True] if a.train else [False]):
        for bf16 in (False, True):
            for cl in (False, True):
                best, med = bench(model, x, t, ctx, mask, bf16=bf16, channels_last=cl, train=train, iters=a.iters)
                print(f"{'train' if train else 'forward':8s} {'bf16' if bf16 else 'fp32':5s} "
                      f"{'channels_last' if cl else 'contiguous':14s} best {best:7.1f}  median {med:7.1f} images/s")


if __name__ == "__main__":
    main()
