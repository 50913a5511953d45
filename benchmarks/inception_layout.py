"""CPU time of the FID Inception network per image, contiguous (NCHW) against channels-last input,
and how far their features differ: the figure behind ``eval.fid.InceptionPool3`` running
channels-last.

    python -m benchmarks.inception_layout            # 40 seeded 32x32 images, one torch thread

Process time (not wall time), so another job on the machine distorts it little; each layout is
run twice after a warm-up and the second run printed.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch


def main() -> int:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from eval.fid import InceptionPool3, resize_bilinear_tf1
    net = InceptionPool3()
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = ((resize_bilinear_tf1(images.float(), 299) - 128) / 128).clamp(-1, 1)
    layouts = {"contiguous": x.contiguous(), "channels_last": x.contiguous(memory_format=torch.channels_last)}
    feats, ms = {}, {}
    with torch.no_grad():
        for name, inp in layouts.items():
            net.net(inp[:4])  # warm-up
            for _ in range(2):
                t0 = time.process_time()
                feats[name] = net.net(inp)
                ms[name] = (time.process_time() - t0) / len(images) * 1000
    diff = (feats["channels_last"] - feats["contiguous"]).abs().max().item()
    print(f"contiguous {ms['contiguous']:.0f} ms/image, channels-last {ms['channels_last']:.0f} ms/image "
          f"(CPU time, one thread); max feature difference {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
