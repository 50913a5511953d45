"""Symptoms of the spec's pitfalls: numbers a failing gate's report row cites.

Each function turns something a run produced (a loss curve, attention weights) into one number
that :class:`milestones.base.Pitfall` reads from ``RunResult.symptoms``. Milestone-specific
symptoms (a temperature at its clamp, conditional and unconditional predictions equal, a
decoder that sees future tokens) are measured in the milestone files with these conventions.
"""

from __future__ import annotations

import math

import torch


def loss_drop_after_warmup(curve: list, warmup_steps: int) -> float:
    """How much the loss fell after warm-up: 1 - (mean of the last quarter of the logged points)
    / (first logged point after ``warmup_steps``). ~0 (or negative) = flat: the model is not
    learning (learning rate 0, a detached graph, a loss that ignores its input).

    curve: ``[(step, loss), ...]`` as the engine's summary ``loss_curve``. NaN with < 4 points."""
    points = [(s, v) for s, v in curve if math.isfinite(v)]
    after = [v for s, v in points if s > warmup_steps]
    if len(after) < 4 or after[0] <= 0:
        return float("nan")
    tail = after[-max(1, len(after) // 4):]
    return 1.0 - (sum(tail) / len(tail)) / after[0]


def attention_entropy(weights: torch.Tensor) -> float:
    """Mean entropy of attention rows over the keys, divided by log(number of keys): 1.0 = every
    query attends uniformly (queries and keys carry no information), 0 = one key each.

    weights: (..., Q, K) rows that sum to 1."""
    w = weights.float().clamp_min(1e-12)
    k = w.shape[-1]
    if k < 2:
        return float("nan")
    return float((-(w * w.log()).sum(-1)).mean() / math.log(k))
