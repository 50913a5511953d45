"""Symptoms of m4's pitfalls, measured on the trained eps model in every run (a few forwards).

Each function returns one number that a :class:`milestones.base.Pitfall` reads from
``RunResult.symptoms`` (the generic "loss flat after warm-up" is
:func:`eval.diagnostics.loss_drop_after_warmup` on the engine's ``loss_curve``):

- :func:`time_sensitivity`: how much the eps prediction changes when only t changes. A model
  whose time embedding carries nothing (t dropped, a constant embedding) gives 0.
- :func:`eps_cosine_at_T`: at the last timestep x_T is almost pure noise (a_bar_T ~ 4e-5), so
  an eps model must output ~x_T (cosine ~1 with the true noise); a model that regresses x_0
  (the wrong target, Ho et al. 2020 sec. 3.2 / eq. 14 predicts eps) outputs an image (~0).

``eps_fn(x_t (B, C, H, W) float, t (B,) long) -> (B, C, H, W)`` is the model's prediction (the
grader passes the implementation's, through the seam); ``q_sample(x0, t, noise) -> x_t``
is the forward process (eq. 4). Images are float ``(B, C, H, W)`` in [-1, 1].
"""

from __future__ import annotations

from typing import Callable

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _noised(x0: torch.Tensor, q_sample, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    tt = torch.full((len(x0),), t, dtype=torch.long)
    return q_sample(x0, tt, noise), tt, noise


@torch.no_grad()
def time_sensitivity(eps_fn: EpsFn, q_sample, x0: torch.Tensor, T: int, seed: int = 0) -> float:
    """||eps(x, t_lo) - eps(x, t_hi)|| / mean(||eps(x, t_lo)||, ||eps(x, t_hi)||) for the same
    inputs x = x_t at t = T/2, with t_lo = T/10 and t_hi = 9T/10 (mean over the batch).
    0 = the prediction ignores t; a working model changes its answer (~0.3 and more)."""
    x, _, _ = _noised(x0, q_sample, T // 2, seed)
    lo, hi = (torch.full((len(x0),), t, dtype=torch.long) for t in (T // 10, (9 * T) // 10))
    a, b = eps_fn(x, lo).float().flatten(1), eps_fn(x, hi).float().flatten(1)
    scale = 0.5 * (a.norm(dim=1) + b.norm(dim=1))
    return float(((a - b).norm(dim=1) / scale.clamp_min(1e-8)).mean())


@torch.no_grad()
def eps_cosine_at_T(eps_fn: EpsFn, q_sample, x0: torch.Tensor, T: int, seed: int = 0) -> float:
    """Mean cosine between the model's output at t = T - 1 and the true noise of x_t there.
    ~1 for an eps-prediction model; ~0 for one that predicts x_0 (or outputs zeros)."""
    x, tt, noise = _noised(x0, q_sample, T - 1, seed)
    out = eps_fn(x, tt).float().flatten(1)
    return float(torch.nn.functional.cosine_similarity(out, noise.flatten(1), dim=1, eps=1e-8).mean())
