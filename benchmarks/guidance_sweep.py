"""Prompt match of a trained m5 generator against the guidance scale, on more prompts than the
grader uses (how the quick profile's default guidance was chosen; see results/m5-quick/NOTE.md).

    OMP_NUM_THREADS=1 python benchmarks/guidance_sweep.py runs/m5/checkpoint.pt \
        --scales 1 1.5 2 3 5 --test 400 --heldout 200 --steps 25 10

Prints one line per (split, DDIM steps, scale): prompt match and its parts, judged by the cached
attribute classifier (eval.attributes), DDIM with the checkpoint's eta, seed 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.attributes import load_or_train, predict_attributes  # noqa: E402
from eval.prompt_match import match_rates, world_prompts  # noqa: E402
from mmsys.text2image import checkpoint_sampling, load_text2image  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 5.0])
    ap.add_argument("--test", type=int, default=400, help="test prompts (the first are the gate's 100)")
    ap.add_argument("--heldout", type=int, default=200, help="held-out composition prompts (0 = none)")
    ap.add_argument("--steps", type=int, nargs="+", default=[25])
    a = ap.parse_args()
    model, ck = load_text2image(a.checkpoint)
    eta = checkpoint_sampling(ck)["eta"]
    judge, info = load_or_train(progress=False)
    for split, n in (("test", a.test), ("heldout", a.heldout)):
        if not n:
            continue
        prompts, _ = world_prompts(split, n)
        for steps in a.steps:
            for s in a.scales:
                t0 = time.process_time()
                x = model.sample_images(prompts, guidance=s, sampler="ddim", steps=steps, eta=eta, seed=0)
                r = match_rates(prompts, predict_attributes(judge, x))
                parts = " ".join(f"{k.removesuffix('_match')} {v:.3f}" for k, v in r.items() if k != "n")
                print(f"{split:8s} n={n} DDIM-{steps} s={s:g}: {parts}  [{time.process_time() - t0:.0f} CPU s]",
                      flush=True)


if __name__ == "__main__":
    main()
