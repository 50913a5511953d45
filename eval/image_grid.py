"""Image grids: many images tiled into one picture, written as a PNG (the one copy).

Used by the command-line programs (``apps.sample`` ...) and by figures. Pixels are converted
with the grader's own :func:`eval.reference.data.split.to_uint8`; nothing here imports the code
under test, so ``apps`` and ``eval`` can both use it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from eval.reference.data.split import to_uint8


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, scale: int = 1,
               pad_value: int = 255) -> torch.Tensor:
    """Tile images row by row.

    Args:
        images: ``(N, 3, H, W)`` uint8, or float in [-1, 1].
        nrow: images per row (default ``ceil(sqrt(N))``; never more than N).
        padding: pixels of ``pad_value`` around and between the images.
        scale: nearest-neighbour upscaling factor of every image.
    Returns:
        uint8 ``(3, rows (H s + padding) + padding, cols (W s + padding) + padding)``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    x = images if images.dtype == torch.uint8 else to_uint8(images.float())
    if scale > 1:
        x = F.interpolate(x.float(), scale_factor=scale, mode="nearest").to(torch.uint8)
    n, c, h, w = x.shape
    cols = min(nrow or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / cols)
    grid = torch.full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value,
                      dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, padding: int = 2,
              scale: int = 1) -> Path:
    """:func:`image_grid` of ``images`` ``(N, 3, H, W)`` written to the PNG ``path``; returns the path."""
    from PIL import Image
    grid = image_grid(images.cpu(), nrow, padding, scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()).save(path, format="PNG")
    return path
