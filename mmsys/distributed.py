"""Multi-process data parallelism for the training engine: join the torchrun process group
(gloo on CPU, nccl on CUDA) and ask which rank this is."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------- distributed

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1 in the environment):
    gloo on CPU, nccl on CUDA (``cuda`` becomes ``cuda:<LOCAL_RANK>``). Otherwise a no-op."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistInfo(device=device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, device)


def cleanup_distributed() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True unless this is a non-zero rank of an initialised process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ----------------------------------------------------------------------------- global-batch features

def world_size() -> int:
    """Processes in the initialised process group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when there is no process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (B, ...) concatenated in rank order -> (world_size * B, ...), with
    autograd: the backward pass sums, on each rank, the gradients all ranks' losses send to
    that rank's slice (the all-gather's adjoint, a reduce-scatter). Without a process group it
    is ``x``. Every rank must pass the same shape."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


class _GatherWithGrad(torch.autograd.Function):
    """all-gather forward; backward: the gradient of the gathered tensor summed over ranks
    (all-reduce; gloo has no reduce-scatter), this rank's slice kept."""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.n = rank(), len(x)
        return gather_no_grad(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """As :func:`gather_with_grad`, without autograd (keys, labels, metrics)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


# ----------------------------------------------------------------------------- sharded evaluation

def shard(n_items: int) -> slice:
    """This rank's contiguous share of ``n_items`` evaluation items (ceil(n / world) each, the
    last rank's shorter or empty); :func:`gather_shards` puts the pieces back together."""
    per = -(-n_items // world_size())
    return slice(min(rank() * per, n_items), min((rank() + 1) * per, n_items))


def gather_shards(x: torch.Tensor, n_items: int) -> torch.Tensor:
    """Every rank's :func:`shard` of a per-item result, ``x`` (this rank's items, ...), back in
    item order -> (n_items, ...) on every rank (padded to equal sizes for the all-gather)."""
    if world_size() == 1:
        return x
    per = -(-n_items // world_size())
    padded = torch.zeros((per, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:len(x)] = x
    return gather_no_grad(padded)[:n_items]
