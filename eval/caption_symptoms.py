"""Symptoms of the captioner's pitfalls (m3): numbers a failing BLEU-4 / CIDEr gate row cites.

Both probes take the decoder only as a function ``logits_fn(images, ids) -> (B, L, V)`` (the
teacher-forced next-token logits, reached through the seam by the milestone), so this module
never imports the code under test.

- :func:`future_token_leak`: a causal decoder's logits at position t depend on tokens 0..t only
  (the autoregressive factorisation p(y_t | y_<t, image), Vaswani et al. 2017 sec. 3.2.3). Change
  every token after t and the logits up to t must not move; a decoder without its causal mask
  learns to copy the token it is shown and cannot generate.
- :func:`image_sensitivity`: the next-token distributions must change when the image does; a
  decoder whose cross-attention is cut (or ignored) gives every image the same caption.
"""

from __future__ import annotations

from typing import Callable

import torch

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def future_token_leak(logits_fn: LogitsFn, images: torch.Tensor, ids: torch.Tensor, vocab_size: int,
                      low: int = 0, seed: int = 0) -> float:
    """How much earlier positions' logits move when later tokens change: for each cut t, every
    token after t is redrawn at random (ids in [low, vocab_size)); returns the largest
    |logits[:, :t+1] change| over all cuts, divided by the mean |logit| of the unchanged pass.
    ~0 (float rounding, < 1e-4) for a causal decoder; of order 0.1-1 when it sees the future.

    images (B, 3, S, S) in [-1, 1]; ids (B, L) long, L >= 2 (e.g. reference captions; padding is
    treated as tokens, so a key-padding mask cannot hide a leak)."""
    g = torch.Generator().manual_seed(seed)
    base = logits_fn(images, ids).float()
    scale = base.abs().mean().clamp_min(1e-12)
    worst = 0.0
    for t in range(ids.shape[1] - 1):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(low, vocab_size, changed[:, t + 1:].shape, generator=g).to(ids.device)
        out = logits_fn(images, changed).float()
        worst = max(worst, float((out[:, :t + 1] - base[:, :t + 1]).abs().max()))
    return worst / float(scale)


@torch.no_grad()
def image_sensitivity(logits_fn: LogitsFn, images: torch.Tensor, ids: torch.Tensor,
                      pad_mask: torch.Tensor) -> float:
    """Mean total-variation distance between the next-token distributions given each image and
    given another image (the batch rolled by one), over real (non-pad) positions of the same
    captions: 0 = the decoder ignores the image; a trained captioner is far from 0.

    images (B, 3, S, S), B >= 2; ids (B, L) long; pad_mask (B, L) True = padding."""
    own = logits_fn(images, ids).float().softmax(-1)
    other = logits_fn(images.roll(1, dims=0), ids).float().softmax(-1)
    tv = 0.5 * (own - other).abs().sum(-1)  # (B, L)
    real = ~pad_mask.to(tv.device)
    return float(tv[real].mean())
