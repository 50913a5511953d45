"""A metric embedding of small grey images (MNIST): a CNN to a 64-d unit vector, trained with a
pair loss on labels or with NT-Xent on two views (:mod:`mmsys.ssl`).

The pair loss pushes the cosine similarity of two images' embeddings to 1 when they show the
same digit and to 0 when they do not (a squared error over every pair of the batch), so each
digit gets its own direction, orthogonal to the others'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EmbedConfig:
    in_channels: int = 3  # MNIST's grey replicated to RGB by the loader
    width: int = 32  # channels of the first convolution (doubled twice)
    dim: int = 64  # embedding width


class SmallCNN(nn.Module):
    """(B, C, H, W) in [-1, 1] -> (B, dim) unit vectors: three 3x3 conv blocks (the first two
    followed by 2x2 max-pooling), global average pooling, a linear map, L2 normalisation."""

    def __init__(self, cfg: EmbedConfig = EmbedConfig()):
        super().__init__()
        w = cfg.width

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.net = nn.Sequential(block(cfg.in_channels, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2),
                                 block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


def pair_loss(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean over the B(B - 1) ordered pairs i != j of (cos(z_i, z_j) - [y_i = y_j])^2.

    Args:
        z: ``(B, D)`` embeddings (normalised here); labels: ``(B,)``.
    Returns:
        (0-d loss, {"same_cos": mean cosine of same-digit pairs, "diff_cos": of the others}).
    """
    z = F.normalize(z.float(), dim=-1)
    sim = z @ z.t()
    same = labels[:, None] == labels[None, :]
    off = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    loss = ((sim - same.float()) ** 2)[off].mean()
    s, d = same & off, ~same
    return loss, {"same_cos": sim[s].mean() if s.any() else sim.new_zeros(()),
                  "diff_cos": sim[d].mean() if d.any() else sim.new_zeros(())}
