"""Optimisation pieces of the training engine: the warmup + cosine learning-rate schedule (with
optional warm restarts), AdamW parameter groups (which parameters are weight-decayed), the EMA of
the weights, and the bf16 autocast switch. ``cfg`` is a :class:`mmsys.train.TrainConfig`."""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .train import TrainConfig

# ----------------------------------------------------------------------------- optimisation

def cycle_at(step: int, cfg: TrainConfig) -> tuple[int, int, float]:
    """The learning-rate cycle holding ``step``: ``(start, end, peak)``.

    Without ``cfg.restarts`` there is one cycle ``(0, steps, 1.0)``. Each warm restart
    ``(start, peak)`` (SGDR, Loshchilov & Hutter 2017, with a warmup per cycle) ends the cycle
    before it and opens a new one at ``start`` that peaks at ``peak * cfg.lr``.
    """
    starts = [(0, 1.0), *cfg.restarts]
    for i, (start, peak) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else cfg.steps
        if step < end or i + 1 == len(starts):
            return start, end, peak
    raise AssertionError("unreachable")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` used by optimizer step ``step`` (0-based).

    Within a cycle ``(start, end, peak)`` (see :func:`cycle_at`; one cycle ``(0, steps, 1)``
    unless ``cfg.restarts``), with ``s = step - start`` and ``w = warmup_steps``:
    warmup ``peak * (s + 1) / w`` for ``s < w``; then cosine from ``peak`` at ``s = w`` to
    ``r = min_lr_ratio`` at ``step = end``:
    ``r + (peak - r) * 0.5 * (1 + cos(pi * (s - w) / (end - start - w)))``.
    """
    start, end, peak = cycle_at(step, cfg)
    s = step - start
    if s < cfg.warmup_steps:
        return peak * (s + 1) / cfg.warmup_steps
    progress = min(1.0, (s - cfg.warmup_steps) / max(1, end - start - cfg.warmup_steps))
    r = cfg.min_lr_ratio
    return r + (peak - r) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): ``cfg.lr * lr_factor(step, cfg)``."""
    return cfg.lr * lr_factor(step, cfg)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups. Rule: a trainable parameter is decayed iff ``p.ndim >= 2`` (weight
    matrices and conv kernels) and it is not named by a ``no_weight_decay()`` method of the module
    that owns it (returning names relative to that module, e.g. ``{"pos_embed", "cls_token"}``).
    So biases, norm scales, scalar temperatures and 1-D embeddings are never decayed; ND
    positional/class embeddings are excluded by ``no_weight_decay``.
    """
    skip = set()
    for prefix, mod in model.named_modules():
        if hasattr(mod, "no_weight_decay"):
            skip |= {f"{prefix}.{n}" if prefix else n for n in mod.no_weight_decay()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and name not in skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``cfg.lr``, ``cfg.betas``, ``cfg.weight_decay``."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying :func:`lr_factor` (a closure, so its state_dict is plain data)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))


def global_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The L2 norm of all ``params``' gradients viewed as one vector (a 0-d tensor, no host
    sync): exactly what ``clip_grad_norm_`` computes, so clipping may reuse it."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if total is not None:
        return total(grads, 2.0)
    norms = [torch.linalg.vector_norm(g.detach(), 2.0) for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]), 2.0)


def clip_grads(params: list[nn.Parameter], max_norm: float, norm: torch.Tensor) -> torch.Tensor:
    """Scale ``params``' gradients to global norm at most ``max_norm``, bit for bit as
    ``clip_grad_norm_`` does, given their :func:`global_grad_norm` ``norm``; returns the norm."""
    with_norm = getattr(torch.nn.utils, "clip_grads_with_norm_", None)  # torch >= 2.6
    if with_norm is None:  # older torch: clip_grad_norm_ computes the norm itself again
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    with_norm(params, max_norm, norm)
    return norm


class EMA:
    """Exponential moving average of a model's state: ``e <- decay * e + (1 - decay) * p``.

    Floating-point parameters and buffers are averaged, integer buffers copied. ``module`` is a
    frozen deep copy usable for evaluation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.num_updates = decay, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = model.state_dict()
        for k, e in self.module.state_dict().items():
            if e.dtype.is_floating_point:
                e.mul_(self.decay).add_(src[k].to(e.dtype), alpha=1.0 - self.decay)
            else:
                e.copy_(src[k])
        self.num_updates += 1

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model``."""
        model.load_state_dict(self.module.state_dict())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.module.load_state_dict(state["module"])


def native_bf16(device_type: str) -> bool:
    """Whether bf16 autocast is worth it on ``device_type``: on CUDA when the GPU has bf16; on a
    CPU only with native bf16 instructions (AVX-512 BF16 or AMX, as oneDNN reports them).
    Elsewhere bf16 is emulated: a 3x3 convolution ran 17x slower than in float32 on an AVX2-only
    AMD EPYC (0.17 s -> 2.9 s, ``python -m benchmarks.bf16_conv``), and m5 trained ~20x slower."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


class Autocast:
    """bf16 autocast when ``requested`` and the device runs bf16 natively (:func:`native_bf16`),
    else a no-op; ``enabled`` says which. Use as ``with ctx:`` or ``with ctx():``."""

    def __init__(self, device_type: str, requested: bool):
        self.device_type, self.requested = device_type, requested
        self.enabled = requested and native_bf16(device_type)

    def __call__(self):
        return torch.autocast(self.device_type, dtype=torch.bfloat16) if self.enabled else nullcontext()

    def __enter__(self):
        self._ctx = self()
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
