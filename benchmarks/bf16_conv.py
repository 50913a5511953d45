"""Is bf16 autocast native here? Times one 3x3 convolution (forward + backward) in float32 and
under bf16 autocast on the CPU, one thread, and prints what :func:`mmsys.optim.native_bf16` says.

    python -m benchmarks.bf16_conv

Seen (2026-12-02, AVX2-only AMD EPYC, one thread, idle): float32 0.173 s, bf16 2.913 s (16.8x
slower; 0.24 s vs 4.5 s with the other core busy), native_bf16 False -- why the engine and the
samplers run float32 there.
"""

from __future__ import annotations

import time

import torch

from mmsys.optim import native_bf16


def seconds(conv: torch.nn.Conv2d, x: torch.Tensor, bf16: bool, repeats: int = 5) -> float:
    """Mean seconds of one forward + backward, after 2 warm-up passes."""
    def once():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            conv(x).float().sum().backward()
    for _ in range(2):
        once()
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(32, 64, 32, 32, requires_grad=True)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    f32, b16 = seconds(conv, x, False), seconds(conv, x, True)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, native_bf16('cpu') = {native_bf16('cpu')}")
    print(f"conv 3x3, batch 32, 64 -> 64 channels, 32x32, one thread: float32 {f32:.3f} s, "
          f"bf16 autocast {b16:.3f} s ({b16 / f32:.1f}x)")


if __name__ == "__main__":
    main()
