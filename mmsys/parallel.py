"""Data parallelism on torch's own engine: a model wrapped in DistributedDataParallel or sharded
with FSDP2 ``fully_shard``, for the training engine (:mod:`mmsys.train`).

Both wrappers act in the wrapped module's ``forward``: DDP prepares the gradient all-reduce
there (a backward pass after a forward that bypassed it is not averaged), and FSDP2 gathers a
sharded module's parameters in its forward hooks. A milestone's loss calls sub-modules of its
model (``model.encode_image``, ``model.text``, a UNet inside a diffusion loss), not
``model.forward``; so what gets wrapped is a :class:`Replica`, whose forward runs the loss
function on the model, and every forward pass of a training step goes through the wrapper::

    wrapped = wrap(model, "ddp", device)
    loss, metrics = wrapped(loss_fn, batch)   # = loss_fn(model, batch), through DDP
    loss.backward()                           # gradients averaged over ranks (buckets, overlapped)

Gradient accumulation uses :func:`no_sync` on every micro-batch but the last (DDP's
``no_sync``, FSDP2's ``set_requires_gradient_sync``), so ranks exchange gradients once per step.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .transformer import Block

# ----------------------------------------------------------------------------- the wrapped module


class Replica(nn.Module):
    """What the data-parallel wrapper wraps: ``forward(fn, *args) = fn(model, *args)``.

    ``model`` is registered as the sub-module ``model``, so the replica's parameters are the
    model's, named ``model.<name>``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


# ----------------------------------------------------------------------------- wrapping


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards as separate units (each gathered only while it runs): every
    transformer :class:`~mmsys.transformer.Block`, ViT, CLIP, captioner and audio towers alike.
    Parameters outside them (embeddings, heads, a UNet) belong to the root unit."""
    return [m for m in model.modules() if isinstance(m, Block)]


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """Wrap ``model`` (already on ``device``, in an initialised process group) for training.

    ``"ddp"``: ``DistributedDataParallel(Replica(model))``; parameters are broadcast from rank
    0 at construction; parameters a step leaves unused are found and skipped
    (``find_unused_parameters``: a CLIP temperature or a conditioning branch may sit out a
    step). Buffers are not re-broadcast at each forward; the engine broadcasts them after each
    optimizer step. ``"fsdp"``: ``fully_shard`` on each of :func:`shard_units` and on the
    replica (the root unit), in place; the parameters become DTensor shards."""
    replica = Replica(model)
    if mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(replica, device_ids=ids, find_unused_parameters=True,
                                       broadcast_buffers=False)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6

        for unit in shard_units(model):
            fully_shard(unit)
        fully_shard(replica)
        return replica
    raise ValueError(f"unknown parallel mode {mode!r}: choose ddp or fsdp")


@contextmanager
def no_sync(wrapped: nn.Module, skip: bool) -> Iterator[None]:
    """While ``skip``: backward passes accumulate gradients locally, not exchanged between
    ranks (all micro-batches but the last of a step). A no-op for an unwrapped module."""
    if not skip:
        yield
    elif isinstance(wrapped, DistributedDataParallel):
        with wrapped.no_sync():
            yield
    elif is_sharded(wrapped):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


# ----------------------------------------------------------------------------- sharded state


def is_sharded(wrapped: nn.Module | None) -> bool:
    """True for an FSDP2-sharded replica (its state must be gathered to be saved)."""
    return wrapped is not None and hasattr(wrapped, "set_requires_gradient_sync")


def full_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """A sharded run's full model and optimizer state dicts, gathered to the CPU (a collective:
    every rank calls it; every rank gets the whole state). Keys are the model's own (no
    ``model.`` prefix), so the checkpoint loads into an unwrapped model."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)  # (cpu_offload keeps it on rank 0 only)
    inner = wrapped.model
    optim = get_optimizer_state_dict(inner, optimizer, options=opts)
    # torch's full optimizer state is keyed by parameter name; a plain run's by position in the
    # parameter groups: store the positional form, so either kind of run resumes the other
    order = [name for group in optim["param_groups"] for name in group["params"]]
    pos = {name: i for i, name in enumerate(order)}
    optim = {"state": {pos[n]: v for n, v in optim["state"].items()},
             "param_groups": [{**g, "params": [pos[n] for n in g["params"]]} for g in optim["param_groups"]]}
    return get_model_state_dict(inner, options=opts), optim


def load_full_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """Load full (unsharded) state dicts into a sharded run, each rank keeping its shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    inner = wrapped.model
    name_of = {id(p): n for n, p in inner.named_parameters()}
    order = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    named = {"state": {order[int(i)]: v for i, v in optimizer_state["state"].items()},
             "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]}
                              for g in optimizer_state["param_groups"]]}
    set_model_state_dict(inner, model_state, options=opts)
    set_optimizer_state_dict(inner, optimizer, named, options=opts)


def unsharded_copy(skeleton: nn.Module, model_state: dict) -> nn.Module:
    """A plain module holding a sharded run's whole weights, for evaluation outside the
    wrapper: ``skeleton`` (a copy of the model taken before sharding) with ``model_state``."""
    plain = copy.deepcopy(skeleton)
    plain.load_state_dict(model_state)
    return plain
