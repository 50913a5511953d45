"""Sample images from a trained unconditional DDPM: ``python -m apps.sample``.

    python -m apps.sample --sampler ddim --steps 50 -n 64 -o grid.png
    python -m apps.sample --checkpoint runs/m4/checkpoint.pt --sampler ddpm -n 16 --seed 3 -o ddpm.png
    python -m apps.sample --sampler ddim --steps 20 --eta 0.5 -n 64 -o grid.png --force

The checkpoint defaults to ``runs/m4/checkpoint.pt`` (written by ``python grader.py m4``); the
EMA weights are used when the checkpoint has them. ``--sampler ddpm`` runs ancestral sampling
over all T steps (``--steps`` must be omitted or equal T); ``--sampler ddim`` uses ``--steps``
(default 50) evenly spaced steps and stochasticity ``--eta`` in [0, 1] (0 = deterministic). The output is
one PNG grid (``--nrow`` images per row). An existing output file is never overwritten unless
``--force`` is given (exit code 2 otherwise); ``--save-tensor PATH`` also writes the uint8
images ``(n, 3, H, W)`` with ``torch.save``. Every option is checked before the model is loaded
(:mod:`apps.cli`): a bad one is one ``error:`` line and exit code 2.

Seeding: sample ``i`` of a run with ``--seed s`` is drawn from its own generator seeded by
``(s, i)``, so it is the same image whatever ``-n`` or ``--batch-size`` (up to kernel round-off):
``-n 8`` gives the first 8 images of ``-n 64``.

The library functions are :func:`mmsys.diffusion.ddpm.load_ddpm` and
:func:`mmsys.diffusion.ddpm.sample_images`; the grid is :func:`eval.image_grid.save_grid`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from apps.cli import (ArgumentParser, device, fail, finite_float, missing_checkpoint, positive_int, seed,
                      unwritable, would_overwrite)
from eval.image_grid import save_grid
from mmsys.checkpoint import CheckpointError
from mmsys.diffusion.ddpm import load_ddpm, sample_images
from mmsys.diffusion.samplers import make_sampler

DEFAULT_CHECKPOINT = Path("runs/m4/checkpoint.pt")


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m apps.sample", description=__doc__.split("\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help=f"default {DEFAULT_CHECKPOINT}")
    ap.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    ap.add_argument("--steps", type=positive_int, default=None, help="DDIM steps (default 50); DDPM always uses all T")
    ap.add_argument("--eta", type=finite_float(0, 1), default=0.0,
                    help="DDIM stochasticity in [0, 1] (0 deterministic, 1 ~ DDPM)")
    ap.add_argument("-n", type=positive_int, default=64, help="number of images (default 64)")
    ap.add_argument("--seed", type=seed, default=0)
    ap.add_argument("-o", "--output", default="samples.png", help="PNG grid to write (default samples.png)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output file")
    ap.add_argument("--nrow", type=positive_int, default=8, help="images per grid row")
    ap.add_argument("--batch-size", type=positive_int, default=250)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--save-tensor", default=None, help="also torch.save the uint8 images here (an existing folder)")
    ap.add_argument("--device", type=device, default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)

    ckpt, out = Path(a.checkpoint), Path(a.output)
    problem = (unwritable(out, "--output", create_parents=True) or unwritable(a.save_tensor, "--save-tensor")
               or missing_checkpoint(ckpt, "DDPM", "m4") or would_overwrite([out, a.save_tensor], a.force))
    if problem:
        return fail(problem)
    if a.sampler == "ddpm" and a.eta != 0:
        return fail("--eta only applies to --sampler ddim")
    try:
        model, schedule, info = load_ddpm(ckpt, a.device)
        make_sampler(schedule, a.sampler, a.steps)  # validate --steps before any work
    except (CheckpointError, ValueError) as e:
        return fail(str(e))
    t0 = time.perf_counter()
    images = sample_images(model, schedule, a.n, a.sampler, a.steps, a.eta, a.seed, a.batch_size,
                           bf16=not a.fp32, progress=not a.no_progress)
    dt = time.perf_counter() - t0
    save_grid(images, out, nrow=a.nrow)
    if a.save_tensor:
        torch.save(images, a.save_tensor)
    n_steps = schedule.T if a.sampler == "ddpm" else (a.steps or 50)
    print(f"wrote {out}: {a.n} images, {a.sampler} {n_steps} steps (T={schedule.T}), eta {a.eta}, seed {a.seed}, "
          f"EMA {'on' if info['ema'] else 'off'}, {dt:.1f} s ({dt / a.n:.3f} s/image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
