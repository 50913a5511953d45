"""Seeded determinism for the training engine: seeds, RNG states and batch indexing.

Everything random in training step ``s`` is a pure function of ``(seed, s, rank)``: the
global batch is :func:`batch_indices` (a fresh permutation per epoch, seeded by the epoch),
and :func:`mix_seed` derives unrelated seeds for the per-step generators. :func:`split_batch`
cuts a batch into micro-batches for gradient accumulation.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Any

import numpy as np
import torch

# ----------------------------------------------------------------------------- seeding

_M64 = (1 << 64) - 1


def mix_seed(*xs: int) -> int:
    """Hash integers to a 63-bit seed (splitmix64 chain); distinct tuples give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        z = ((h ^ (int(x) & _M64)) + 0x9E3779B97F4A7C15) & _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        h = z ^ (z >> 31)
    return h >> 1


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    np_state = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(),
            "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                      "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                      "cached_gaussian": float(np_state[4])}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


# ----------------------------------------------------------------------------- data indexing

@lru_cache(maxsize=4)
def _epoch_perm(n_items: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(mix_seed(seed, 0, epoch)))


def batch_indices(step: int, n_items: int, batch_size: int, seed: int) -> torch.Tensor:
    """Dataset indices of the global batch of ``step``: ``(batch_size,)`` int64.

    Item ``k`` of the stream is ``perm_e[k % n]`` with epoch ``e = k // n`` and ``perm_e =
    randperm(n)`` seeded by ``(seed, e)``; step ``s`` takes stream items ``[s*B, (s+1)*B)``. A
    batch may straddle two epochs. Each epoch visits every item exactly once.
    """
    pos = step * batch_size + torch.arange(batch_size)
    epochs, within = pos // n_items, pos % n_items
    out = torch.empty(batch_size, dtype=torch.long)
    for e in torch.unique(epochs).tolist():
        m = epochs == e
        out[m] = _epoch_perm(n_items, seed, e)[within[m]]
    return out


def rank_slice(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous chunk of a global batch (``len(indices) % world_size == 0``)."""
    per = len(indices) // world_size
    return indices[rank * per:(rank + 1) * per]


def batch_len(x: Any) -> int | None:
    """Leading size of the first tensor (or per-item list) found in a batch, else None."""
    if isinstance(x, torch.Tensor):
        return x.shape[0] if x.ndim else None
    if isinstance(x, dict) or _is_container(x):
        for e in (x.values() if isinstance(x, dict) else x):
            if (n := batch_len(e)) is not None:
                return n
        return None
    return len(x) if isinstance(x, (list, tuple)) else None


def _is_container(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and any(isinstance(e, (torch.Tensor, dict, list, tuple)) for e in x)


def _slice(x: Any, a: int, b: int, n: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x[a:b] if x.ndim and x.shape[0] == n else x
    if isinstance(x, dict):
        return {k: _slice(v, a, b, n) for k, v in x.items()}
    if _is_container(x):
        items = [_slice(e, a, b, n) for e in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    if isinstance(x, (list, tuple)) and len(x) == n:
        return x[a:b]
    return x


def split_batch(batch: Any, n_micro: int) -> list:
    """Split a batch into ``n_micro`` micro-batches along dim 0 (sizes differ by at most one).

    Tensors with leading size B are sliced; dicts, and tuples/lists holding tensors, are
    containers split element-wise; other lists of length B (e.g. caption strings) are sliced;
    anything else is passed unchanged to every micro-batch.
    """
    n = batch_len(batch)
    if n is None:
        raise ValueError("cannot find the batch dimension: return a tensor or a tuple/dict of tensors")
    if n_micro > n:
        raise ValueError(f"cannot split {n} items into {n_micro} micro-batches")
    sizes = [n // n_micro + (i < n % n_micro) for i in range(n_micro)]
    bounds = np.cumsum([0] + sizes).tolist()
    return [_slice(batch, bounds[i], bounds[i + 1], n) for i in range(n_micro)]


def to_device(x: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x
    if isinstance(x, dict):
        return {k: to_device(v, device, channels_last) for k, v in x.items()}
    if _is_container(x):
        items = [to_device(e, device, channels_last) for e in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    return x
