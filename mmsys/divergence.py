"""Non-finite training: the training engine's check that a step's loss and gradients are finite,
and :class:`TrainingDiverged`, which names the step, what was non-finite and the likely cause.

The check runs on every step, after backward (and the DDP all-reduce) and before the optimizer
step, on two 0-d tensors the step computes anyway: the loss and the global gradient norm (the one
clipping uses). It costs one host sync per step. On failure the weights are left as the last
finite step made them and training stops before any save, so the last checkpoint on disk stays
the last finite one. The diagnosis (which parameter, which cause) runs only then.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from .train import TrainConfig


class TrainingDiverged(FloatingPointError):
    """Training produced a non-finite loss, gradient or weight and was stopped before the
    optimizer step and before any checkpoint save.

    Attributes: ``step`` (1-based number of the optimizer step that failed: the ``step``
    ``metrics.jsonl`` would have logged for it), ``what`` (e.g. ``"the loss (nan)"``, ``"the
    gradient of net.0.weight (optimizer group 0)"``, ``"the global gradient norm (inf)"``) and
    ``likely_cause`` (with what to do)."""

    def __init__(self, step: int, what: str, likely_cause: str, note: str = ""):
        self.step, self.what, self.likely_cause, self.note = step, what, likely_cause, note
        super().__init__(f"training diverged at step {step}: {what} is not finite; likely cause: "
                         f"{likely_cause}{'; ' + note if note else ''}")

    def __reduce__(self):  # picklable (multiprocessing) despite the several constructor args
        return type(self), (self.step, self.what, self.likely_cause, self.note)


def step_is_finite(loss: Any, grad_norm: torch.Tensor, world_size: int = 1) -> bool:
    """Whether a step's (mean) loss and global gradient norm are both finite: one host sync;
    under DDP every rank gets the same answer (one small all-reduce).

    Their float64 sum is finite exactly when both are (float32 values cannot overflow it), so
    one add and one ``.item()`` decide."""
    norm = grad_norm.detach().double()
    total = norm + (loss.detach().double().to(norm.device) if isinstance(loss, torch.Tensor) else float(loss))
    if world_size > 1:
        dist.all_reduce(total)  # a non-finite value on any rank makes the sum non-finite
    return math.isfinite(total.item())


def _first_nonfinite(named: list[tuple[str, torch.Tensor]]) -> str | None:
    for name, t in named:
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        return [t for b in batch for t in _tensors(b)]
    return []


def kept_note(ckpt_path: Path | None) -> str:
    """What a stopped run left on disk: the checkpoint it had saved before, if any."""
    if ckpt_path is not None and Path(ckpt_path).exists():
        return f"stopped before saving: {ckpt_path}, the last finite checkpoint, is kept"
    return "stopped before saving: no checkpoint was written"


def diagnose(step: int, loss: Any, grad_norm: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
             batch: Any, cfg: TrainConfig, ckpt_path: Path | None = None) -> TrainingDiverged:
    """The :class:`TrainingDiverged` for (1-based) step ``step`` of a run with recipe ``cfg``,
    whose loss or gradients are not finite; ``ckpt_path``: the run's checkpoint (the message
    says whether one is kept)."""
    lr, updates = optimizer.param_groups[0]["lr"], step - 1
    advice = "lower it or lengthen the warmup" + ("" if cfg.grad_clip is not None else " or clip gradients (grad_clip)")
    loss_value = float(loss.detach().float().item() if isinstance(loss, torch.Tensor) else loss)
    if not math.isfinite(loss_value):
        what = f"the loss ({loss_value})"
    else:
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        bad = next(((n, p) for n, p in model.named_parameters()
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all())), None)
        norm = float(grad_norm)
        what = (f"the gradient of {bad[0]} (optimizer parameter group {group_of.get(id(bad[1]), '-')})" if bad
                else f"the global gradient norm ({norm})" if not math.isfinite(norm)
                else "the loss on another rank (DDP)")
    bad_input = _first_nonfinite([(f"item {i}", t) for i, t in enumerate(_tensors(batch))])
    bad_weight = _first_nonfinite(list(model.named_parameters()))
    if bad_input is not None:
        cause = (f"a bad input batch ({bad_input} of the batch holds non-finite values): check the "
                 f"data and get_batch")
    elif bad_weight is not None:
        cause = f"the previous update made {bad_weight} non-finite: a learning rate too high (lr {lr:.3g}): {advice}"
    elif updates == 0 and not math.isfinite(loss_value):
        cause = ("the model's initialisation or the loss function (non-finite before any update): "
                 "check loss_fn on one batch")
    elif cfg.bf16:
        cause = f"bf16 overflow (train with bf16 off) or a learning rate too high (lr {lr:.3g})"
    else:
        cause = f"a learning rate too high (lr {lr:.3g} at this step): {advice}"
    return TrainingDiverged(step, what, cause, kept_note(ckpt_path))


def check_weights(step: int, model: nn.Module, ckpt_path: Path | None = None) -> None:
    """Raise :class:`TrainingDiverged` if a weight is non-finite (checked before every save)."""
    bad = _first_nonfinite(list(model.named_parameters()))
    if bad is not None:
        raise TrainingDiverged(step, f"the weight {bad} after the update",
                               "a learning rate too high for this step's update: lower it or "
                               "lengthen the warmup", kept_note(ckpt_path))
