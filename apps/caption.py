"""Caption image files with a trained captioner: ``python -m apps.caption IMAGE [IMAGE ...]``.

Prints, per image, the beam-search caption and the greedy one. The checkpoint defaults to
``runs/m3/checkpoint.pt`` (written by ``python grader.py m3``). Images are read exactly as the
training data was (:func:`mmsys.images.load_image`: PNG, JPEG, GIF ...; grey and RGBA become RGB;
shorter side resized bicubic, antialiased, then center-cropped to the model's image size).
Every option is checked before the model is loaded (:mod:`apps.cli`): a bad one is one ``error:``
line and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from apps.cli import ArgumentParser, fail, finite_float, missing_checkpoint, positive_int

DEFAULT_CHECKPOINT = Path("runs/m3/checkpoint.pt")
BEAM, ALPHA, MAX_LEN = 3, 0.6, 20  # beam width, GNMT length exponent, most generated tokens
ALPHA_MAX = 5.0  # GNMT's alpha is used in [0, 1]; past a few it only favours the longest beam


def caption_files(paths: list[str | Path], checkpoint: str | Path = DEFAULT_CHECKPOINT,
                  beam: int = BEAM, max_len: int = MAX_LEN, alpha: float = ALPHA) -> list[dict]:
    """Caption image files. Returns per file ``{"file", "beam", "greedy"}``."""
    from mmsys.captioner import load_captioner
    from mmsys.data.split import to_float
    from mmsys.images import load_image
    model, tok = load_captioner(checkpoint)
    x = to_float(torch.stack([load_image(p, model.cfg.image_size) for p in paths]))
    max_len = min(max_len, model.cfg.max_len - 1)
    beam_ids = model.beam_search(x, beam=beam, max_len=max_len, alpha=alpha)
    greedy_ids = model.greedy(x, max_len=max_len)
    return [{"file": str(p), "beam": tok.decode(b), "greedy": tok.decode(g)}
            for p, b, g in zip(paths, beam_ids.tolist(), greedy_ids.tolist())]


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m apps.caption", description=__doc__.split("\n")[0])
    ap.add_argument("images", nargs="+", help="image files (PNG, JPEG ...)")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                    help=f"captioner checkpoint (default {DEFAULT_CHECKPOINT})")
    ap.add_argument("--beam", type=positive_int, default=BEAM, help=f"beam width (default {BEAM})")
    ap.add_argument("--alpha", type=finite_float(0, ALPHA_MAX), default=ALPHA,
                    help=f"length normalisation exponent in [0, {ALPHA_MAX:g}] (default {ALPHA})")
    ap.add_argument("--max-len", type=positive_int, default=MAX_LEN, help=f"most generated tokens (default {MAX_LEN})")
    args = ap.parse_args(argv)

    ckpt = Path(args.checkpoint)
    if problem := missing_checkpoint(ckpt, "captioner", "m3"):
        return fail(problem)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        return fail(f"image file(s) not found: {', '.join(missing)}")
    from mmsys.checkpoint import CheckpointError
    try:
        rows = caption_files(args.images, ckpt, args.beam, args.max_len, args.alpha)
    except CheckpointError as e:
        return fail(str(e))
    except OSError as e:  # not an image (PIL.UnidentifiedImageError) or unreadable
        return fail(f"could not read an image: {e}")
    for r in rows:
        print(f"{r['file']}\n  beam:   {r['beam']}\n  greedy: {r['greedy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
