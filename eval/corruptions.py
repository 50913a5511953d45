"""Image corruptions for robustness curves (in the spirit of Hendrycks & Dietterich 2019,
ImageNet-C): Gaussian noise, Gaussian blur and JPEG compression, each at five severities.

Every function takes uint8 images ``(N, 3, H, W)`` and returns uint8 images of the same shape,
deterministically (the noise from ``seed``; blur and JPEG use no randomness). Level 0 of
:func:`corrupt` is the clean image, unchanged; levels 1-5 are the entries of :data:`SEVERITIES`,
mildest first. The blur is torchvision's ``gaussian_blur``, the JPEG codec Pillow's (libjpeg).
"""

from __future__ import annotations

import math

import torch

NOISE_SIGMAS = (0.02, 0.05, 0.1, 0.2, 0.3)  # standard deviation, in units of the [0, 1] pixel range
BLUR_SIGMAS = (0.5, 1.0, 1.5, 2.0, 3.0)  # pixels
JPEG_QUALITIES = (90, 70, 50, 30, 10)  # libjpeg quality, 100 = best


def _check(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")


def gaussian_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """uint8 (N, 3, H, W) + N(0, sigma^2) noise per pixel and channel (sigma in [0, 1] pixel
    units, drawn from ``seed``), rounded and clipped to [0, 255] -> uint8 (N, 3, H, W)."""
    _check(images)
    if sigma == 0:
        return images.clone()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=g) * (sigma * 255.0)
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def blur_kernel_size(sigma: float) -> int:
    """The odd Gaussian kernel side covering +-3 sigma: 2 * ceil(3 sigma) + 1."""
    return 2 * math.ceil(3 * sigma) + 1


def gaussian_blur(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """uint8 (N, 3, H, W) blurred by a Gaussian of ``sigma`` pixels (kernel
    :func:`blur_kernel_size`, reflected borders; torchvision) -> uint8 (N, 3, H, W). ``seed`` is
    unused (no randomness), kept so every corruption has one signature."""
    _check(images)
    if sigma == 0:
        return images.clone()
    from torchvision.transforms.v2.functional import gaussian_blur as blur
    k = blur_kernel_size(sigma)
    return blur(images, kernel_size=[k, k], sigma=[float(sigma), float(sigma)])


def jpeg(images: torch.Tensor, quality: int, seed: int = 0) -> torch.Tensor:
    """uint8 (N, 3, H, W) encoded as JPEG at ``quality`` (1-100; libjpeg's default 4:2:0 chroma
    subsampling) and decoded again, image by image, with Pillow -> uint8 (N, 3, H, W). ``seed``
    is unused (deterministic). (torchvision's ``encode_jpeg`` is deprecated since 0.29.)"""
    _check(images)
    import io

    import numpy as np
    from PIL import Image
    out = []
    for img in images.permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous() if out else images.clone()


CORRUPTIONS = {"gaussian_noise": (gaussian_noise, NOISE_SIGMAS, "noise sigma"),
               "gaussian_blur": (gaussian_blur, BLUR_SIGMAS, "blur sigma (px)"),
               "jpeg": (jpeg, JPEG_QUALITIES, "JPEG quality")}
SEVERITIES = {name: values for name, (_, values, _) in CORRUPTIONS.items()}


def corrupt(images: torch.Tensor, name: str, level: int, seed: int = 0) -> torch.Tensor:
    """``images`` uint8 (N, 3, H, W) under corruption ``name`` (a key of :data:`CORRUPTIONS`) at
    ``level``: 0 = clean (an unchanged copy), 1..5 = ``SEVERITIES[name][level - 1]``."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}: choose one of {', '.join(CORRUPTIONS)}")
    fn, values, _ = CORRUPTIONS[name]
    if not 0 <= level <= len(values):
        raise ValueError(f"level must be in 0..{len(values)}, got {level}")
    _check(images)
    return images.clone() if level == 0 else fn(images, values[level - 1], seed)
