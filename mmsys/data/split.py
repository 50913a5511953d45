"""The one container every dataset in mmsys produces: a split held in memory.

Images are kept as uint8 ``(N, 3, H, W)`` tensors (small, exact, hashable); models convert
them with :func:`to_float` to ``[-1, 1]`` floats. Labels and captions are optional so the same
type serves classification (m1), image-text pairs (m2, m3, m5) and generation (m4).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


class DataMissingError(FileNotFoundError):
    """A dataset's files are not where we looked. The message says where and how to get them."""


@dataclass
class DataSplit:
    """One split of one dataset, in memory.

    Attributes:
        name: ``"<dataset>/<split>"``, e.g. ``"world/train"`` or ``"cifar10/test"``.
        images: ``(N, 3, H, W)`` uint8.
        labels: ``(N,)`` int64 class indices, or None.
        classes: class names indexed by label, or None.
        captions: per image a list of reference captions, or None.
        identity: provenance for reports (source path or generator, seed, content hash ...).
        meta: dataset-specific extras (the world's scene table, COCO image ids ...).
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor | None = None
    classes: list[str] | None = None
    captions: list[list[str]] | None = None
    identity: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be uint8 (N, 3, H, W), got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        n = len(self.images)
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"{self.name}: {len(self.labels)} labels for {n} images")
        if self.captions is not None and len(self.captions) != n:
            raise ValueError(f"{self.name}: {len(self.captions)} caption lists for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    def sha256(self) -> str:
        """Content hash of images, labels and captions: the dataset identity in reports."""
        h = hashlib.sha256(self.images.contiguous().numpy().tobytes())
        if self.labels is not None:
            h.update(self.labels.to(torch.int64).numpy().tobytes())
        if self.captions is not None:
            h.update("\n".join("\t".join(c) for c in self.captions).encode())
        return h.hexdigest()

    def summary(self) -> dict:
        """A report-ready description: name, counts, image size, hash and identity."""
        return {"name": self.name, "n_images": len(self),
                "n_captions": sum(map(len, self.captions)) if self.captions else 0,
                "image_size": list(self.images.shape[1:]),
                "n_classes": len(self.classes) if self.classes else None,
                "sha256": self.sha256(), **self.identity}


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` in [0, 255] -> float ``(B, 3, H, W)`` in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float ``(B, 3, H, W)`` in [-1, 1] -> uint8 in [0, 255] (clamped, rounded)."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
