"""Caption image files with a trained captioner: ``python -m mmsys.caption IMAGE [IMAGE ...]``.

Prints, per image, the beam-search caption and the greedy one. The checkpoint defaults to
``runs/m3/checkpoint.pt`` (written by ``python grader.py m3``). Images are read with
torchvision.io (PNG, JPEG, GIF ...; grey and RGBA become RGB), resized so the shorter side
matches the model's image size and center-cropped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from apps.cli import fail, missing_checkpoint

DEFAULT_CHECKPOINT = Path("runs/m3/checkpoint.pt")


def read_image(path: str | Path, size: int) -> torch.Tensor:
    """An image file -> uint8 (3, size, size): RGB, shorter side resized (antialiased bilinear),
    then center-cropped."""
    import warnings
    with warnings.catch_warnings():  # torchvision >= 0.29 announces that io moves to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_image, read_file
    img = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)  # (3, H, W) uint8
    H, W = img.shape[1:]
    scale = size / min(H, W)
    h, w = max(size, round(H * scale)), max(size, round(W * scale))
    img = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", antialias=True,
                        align_corners=False)[0]
    top, left = (h - size) // 2, (w - size) // 2
    return img[:, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)


def caption_files(paths: list[str | Path], checkpoint: str | Path = DEFAULT_CHECKPOINT,
                  beam: int = 3, max_len: int = 20, alpha: float = 0.6) -> list[dict]:
    """Caption image files. Returns per file ``{"file", "beam", "greedy"}``."""
    from .captioner import load_captioner
    from .data.split import to_float
    model, tok = load_captioner(checkpoint)
    x = to_float(torch.stack([read_image(p, model.cfg.image_size) for p in paths]))
    max_len = min(max_len, model.cfg.max_len - 1)
    beam_ids = model.beam_search(x, beam=beam, max_len=max_len, alpha=alpha)
    greedy_ids = model.greedy(x, max_len=max_len)
    return [{"file": str(p), "beam": tok.decode(b), "greedy": tok.decode(g)}
            for p, b, g in zip(paths, beam_ids.tolist(), greedy_ids.tolist())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmsys.caption", description=__doc__.split("\n")[0])
    ap.add_argument("images", nargs="+", help="image files (PNG, JPEG ...)")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                    help=f"captioner checkpoint (default {DEFAULT_CHECKPOINT})")
    ap.add_argument("--beam", type=int, default=3, help="beam width (default 3)")
    ap.add_argument("--alpha", type=float, default=0.6, help="length normalisation exponent")
    ap.add_argument("--max-len", type=int, default=20, help="most generated tokens")
    args = ap.parse_args(argv)

    ckpt = Path(args.checkpoint)
    if problem := missing_checkpoint(ckpt, "captioner", "m3"):
        return fail(problem)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        print(f"error: image file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    from .checkpoint import CheckpointError
    try:
        rows = caption_files(args.images, ckpt, args.beam, args.max_len, args.alpha)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # undecodable image
        print(f"error: could not read an image: {e}", file=sys.stderr)
        return 2
    for r in rows:
        print(f"{r['file']}\n  beam:   {r['beam']}\n  greedy: {r['greedy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
