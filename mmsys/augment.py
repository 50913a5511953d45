"""Batched, seeded image augmentation on uint8 tensors (cheap enough for a 2-core CPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmsys.data.split import to_float


def random_crop_flip(images: torch.Tensor, g: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (reflect padding, then crop) and random
    horizontal flip, one draw per image from ``g``.

    Args:
        images: ``(B, 3, H, W)`` uint8.
    Returns:
        ``(B, 3, H, W)`` float in [-1, 1].
    """
    x = to_float(images)
    B, _, H, W = x.shape
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dx = torch.randint(0, 2 * pad + 1, (B,), generator=g)
        dy = torch.randint(0, 2 * pad + 1, (B,), generator=g)
        ys = dy[:, None, None] + torch.arange(H)[None, :, None]  # (B, H, 1) rows in the padded image
        xs = dx[:, None, None] + torch.arange(W)[None, None, :]  # (B, 1, W) columns
        flat = (ys * (W + 2 * pad) + xs).reshape(B, 1, H * W).expand(B, x.shape[1], H * W)
        x = x.flatten(2).gather(2, flat).view(B, -1, H, W)
    if flip:
        mask = torch.rand(B, generator=g) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def cutout(x: torch.Tensor, g: torch.Generator, size: int) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017): one ``size`` x ``size`` square per image, centred at a
    uniformly drawn pixel (so it may hang over the border), is set to 0 (mid-grey in [-1, 1]).

    Args:
        x: ``(B, C, H, W)`` float images in [-1, 1].
    Returns:
        a new ``(B, C, H, W)`` tensor; ``x`` is not modified. ``size`` 0 returns ``x`` unchanged.
    """
    if size <= 0:
        return x
    B, _, H, W = x.shape
    cy = torch.randint(0, H, (B, 1, 1), generator=g)
    cx = torch.randint(0, W, (B, 1, 1), generator=g)
    rows, cols = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :]
    lo = size // 2  # the square covers [c - lo, c - lo + size) on each axis
    inside = ((rows >= cy - lo) & (rows < cy - lo + size) & (cols >= cx - lo) & (cols < cx - lo + size))
    return x.masked_fill(inside[:, None], 0.0)  # (B, 1, H, W) mask broadcast over channels
