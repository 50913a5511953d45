"""Symptoms of m1's pitfalls: numbers the report cites beside a failing accuracy gate.

- :func:`cls_attention_entropy`: how uniform the CLS token's attention is in the last block
  (1.0 = uniform over every token: queries and keys carry nothing, e.g. zeroed projections);
- :func:`patch_shuffle_change`: how much the logits move when the patches of an image are put
  in another order (0 = positions ignored: without positional embeddings a ViT's CLS output is
  invariant to permuting its patch tokens, Dosovitskiy et al. 2021, sec. 3.1);
- :func:`relative_change`: how far a tensor moved from its initial value (positional
  embeddings left at their initialisation: frozen, or not a trained parameter).

The loss-curve symptom is :func:`eval.diagnostics.loss_drop_after_warmup`.
"""

from __future__ import annotations

from typing import Callable

import torch

from eval.diagnostics import attention_entropy


def cls_attention_entropy(weights: torch.Tensor) -> float:
    """Normalised entropy of the CLS row (query 0) of one block's attention.

    weights: ``(B, heads, T, T)`` rows summing to 1, token 0 = CLS. Returns a float in [0, 1]."""
    return attention_entropy(weights[:, :, 0, :])


def shuffle_patches(images: torch.Tensor, patch: int, perm: torch.Tensor) -> torch.Tensor:
    """images ``(B, C, H, W)`` -> the same with their ``patch`` x ``patch`` tiles moved: tile
    ``perm[n]`` (row-major over the tile grid) lands at position ``n``. Content of every tile kept."""
    B, C, H, W = images.shape
    gh, gw = H // patch, W // patch
    tiles = images.reshape(B, C, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C, patch, patch)
    tiles = tiles[:, perm]
    return tiles.reshape(B, gh, gw, C, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


@torch.no_grad()
def patch_shuffle_change(logits_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, patch: int,
                         seed: int = 0) -> float:
    """||l(shuffled) - l(x)|| / ||l(x)||, logits centred per image (so a constant offset does not
    count), for one seeded permutation of the patch grid applied to every image.

    logits_fn: float images ``(B, C, H, W)`` -> logits ``(B, K)``; images: float ``(B, C, H, W)``.
    ~1e-6 (float rounding) when the model ignores where a patch is; an honest ViT moves its logits."""
    n = (images.shape[-2] // patch) * (images.shape[-1] // patch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    base = logits_fn(images).float()
    moved = logits_fn(shuffle_patches(images, patch, perm)).float()
    base, moved = base - base.mean(-1, keepdim=True), moved - moved.mean(-1, keepdim=True)
    return float((moved - base).norm() / base.norm().clamp_min(1e-12))


def relative_change(now: torch.Tensor, init: torch.Tensor) -> float:
    """||now - init|| / ||init|| (0 = never moved from its initial value)."""
    now, init = now.detach().float().cpu(), init.detach().float().cpu()
    return float((now - init).norm() / init.norm().clamp_min(1e-12))
