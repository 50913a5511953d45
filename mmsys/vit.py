"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

Data flow: image (B, C, H, W) -> non-overlapping p x p patches, each flattened and linearly
projected (eq. 1, no convolutional stem) -> prepend a learnable CLS token -> add learnable
positional embeddings -> pre-LN transformer encoder -> LayerNorm'd CLS token -> linear head.

The same encoder gives the patch tokens that the CLIP image tower and the captioner attend to
(:meth:`ViT.tokens`), and attention weights for attention maps and rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import Transformer


@dataclass
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    dim: int = 128
    depth: int = 6
    n_heads: int = 4
    mlp_ratio: float = 2.0
    n_classes: int = 10
    dropout: float = 0.0

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*p*p) with N = (H/p)*(W/p) patches in row-major order
    (patch n covers rows (n // (W/p))*p ..., columns (n % (W/p))*p ...), each flattened as (C, p, p)."""
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} is not divisible into {p}x{p} patches")
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


class PatchEmbedding(nn.Module):
    """Flattened patches -> (B, N, D) through one linear map (ViT eq. 1's E)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.p = cfg.patch_size
        self.proj = nn.Linear(cfg.in_channels * cfg.patch_size ** 2, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(x, self.p))


class ViT(nn.Module):
    """Vision Transformer classifier. Input images ``(B, C, H, W)`` in [-1, 1]."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbedding(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.n_patches + 1, cfg.dim) * 0.02)
        self.encoder = Transformer(cfg.dim, cfg.depth, cfg.n_heads, cfg.mlp_ratio, dropout=cfg.dropout)
        self.head = nn.Linear(cfg.dim, cfg.n_classes) if cfg.n_classes else nn.Identity()
        self.apply(_init)

    def tokens(self, x: torch.Tensor, need_weights: bool = False):
        """All output tokens ``(B, 1 + N, D)`` (CLS first) and the per-layer self-attention
        weights ``[(B, H, 1 + N, 1 + N)] * depth`` (empty unless ``need_weights``)."""
        h = self.patch_embed(x)
        h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], dim=1) + self.positions(h.shape[1])
        out = self.encoder(h, need_weights=need_weights)
        return out.x, out.self_weights

    def positions(self, n_patches: int) -> torch.Tensor:
        """Positional embeddings ``(1, 1 + n_patches, D)``. For another image size than the
        config's, the patch grid of embeddings is resized bicubically (as in ViT sec. 3.2,
        "fine-tuning and higher resolution"); the CLS position is kept."""
        if n_patches == self.cfg.n_patches:
            return self.pos_embed
        g0, g = round(self.cfg.n_patches ** 0.5), round(n_patches ** 0.5)
        if g * g != n_patches:
            raise ValueError(f"{n_patches} patches do not form a square grid")
        grid = self.pos_embed[:, 1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g * g, -1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> class logits (B, n_classes)."""
        return self.head(self.tokens(x)[0][:, 0])

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer attention weights ``[(B, H, 1 + N, 1 + N)] * depth`` for visualisation."""
        return self.tokens(x, need_weights=True)[1]


def attention_rollout(weights: list[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): how much each patch flows into the CLS token.

    Per layer the head-averaged attention A is mixed with the identity for the residual path,
    ``A' = residual * I + (1 - residual) * A`` (rows sum to 1), and layers are multiplied in order.

    Args:
        weights: per layer ``(B, H, T, T)`` with token 0 = CLS.
    Returns:
        ``(B, T - 1)``: the CLS row of the rolled-out matrix over the patches, normalised to sum 1.
    """
    B, _, T, _ = weights[0].shape
    eye = torch.eye(T, device=weights[0].device)
    rollout = eye.expand(B, T, T)
    for w in weights:
        a = residual * eye + (1 - residual) * w.float().mean(dim=1)
        rollout = a @ rollout
    cls_to_patches = rollout[:, 0, 1:]
    return cls_to_patches / cls_to_patches.sum(dim=-1, keepdim=True)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
