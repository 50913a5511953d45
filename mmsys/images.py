"""Image files -> uint8 tensors at a model's square size: the one resize every path uses.

Training data (:mod:`mmsys.data.coco`) and inference on image files (the captioning and
retrieval command lines) read images with :func:`load_image`, so a model sees at inference
exactly the resampling it was trained on: shorter side resized with PIL's bicubic filter
(antialiased: its support widens with the downscale factor), then a center crop.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bicubic, antialiased), then center-crop to
    ``size x size``."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image(path, size: int) -> torch.Tensor:
    """One image file (JPEG, PNG, GIF ...; grey and RGBA become RGB) -> uint8 ``(3, size, size)``
    (shorter side resized, center crop; :func:`resize_center_crop`).

    JPEGs are decoded at a reduced DCT scale when much larger than ``size`` (PIL draft mode),
    which is several times faster and visually equivalent after the downscale. Raises OSError
    (``PIL.UnidentifiedImageError``) for a file that is not an image.
    """
    with Image.open(path) as img:
        img.draft("RGB", (2 * size, 2 * size))
        img = resize_center_crop(img.convert("RGB"), size)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> uint8 (N, 3, size, size), bicubic, antialiased (unchanged when
    already that size)."""
    import torch.nn.functional as F
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)
