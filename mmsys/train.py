"""One training engine for every milestone: AdamW, warmup + cosine, bf16 autocast, gradient
accumulation, clipping, EMA, progress bar, JSONL metrics, atomic checkpoints, exact resume, and
data parallelism on torch's own engine (DistributedDataParallel, or FSDP2 ``fully_shard``).

Determinism is a property of the engine. Everything random in step ``s`` is a pure function of
``(cfg.seed, s, rank)``:

- the global batch: :func:`batch_indices` (a fresh permutation per epoch, seeded by the epoch);
- the ``torch.Generator`` handed to ``get_batch`` (augmentation);
- the global torch RNG, reseeded at the start of every step (dropout, diffusion noise and
  timesteps drawn inside ``loss_fn``).

So a run killed after a checkpoint and resumed ends with bit-identical weights (on CPU), and
ranks read disjoint contiguous slices of the same global batch (each rank's shard of the
split: a distributed sampler over :func:`batch_indices`, deterministic per seed and world
size). The global batch does not depend on the world size, so a checkpoint resumes on any
number of processes.

Usage::

    trainer = Trainer(model, TrainConfig(steps=600, batch_size=128, lr=1e-3, warmup_steps=50),
                      loss_fn=loss_fn, data_size=len(train),
                      get_batch=lambda idx, g: (augment(images[idx], g), labels[idx]),
                      kind="vit", model_config=asdict(vit_cfg))
    summary = trainer.fit()
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .batching import batch_len, get_rng_state, mix_seed, set_rng_state, to_device
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, sha256_file
from .distributed import init_distributed
from .divergence import TrainingDiverged, check_weights, diagnose, kept_note, step_is_finite
from .parallel import full_state, is_sharded, load_full_state, no_sync, unsharded_copy, wrap
from .optim import EMA, Autocast, build_optimizer, build_scheduler, clip_grads, global_grad_norm, lr_factor
from .tempfiles import remove_stale_temps

# re-exported: the engine's public API lives in these smaller modules (TrainingDiverged too)
from .batching import batch_indices, rank_slice, seed_everything, split_batch  # noqa: E402,F401
from .distributed import DistInfo, cleanup_distributed, is_main_process  # noqa: E402,F401
from .optim import lr_at, lr_factor, param_groups  # noqa: E402,F401


PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Training recipe. ``batch_size`` is global: items per optimizer step over all ranks and
    micro-batches. ``max_seconds`` stops early (time budget, measured from ``fit()`` start)."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays lr to lr * min_lr_ratio at the end of each cycle
    # warm restarts ((start_step, peak_ratio), ...): a new warmup + cosine cycle from each start,
    # peaking at lr * peak_ratio (mmsys.optim.cycle_at); () = one cycle over all the steps
    restarts: tuple[tuple[int, float], ...] = ()
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping
    bf16: bool = False  # torch.autocast(device_type, dtype=torch.bfloat16)
    ema_decay: float | None = None
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 0  # 0 = checkpoint only at the end
    out_dir: str | None = None  # None = no checkpoints, no metrics log
    device: str = "cpu"
    progress: bool = True
    channels_last: bool = False
    max_seconds: float | None = None
    # under torchrun: "ddp" (DistributedDataParallel, every rank holds the whole model) or "fsdp"
    # (FSDP2 fully_shard: parameters, gradients and optimizer state sharded over ranks, for a
    # model that does not fit one device); ignored in a single process
    parallel: str = "ddp"

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.restarts = tuple((int(s), float(p)) for s, p in self.restarts)
        starts = [s for s, _ in self.restarts]
        if self.parallel not in PARALLEL:
            raise ValueError(f"TrainConfig.parallel={self.parallel!r}: choose one of {', '.join(PARALLEL)}")
        if self.steps < 0 or self.batch_size < 1 or self.grad_accum < 1 or self.log_every < 1:
            raise ValueError(f"invalid TrainConfig: {self}")
        if starts != sorted(set(starts)) or any(not 0 < s < self.steps for s in starts) \
                or any(p <= 0 for _, p in self.restarts):
            raise ValueError(f"TrainConfig.restarts {self.restarts}: give increasing start steps inside "
                             f"(0, steps={self.steps}) and positive peak ratios")


def _plain(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


# ----------------------------------------------------------------------------- the engine

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict]"]
StepFn = Callable[[nn.Module, Any, int, Autocast], dict]


class Trainer:
    """Train ``model`` for ``cfg.steps`` optimizer steps on an in-memory dataset.

    Args:
        model: the model (moved to ``cfg.device``).
        cfg: the recipe.
        loss_fn: ``loss_fn(model, batch) -> (loss, metrics)``: a scalar mean loss over the
            (micro-)batch and a dict of floats/0-d tensors.
        data_size: number of items in the training set.
        get_batch: ``get_batch(indices (b,) int64, generator) -> batch`` (a tensor, or a
            tuple/dict of tensors with leading dim b); the generator is seeded by
            ``(seed, step, rank)`` for reproducible augmentation.
        kind: checkpoint kind (``"vit"``, ``"clip"`` ...); resume checks it.
        model_config: plain dict to rebuild the model; stored in checkpoints, checked on resume.
        extra: plain dict stored in checkpoints (e.g. tokenizer state).
        step_fn: optional ``step_fn(model, batch, n_micro, autocast_ctx) -> metrics`` replacing
            the default forward/backward for one step. It must leave in ``.grad`` the gradient of
            the mean loss over its (per-rank) batch and return metrics including ``"loss"``;
            the engine then all-reduces (DDP), clips, steps the optimizer, scheduler and EMA.
            ``autocast_ctx`` works as ``with autocast_ctx:`` or ``with autocast_ctx():``.
        resume_from: a checkpoint to restore before training (see :meth:`resume`), or
            ``"auto"``: ``out_dir/checkpoint.pt`` if it exists, else start fresh.

    Distributed: under torchrun the process group is joined and each rank reads its contiguous
    slice of the global batch. With ``cfg.parallel == "ddp"`` the model is wrapped in
    DistributedDataParallel (parameters broadcast from rank 0) and ``loss_fn`` runs as the
    wrapper's forward (:class:`mmsys.parallel.Replica`), so gradients are averaged in buckets
    during backward, once per step (``no_sync`` on the other micro-batches). A ``step_fn``
    (GradCache: several backward passes per step, some outside any forward) runs on the
    unwrapped model and its gradients are averaged by one flat all-reduce after it. With
    ``"fsdp"`` the model is sharded with FSDP2 ``fully_shard`` (no EMA, no ``step_fn``);
    checkpoints hold the gathered full state, so any run resumes on any number of processes.
    Only rank 0 logs and writes.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, loss_fn: LossFn | None = None,
                 data_size: int = 0, get_batch: Callable[[torch.Tensor, torch.Generator], Any] | None = None,
                 kind: str = "model", model_config: dict | None = None, extra: dict | None = None,
                 step_fn: StepFn | None = None, resume_from: str | os.PathLike | None = None):
        if loss_fn is None and step_fn is None:
            raise ValueError("give loss_fn or step_fn")
        if data_size < 1 or get_batch is None:
            raise ValueError("give data_size >= 1 and get_batch")
        self.cfg, self.loss_fn, self.step_fn, self.get_batch = cfg, loss_fn, step_fn, get_batch
        self.data_size, self.kind = data_size, kind
        self.model_config, self.extra = dict(model_config or {}), dict(extra or {})
        self.dist = init_distributed(cfg.device)
        w = self.dist.world_size
        if cfg.batch_size % w or cfg.batch_size // w < cfg.grad_accum:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by world_size={w} "
                             f"and give each rank at least grad_accum={cfg.grad_accum} items")
        self.device = torch.device(self.dist.device)
        self.model = model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.wrapped, self._skeleton, self._plain = None, None, None  # the DDP/FSDP module; see eval_model
        if w > 1:
            if cfg.parallel == "fsdp":
                if cfg.ema_decay or step_fn is not None:
                    raise ValueError("parallel='fsdp' runs every forward pass of a step in one loss_fn and keeps "
                                     "no EMA copy: give loss_fn and ema_decay=None, or use parallel='ddp'")
                with torch.no_grad():  # fully_shard keeps each rank's own values: start from rank 0's
                    for t in self.model.state_dict().values():
                        dist.broadcast(t, 0)
                self._skeleton = copy.deepcopy(self.model)
            self.wrapped = wrap(self.model, cfg.parallel, self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.autocast = Autocast(self.device.type, cfg.bf16)
        self.step = 0
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else None
        self.ckpt_path = self.out_dir / "checkpoint.pt" if self.out_dir else None
        if self.ckpt_path is not None and is_main_process():
            remove_stale_temps(self.ckpt_path)  # left by a save that was killed (mmsys.tempfiles)
        self._last_lr = lr_at(0, cfg)
        # training time spent before this process (restored on resume) and the clock of fit()
        self.time_before = {"wall_s": 0.0, "cpu_s": 0.0, "segments": 0}
        self.resumed_from = None  # {path, sha256, step} of the checkpoint this run continued
        self._clock = None
        if resume_from == "auto":
            resume_from = self.ckpt_path if self.ckpt_path and self.ckpt_path.exists() else None
        if resume_from is not None:
            self.resume(resume_from)

    # -- checkpoints

    def state_dict(self) -> dict:
        """The checkpoint payload (see :mod:`mmsys.checkpoint`). Under FSDP a collective (every
        rank calls it): the full state is gathered from the shards."""
        if is_sharded(self.wrapped):
            model_state, optim_state = full_state(self.wrapped, self.optimizer)
        else:
            model_state, optim_state = self.model.state_dict(), self.optimizer.state_dict()
        return {"kind": self.kind, "step": self.step, "model": model_state,
                "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "rng": get_rng_state(),
                "config": asdict(self.cfg), "model_config": self.model_config, "extra": self.extra,
                "time": self.time_total()}

    def time_total(self) -> dict:
        """Training wall/CPU seconds over every segment of this run (resumed ones included)."""
        wall, cpu = (0.0, 0.0) if self._clock is None else (time.perf_counter() - self._clock[0],
                                                              time.process_time() - self._clock[1])
        return {"wall_s": self.time_before["wall_s"] + wall, "cpu_s": self.time_before["cpu_s"] + cpu,
                "segments": self.time_before["segments"] + (self._clock is not None)}

    def save(self, path: str | os.PathLike | None = None) -> Path | None:
        """Atomically write a checkpoint (rank 0 only) to ``path`` or ``out_dir/checkpoint.pt``.
        Under FSDP every rank must call it (the state is gathered)."""
        path = Path(path) if path else self.ckpt_path
        if path is None or not (is_main_process() or is_sharded(self.wrapped)):
            return None
        state = self.state_dict()
        if not is_main_process():
            return None
        save_checkpoint(path, state)
        return path

    def resume(self, path: str | os.PathLike) -> None:
        """Restore model, optimizer, scheduler, EMA, RNG states and step from a checkpoint.

        Raises CheckpointError if the file is unusable, of another kind, built with a
        different ``model_config``, or lacks EMA state while ``cfg.ema_decay`` is set.
        """
        ck = load_checkpoint(path, expect_kind=self.kind,
                             required=("step", "optimizer", "scheduler", "rng", "model_config"))
        if _plain(ck["model_config"]) != _plain(self.model_config):
            raise CheckpointError(f"checkpoint {path} was trained with model_config "
                                  f"{ck['model_config']}, this run has {self.model_config}: "
                                  f"use the same model config or start a new out_dir")
        self._check_schedule_prefix(path, ck)
        if self.ema is not None and not ck.get("ema"):
            raise CheckpointError(f"checkpoint {path} has no EMA state but ema_decay is set: "
                                  f"resume with the same ema_decay or start a new out_dir")
        if is_sharded(self.wrapped):
            load_full_state(self.wrapped, self.optimizer, ck["model"], ck["optimizer"])
        else:
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        # the stored lr is the checkpoint's schedule at its step; this recipe's decides (they agree
        # on every step already trained, and when the recipe only extends the schedule, may differ here)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * lr_factor(int(ck["step"]), self.cfg)
        if self.ema is not None:
            self.ema.load_state_dict(ck["ema"])
            self.ema.decay = self.cfg.ema_decay  # this run's recipe wins
        set_rng_state(ck["rng"])
        self.step = int(ck["step"])
        self.extra = self.extra or dict(ck.get("extra") or {})
        self.time_before = dict(ck.get("time") or self.time_before)
        self.resumed_from = {"path": str(path), "sha256": sha256_file(path), "step": self.step}

    def _check_schedule_prefix(self, path, ck: dict) -> None:
        """Resuming is exact only if the checkpoint's run did what this recipe does on every step
        it trained: same seed, batch size and accumulation (hence the same batches and
        augmentation), the same AdamW hyper-parameters and the same learning rate at each step.
        The recipe may extend the run (more steps after a warm restart) but not rewrite its past;
        what ``get_batch`` does with a step (the milestone's augmentation) is the caller's to keep."""
        known = {k: v for k, v in (ck.get("config") or {}).items() if k in TrainConfig.__dataclass_fields__}
        old = TrainConfig(**known) if known else None
        same = ("batch_size", "seed", "grad_accum", "weight_decay", "betas")
        changed = {k: (getattr(old, k), getattr(self.cfg, k)) for k in same
                   if old is not None and getattr(old, k) != getattr(self.cfg, k)}
        step = int(ck["step"])
        if step > self.cfg.steps:
            changed["steps"] = (step, self.cfg.steps)
        if not changed and old is not None:
            for s in range(step):
                a, b = lr_at(s, old), lr_at(s, self.cfg)
                if a != b:
                    changed[f"lr at step {s}"] = (a, b)
                    if old.steps != self.cfg.steps:
                        changed["steps"] = (old.steps, self.cfg.steps)
                    break
        if changed:
            raise CheckpointError(f"checkpoint {path} was trained with a different schedule "
                                  f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}): "
                                  f"resume with the same recipe (or one that only extends it with a warm "
                                  f"restart) or start a new out_dir")

    def eval_model(self) -> nn.Module:
        """The model to evaluate: the EMA copy when EMA is on, else the trained model. Under FSDP
        a plain copy holding the gathered weights (a collective the first time after training)."""
        if is_sharded(self.wrapped):
            if self._plain is None or self._plain[0] != self.step:
                self._plain = (self.step, unsharded_copy(self._skeleton, full_state(self.wrapped, self.optimizer)[0]))
            return self._plain[1]
        return self.ema.module if self.ema is not None else self.model

    # -- one step

    def _train_step(self, step: int) -> dict:
        cfg, d = self.cfg, self.dist
        idx = rank_slice(batch_indices(step, self.data_size, cfg.batch_size, cfg.seed), d.rank, d.world_size)
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, 1, step, d.rank))
        torch.manual_seed(mix_seed(cfg.seed, 2, step, d.rank))  # dropout / noise inside loss_fn
        batch = to_device(self.get_batch(idx, gen), self.device, cfg.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        if self.step_fn is not None:
            metrics = dict(self.step_fn(self.model, batch, cfg.grad_accum, self.autocast))
            if "loss" not in metrics:
                raise KeyError("step_fn must return a metrics dict with a 'loss' entry")
            if d.world_size > 1:
                self._allreduce_grads()
        else:
            metrics, n = {}, len(idx)
            micro = split_batch(batch, cfg.grad_accum)
            for j, mb in enumerate(micro):
                wgt = batch_len(mb) / n
                with no_sync(self.wrapped, skip=j < len(micro) - 1):  # ranks exchange gradients once
                    with self.autocast():
                        loss, m = self._loss(mb)
                    (loss * wgt).backward()
                for k, v in {"loss": loss, **m}.items():
                    v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                    metrics[k] = metrics.get(k, 0.0) + v * wgt
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = global_grad_norm(params).to(self.device)
        if hasattr(norm, "full_tensor"):  # FSDP: the norm of sharded gradients, reduced over ranks
            norm = norm.full_tensor()
        if not step_is_finite(metrics["loss"], norm, d.world_size):  # before the update, every step
            raise diagnose(step + 1, metrics["loss"], norm, self.model, self.optimizer, batch, cfg, self.ckpt_path)
        if cfg.grad_clip is not None:
            metrics["grad_norm"] = clip_grads(params, cfg.grad_clip, norm).detach()
        self._last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        if d.world_size > 1:
            for b in self.model.buffers():
                dist.broadcast(b, 0)
        if self.ema is not None:
            self.ema.update(self.model)
        return metrics

    def _loss(self, batch: Any) -> tuple[torch.Tensor, dict]:
        """``loss_fn(model, batch)``, through the DDP/FSDP wrapper when there is one."""
        if self.wrapped is not None:
            return self.wrapped(self.loss_fn, batch)
        return self.loss_fn(self.model, batch)

    def _save_finite(self) -> Path | None:
        """:meth:`save`, unless a weight is not finite (then TrainingDiverged: nothing is saved)."""
        check_weights(self.step, self.model, self.ckpt_path)
        return self.save()

    def _allreduce_grads(self) -> None:
        """After a ``step_fn``: average gradients over ranks, one flat all-reduce per dtype; a
        parameter without a gradient on some rank contributes zeros (so every rank steps the
        same parameters)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for dtype in {p.grad.dtype for p in params}:
            group = [p for p in params if p.grad.dtype == dtype]
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat)
            flat /= self.dist.world_size
            off = 0
            for p in group:
                p.grad.copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()

    def _reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.dist.world_size == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, (t / self.dist.world_size).tolist()))

    # -- the loop

    def _open_log(self, start_step: int) -> None:
        """Start ``metrics.jsonl`` fresh, or on resume keep only lines up to ``start_step``."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path, kept = self.out_dir / "metrics.jsonl", []
        if start_step > 0 and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line + "\n")
                except (ValueError, KeyError):
                    pass
        path.write_text("".join(kept))

    def fit(self, until: int | None = None) -> dict:
        """Train from ``self.step`` to ``cfg.steps`` (or until ``max_seconds``); return a summary
        ``{kind, steps, start_step, wall_s, items_per_s, final_metrics, stopped_early, ...}``.
        ``until``: stop after this step instead (the schedule stays ``cfg.steps`` long; call
        ``fit`` again to go on: a study that looks at the model after every epoch)."""
        cfg, main = self.cfg, is_main_process()
        end = cfg.steps if until is None else min(int(until), cfg.steps)
        self.model.train()
        start_step, t0, cpu0 = self.step, time.perf_counter(), time.process_time()
        self._clock = (t0, cpu0)
        log = main and self.out_dir is not None
        if log:
            self._open_log(start_step)
        bar = tqdm(total=cfg.steps, initial=start_step, desc=self.kind, dynamic_ncols=True,
                   disable=not (cfg.progress and main))
        sums, n_win, t_win, record, stopped_early = {}, 0, time.perf_counter(), {}, False
        curve = []  # (step, mean loss) of each logged window: the summary's loss_curve
        try:  # the bar is closed however the loop ends
            while self.step < end:
                metrics = self._train_step(self.step)
                self.step += 1
                bar.update(1)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_win += 1
                time_up = cfg.max_seconds is not None and time.perf_counter() - t0 >= cfg.max_seconds
                if cfg.max_seconds is not None and self.dist.world_size > 1:  # ranks stop together
                    flag = torch.tensor([float(time_up)], device=self.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    time_up = bool(flag.item())
                if self.step % cfg.log_every == 0 or self.step == end or time_up:
                    now = time.perf_counter()
                    means = self._reduce_mean({k: float(v) / n_win for k, v in sums.items()})
                    record = {"step": self.step, "loss": means.pop("loss", float("nan")), "lr": self._last_lr,
                              "items_per_s": n_win * cfg.batch_size / max(now - t_win, 1e-9), **means,
                              "elapsed_s": now - t0}
                    if not math.isfinite(record["loss"]):  # each step's loss was finite: their mean overflowed
                        raise TrainingDiverged(self.step, f"the mean loss of steps {self.step - n_win + 1}-{self.step}"
                                               f" ({record['loss']})", "losses too large to average: lower the "
                                               "learning rate or rescale the loss", kept_note(self.ckpt_path))
                    curve.append((self.step, record["loss"]))
                    if log:
                        with open(self.out_dir / "metrics.jsonl", "a") as f:
                            f.write(json.dumps(record) + "\n")
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    items_s=f"{record['items_per_s']:.0f}")
                    sums, n_win, t_win = {}, 0, now
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < end:
                    self._save_finite()
                if time_up and self.step < end:
                    stopped_early = True
                    break
        finally:
            bar.close()
        wall = time.perf_counter() - t0
        ckpt = self._save_finite() if self.step > start_step else self.ckpt_path
        ckpt = ckpt if ckpt is not None and ckpt.exists() else None
        summary = {"kind": self.kind, "steps": self.step, "target_steps": cfg.steps, "start_step": start_step,
                   "wall_s": wall, "items_per_s": (self.step - start_step) * cfg.batch_size / max(wall, 1e-9),
                   "final_metrics": record, "loss_curve": curve, "stopped_early": stopped_early,
                   "max_seconds": cfg.max_seconds,
                   "checkpoint": str(ckpt) if ckpt else None, "world_size": self.dist.world_size,
                   "device": str(self.device), "bf16": self.autocast.enabled, "bf16_requested": cfg.bf16,
                   # process CPU seconds and the machine's load: wall time on a shared machine
                   # says little, CPU time / threads says what an idle machine would take
                   "cpu_s": time.process_time() - cpu0, "torch_threads": torch.get_num_threads(),
                   "loadavg_end": list(os.getloadavg()),
                   # all segments of a resumed run (start_step > 0): what the whole training cost
                   "total": self.time_total(), "resumed_from": self.resumed_from}
        if log:
            (self.out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        self.time_before, self._clock = self.time_total(), None  # a later fit() call adds its own time
        return summary
