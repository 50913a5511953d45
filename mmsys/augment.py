"""Batched, seeded image augmentation on uint8 tensors (cheap enough for a 2-core CPU)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .data.split import to_float


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


def mix_batch(x: torch.Tensor, labels: torch.Tensor, g: torch.Generator, n_classes: int,
              mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
              smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) over a batch, with soft targets.

    Each image ``i`` is mixed with image ``B - 1 - i`` (the batch reversed). The mixing weight
    ``lam ~ Beta(alpha, alpha)`` is drawn once per batch from ``g``; when both alphas are set,
    a fair coin from ``g`` picks one method per batch.
    Mixup: ``x' = lam * x + (1 - lam) * x_rev``. CutMix: a box of area ``(1 - lam) * H * W``
    (centre uniform, clipped at the border) is pasted from ``x_rev``, and ``lam`` becomes the
    fraction of pixels kept. Targets: ``lam * t + (1 - lam) * t_rev`` with ``t`` the one-hot
    label smoothed to ``(1 - smoothing) * onehot + smoothing / n_classes``.

    Args:
        x: ``(B, C, H, W)`` float images; labels: ``(B,)`` int64.
    Returns:
        ``(x', targets)``: ``(B, C, H, W)`` (``x`` itself when both alphas are 0) and
        ``(B, n_classes)`` float rows summing to 1.
    """
    t = F.one_hot(labels, n_classes).float() * (1.0 - smoothing) + smoothing / n_classes
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return x, t
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or bool(torch.rand((), generator=g) < 0.5))
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    # torch's Beta sampler takes no generator: draw it from a numpy RNG seeded by ``g``
    seed = int(torch.randint(0, 2**62, (), generator=g))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    x_rev = x.flip(0)
    if use_cutmix:
        B, _, H, W = x.shape
        h, w = round(H * math.sqrt(1.0 - lam)), round(W * math.sqrt(1.0 - lam))
        cy, cx = int(torch.randint(0, H, (), generator=g)), int(torch.randint(0, W, (), generator=g))
        y0, y1 = max(cy - h // 2, 0), min(cy - h // 2 + h, H)
        x0, x1 = max(cx - w // 2, 0), min(cx - w // 2 + w, W)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x_rev[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        x = lam * x + (1.0 - lam) * x_rev
    return x, lam * t + (1.0 - lam) * t.flip(0)
