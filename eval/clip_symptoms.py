"""Symptoms of CLIP's pitfalls: numbers a failing gate's report row cites.

The temperature (Radford et al. 2021, sec. 2.5): logits are ``s * cos`` with a learnable logit
scale ``s = 1 / T``, initialised at 1/0.07 and clamped at 100. It goes wrong three ways, each
visible in the learned ``s``: stuck at the clamp (initialised above it, or a loss that only
sharpens), stuck at its initial value (not a parameter the optimiser sees, or not used), or
near 1 (logits left as plain cosines in [-1, 1], so every softmax is almost uniform).

The loss: symmetric InfoNCE averages image->text and text->image cross-entropies, so swapping
the two modalities leaves it unchanged; a loss with only one direction changes. A loss that
does not apply the scale gives the same value for every scale. Both are probed here on a fixed
seeded example through the loss function the implementation trains with (cheap, no data).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

SPEC_MAX_LOGIT_SCALE = 100.0  # the spec's clamp on the logit scale (CLIP sec. 2.5)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (B, E), (B, E), 0-d -> 0-d


def logit_scale_symptoms(scale: float, init_scale: float, clamp: float = SPEC_MAX_LOGIT_SCALE) -> dict[str, float]:
    """The learned logit scale against its clamp and its initial value.

    Returns ``{"logit_scale": s, "logit_scale_over_clamp": s / clamp (1 = at the clamp),
    "logit_scale_log_change": |ln(s / init_scale)| (0 = never moved)}``; ``init_scale`` is the
    scale of a freshly built model of the same architecture."""
    return {"logit_scale": scale, "logit_scale_over_clamp": scale / clamp,
            "logit_scale_log_change": abs(math.log(scale / init_scale)) if scale > 0 and init_scale > 0 else float("nan")}


def _example(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, dim), texts (n, dim)) unit vectors, row i of each a noisy copy of one vector."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, dim, generator=g)
    return (F.normalize(base + torch.randn(n, dim, generator=g), dim=-1),
            F.normalize(base + torch.randn(n, dim, generator=g), dim=-1))


def loss_swap_asymmetry(loss_fn: LossFn, n: int = 16, dim: int = 32, scale: float = 10.0, seed: int = 0) -> float:
    """|L(images, texts) - L(texts, images)| / |L(images, texts)| on a fixed example: ~1e-7 for
    the symmetric loss, order 0.1 for one direction only (image->text or text->image)."""
    img, txt = _example(n, dim, seed)
    s = torch.tensor(scale)
    with torch.no_grad():
        a, b = float(loss_fn(img, txt, s)), float(loss_fn(txt, img, s))
    return abs(a - b) / max(abs(a), 1e-12)


def loss_scale_effect(loss_fn: LossFn, n: int = 16, dim: int = 32, seed: int = 0) -> float:
    """|L(scale 10) - L(scale 1)| / |L(scale 1)| on a fixed example: 0 when the loss ignores the
    logit scale (its temperature is effectively fixed)."""
    img, txt = _example(n, dim, seed)
    with torch.no_grad():
        one, ten = float(loss_fn(img, txt, torch.tensor(1.0))), float(loss_fn(img, txt, torch.tensor(10.0)))
    return abs(ten - one) / max(abs(one), 1e-12)
