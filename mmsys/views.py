"""Random views of an image for contrastive self-supervision (SimCLR, Chen et al. 2020, sec. 3 and
appendix A): random resized crop, horizontal flip, colour jitter, grayscale, Gaussian blur.

The operations are torchvision.transforms.v2's (``RandomResizedCrop``, ``RandomHorizontalFlip``,
``ColorJitter``, ``RandomGrayscale``, ``GaussianBlur``), with the same parameter distributions and
the same arithmetic, applied to a whole batch at once with one parameter draw per image from a
``torch.Generator``: a per-image loop over ``v2.Compose`` costs about 0.35 s per 512 views of
32x32 on one CPU thread, longer than the training step it feeds. ``tests/test_ssl.py`` checks
each batched operation against ``torchvision.transforms.v2.functional`` on the same parameters.

    pairs = two_views(images_uint8, generator, ViewConfig())   # (B, 2, 3, H, W) float in [-1, 1]
    rows = stack_views(pairs)                                  # (2B, 3, H, W): rows i and B + i pair
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


@dataclass
class ViewConfig:
    """The augmentation of one view (SimCLR's CIFAR-10 setting, colour strength 0.5). A
    probability or strength of 0 removes that operation (the ablations remove each in turn)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop: area fraction ...
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # ... and aspect ratio (log-uniform)
    flip: float = 0.5  # probability of a horizontal flip
    jitter: float = 0.8  # probability of colour jitter ...
    brightness: float = 0.4  # ... factors uniform in [1 - s, 1 + s] ...
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # ... and a hue shift uniform in [-h, h] (fraction of the colour circle)
    grayscale: float = 0.2  # probability of grayscale
    blur: float = 0.0  # probability of Gaussian blur (SimCLR leaves it out on CIFAR-10's 32x32) ...
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # ... sigma uniform in this range ...
    blur_kernel: int = 3  # ... odd kernel size (about 10 % of the image side)


# ----------------------------------------------------------------------------- the pipeline


def two_views(images: torch.Tensor, g: torch.Generator, cfg: ViewConfig = ViewConfig()) -> torch.Tensor:
    """Two independent random views of each image.

    Args:
        images: ``(B, 3, H, W)`` uint8.
    Returns:
        ``(B, 2, 3, H, W)`` float in [-1, 1]: the two views of each image (one batch row each, so
        the engine splits a batch of pairs across micro-batches and ranks).
    """
    x = images.float().div(255.0)
    return torch.stack([random_view(x, g, cfg), random_view(x, g, cfg)], dim=1).mul(2.0).sub(1.0)


def stack_views(pairs: torch.Tensor) -> torch.Tensor:
    """(B, 2, ...) view pairs -> (2B, ...): every first view, then every second one (rows ``i``
    and ``B + i`` are the two views of image ``i``, the layout NT-Xent pairs)."""
    return pairs.transpose(0, 1).reshape(-1, *pairs.shape[2:])


def random_view(x: torch.Tensor, g: torch.Generator, cfg: ViewConfig) -> torch.Tensor:
    """One random view per image of ``x`` ``(B, 3, H, W)`` float in [0, 1] -> same shape and range,
    the operations in SimCLR's order: crop, flip, jitter, grayscale, blur."""
    B, _, H, W = x.shape
    x = resized_crop(x, *crop_boxes(B, H, W, g, cfg.crop_scale, cfg.crop_ratio), size=(H, W))
    if cfg.flip:
        x = torch.where(chance(B, cfg.flip, g)[:, None, None, None], x.flip(3), x)
    if cfg.jitter:
        x = torch.where(chance(B, cfg.jitter, g)[:, None, None, None], color_jitter(x, g, cfg), x)
    if cfg.grayscale:
        x = torch.where(chance(B, cfg.grayscale, g)[:, None, None, None], grayscale(x).expand_as(x), x)
    if cfg.blur:
        sigma = uniform(B, *cfg.blur_sigma, g)
        x = torch.where(chance(B, cfg.blur, g)[:, None, None, None], gaussian_blur(x, cfg.blur_kernel, sigma), x)
    return x


def chance(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    """(n,) bool, each True with probability ``p``."""
    return torch.rand(n, generator=g) < p


def uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    """(n,) uniform in [lo, hi]."""
    return lo + (hi - lo) * torch.rand(n, generator=g)


# ----------------------------------------------------------------------------- crop


def crop_boxes(n: int, H: int, W: int, g: torch.Generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
               tries: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop's boxes for ``n`` images of H x W: area uniform in ``scale`` x H W,
    aspect ratio log-uniform in ``ratio``, the first of ``tries`` draws that fits, placed
    uniformly; else the central crop at the nearest allowed ratio. Returns (top, left, height,
    width), each (n,) int64."""
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, generator=g)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(n, tries, generator=g)
    w = torch.round(torch.sqrt(area * H * W * torch.exp(log_r))).long()
    h = torch.round(torch.sqrt(area * H * W / torch.exp(log_r))).long()
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = torch.where(ok.any(1), ok.float().argmax(1), -1)
    pick = first.clamp(min=0)[:, None]
    h, w = h.gather(1, pick)[:, 0], w.gather(1, pick)[:, 0]
    # fallback (no draw fits): the whole image, or its centre at the nearest allowed ratio
    in_ratio = W / H
    fw, fh = (W, int(round(W / min(ratio)))) if in_ratio < min(ratio) else \
        (int(round(H * max(ratio))), H) if in_ratio > max(ratio) else (W, H)
    miss = first < 0
    h, w = torch.where(miss, fh, h), torch.where(miss, fw, w)
    top = (torch.rand(n, generator=g) * (H - h + 1)).long().clamp(max=H - h)
    left = (torch.rand(n, generator=g) * (W - w + 1)).long().clamp(max=W - w)
    top, left = torch.where(miss, (H - h) // 2, top), torch.where(miss, (W - w) // 2, left)
    return top, left, h, w


def resized_crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor,
                 width: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop box ``i`` of image ``i`` and resize it bilinearly to ``size`` (as
    ``v2.functional.resized_crop``; crops no larger than ``size``, so no antialiasing applies).

    Args:
        x: ``(B, C, H, W)`` float; top, left, height, width: ``(B,)`` int pixel boxes.
    Returns:
        ``(B, C, *size)``.
    """
    B, _, H, W = x.shape
    oh, ow = size
    # output pixel centre k maps to crop coordinate (k + 0.5) * h / oh - 0.5 (align_corners=False),
    # edge-clamped as F.interpolate does; then to grid_sample's [-1, 1] over the full image
    ys = (torch.arange(oh) + 0.5)[None] * (height[:, None] / oh) - 0.5  # (B, oh) in crop pixels
    xs = (torch.arange(ow) + 0.5)[None] * (width[:, None] / ow) - 0.5
    ys = ys.clamp(min=0).minimum(height[:, None] - 1.0) + top[:, None]
    xs = xs.clamp(min=0).minimum(width[:, None] - 1.0) + left[:, None]
    gy = (2 * ys + 1) / H - 1
    gx = (2 * xs + 1) / W - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (B, oh, ow, 2)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------- colour


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, gr, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * gr + GRAY[2] * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio * a + (1 - ratio) * b, clamped to [0, 1]; ratio (B,)."""
    r = ratio[:, None, None, None]
    return (r * a + (1 - r) * b).clamp(0, 1)


def adjust_brightness(x, factor):
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x, factor):
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` (B,) turns (in [-0.5, 0.5]) in HSV space."""
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb(torch.remainder(h + shift[:, None, None], 1.0), s, v)


def _rgb_to_hsv(x: torch.Tensor):
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.remainder((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    """Each channel n of (R, G, B) is v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6
    for n = 5, 3, 1: the piecewise-linear hue wheel in closed form."""
    n = torch.tensor([5.0, 3.0, 1.0], dtype=h.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h[:, None], 6.0)
    return v[:, None] - (v * s)[:, None] * torch.minimum(k, 4.0 - k).clamp(0, 1)


def color_jitter(x: torch.Tensor, g: torch.Generator, cfg: ViewConfig) -> torch.Tensor:
    """ColorJitter: brightness, contrast, saturation and hue each by a factor drawn per image,
    applied in a random order per image (as v2.ColorJitter draws ``randperm(4)``)."""
    B = len(x)
    ops = []
    for strength, fn in ((cfg.brightness, adjust_brightness), (cfg.contrast, adjust_contrast),
                         (cfg.saturation, adjust_saturation)):
        factor = uniform(B, max(0.0, 1 - strength), 1 + strength, g) if strength else None
        ops.append((fn, factor))
    ops.append((adjust_hue, uniform(B, -cfg.hue, cfg.hue, g) if cfg.hue else None))
    order = torch.argsort(torch.rand(B, 4, generator=g), dim=1)  # (B, 4): a random permutation per image
    x = x.clone()
    for stage in range(4):
        for k, (fn, factor) in enumerate(ops):
            mine = (order[:, stage] == k).nonzero()[:, 0]  # the images whose op at this stage is k
            if factor is not None and len(mine):
                x[mine] = fn(x[mine], factor[mine])
    return x


# ----------------------------------------------------------------------------- blur


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, ``kernel`` taps, a ``sigma`` (B,) per image, reflect padding (as
    ``v2.functional.gaussian_blur`` with kernel_size [k, k] and sigma [s, s])."""
    B, C, H, W = x.shape
    half = (kernel - 1) * 0.5
    taps = torch.linspace(-half, half, kernel)
    k1 = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    k1 = (k1 / k1.sum(1, keepdim=True)).to(x.dtype)  # (B, k)
    w = k1.repeat_interleave(C, dim=0)  # (B*C, k): one filter per (image, channel)
    pad = kernel // 2
    y = F.pad(x.reshape(1, B * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, w[:, None, None, :], groups=B * C)  # along the width
    y = F.conv2d(y, w[:, None, :, None], groups=B * C)  # along the height
    return y.view(B, C, H, W)
