"""Generate images from a text prompt with a trained text-to-image model.

    python -m apps.generate "a large red circle on the left" --negative "blue" --guidance 3 \\
        --steps 50 -n 16 -o out.png

Writes one PNG grid of the ``n`` samples (nearest-neighbour upscaled by ``--scale``). The
checkpoint defaults to ``runs/m5/checkpoint.pt`` (written by ``python grader.py m5``).
Guidance convention: ``eps = eps_uncond + s (eps_cond - eps_uncond)``; ``s = 1`` is the plain
conditional model, ``s = 0`` the unconditional one; ``--negative`` replaces the unconditional
branch by the negative prompt. ``--sampler ddpm`` runs all T steps (``--steps`` and ``--eta``
are DDIM's: given with ddpm they are an error, as in ``apps.sample``). Every option is checked
before the model is loaded (:mod:`apps.cli`): a bad one is one ``error:`` line and exit code 2.
Guidance, sampler, steps and eta default to what the checkpoint's recipe recorded, else to
:data:`mmsys.text2image.SAMPLING` (the one place of those defaults).
"""

from __future__ import annotations

import sys
from pathlib import Path


from apps.cli import (GUIDANCE_MAX, ArgumentParser, device, fail, finite_float, missing_checkpoint, positive_int,
                      seed, unwritable, would_overwrite)
from eval.image_grid import save_grid

DEFAULT_CHECKPOINT = Path("runs/m5/checkpoint.pt")


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m apps.generate", description=__doc__.split("\n")[0])
    ap.add_argument("prompt", help='e.g. "a large red circle on the left"')
    ap.add_argument("--negative", default=None, help="negative prompt (replaces the unconditional branch)")
    ap.add_argument("--guidance", type=finite_float(0, GUIDANCE_MAX), default=None,
                    help="guidance scale s (1 = plain conditional; default: the checkpoint's recipe)")
    ap.add_argument("--steps", type=positive_int, default=None, help="DDIM steps (default: the checkpoint's recipe)")
    ap.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: the checkpoint's recipe")
    ap.add_argument("--eta", type=finite_float(0, 1), default=None,
                    help="DDIM stochasticity in [0, 1]: 0 deterministic, 1 DDPM-like (default: the recipe's)")
    ap.add_argument("-n", type=positive_int, default=16, help="number of samples (default 16)")
    ap.add_argument("--seed", type=seed, default=0, help="sample i uses its own stream seeded by (seed, i)")
    ap.add_argument("-o", "--out", default="out.png", help="output PNG (default out.png)")
    ap.add_argument("--force", action="store_true", help="overwrite the output PNG if it exists")
    ap.add_argument("--scale", type=positive_int, default=4, help="upscale factor of the grid (default 4)")
    ap.add_argument("--nrow", type=positive_int, default=None, help="images per grid row (default: a square grid)")
    ap.add_argument("--batch-size", type=positive_int, default=128, help="images sampled at once (default 128)")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                    help=f"text-to-image checkpoint (default {DEFAULT_CHECKPOINT})")
    ap.add_argument("--device", type=device, default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--no-bf16", action="store_true", help="sample in float32 (default: bf16 autocast)")
    args = ap.parse_args(argv)

    ckpt = Path(args.checkpoint)
    problem = (("the prompt is empty" if not args.prompt.strip() else None)
               or ("--eta only applies to --sampler ddim" if args.sampler == "ddpm" and args.eta else None)
               or ("--steps only applies to --sampler ddim (ddpm runs all T steps)"
                   if args.sampler == "ddpm" and args.steps is not None else None)
               or unwritable(args.out, "--out", create_parents=True)
               or missing_checkpoint(ckpt, "text-to-image", "m5") or would_overwrite([args.out], args.force))
    if problem:
        return fail(problem)
    from mmsys.checkpoint import CheckpointError
    from mmsys.text2image import checkpoint_sampling, load_text2image
    try:
        model, ck = load_text2image(ckpt, args.device)
    except CheckpointError as e:
        return fail(str(e))
    sampling = checkpoint_sampling(ck, guidance=args.guidance, sampler=args.sampler, steps=args.steps, eta=args.eta)
    unknown = [w for w in model.text.tokenizer.encode(args.prompt) if w == model.text.tokenizer.unk_id]
    if unknown:
        print(f"warning: {len(unknown)} word(s) of the prompt are not in the model's vocabulary "
              f"(they read as <unk>)", file=sys.stderr)
    images = model.sample_images([args.prompt], negative=args.negative, n=args.n, seed=args.seed,
                                 batch_size=args.batch_size, bf16=not args.no_bf16, progress=True, **sampling)
    path = save_grid(images, args.out, nrow=args.nrow, scale=args.scale)
    neg = f', negative "{args.negative}"' if args.negative else ""
    steps = sampling["steps"] if sampling["sampler"] == "ddim" else model.schedule.T
    print(f'{path}: {args.n} samples of "{args.prompt}"{neg}, guidance {sampling["guidance"]:g}, '
          f"{sampling['sampler'].upper()} {steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
