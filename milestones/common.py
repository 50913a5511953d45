"""Steps every milestone shares, written once: recipe -> training config, where real data is,
reading a checkpoint, pixel conversions.

Everything here is the grader's own: data paths, checkpoint files and pixels go through
:mod:`eval.reference` (the grader's copy of the bundled library), never through the code
under test; the engine itself is reached through :mod:`milestones.adapters`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from eval.reference.checkpoint import (CheckpointError, check_contents, config_errors, eval_weights,  # noqa: F401
                                       load_checkpoint, load_into)
from eval.reference.data.paths import sha256_file, shared_data_root  # noqa: F401  (re-exported)
from eval.reference.data.split import DataMissingError, to_float, to_uint8  # noqa: F401  (re-exported)

# recipe fields that map one-to-one onto TrainConfig fields, when a recipe has them
_OPTIONAL_FIELDS = ("min_lr_ratio", "grad_accum", "ema_decay", "channels_last", "ckpt_every")


def train_config(recipe, ctx=None, *, seed: int | None = None, out_dir=None, device: str | None = None,
                 progress: bool | None = None, **overrides) -> dict:
    """The engine's TrainConfig fields for ``recipe`` (a milestone recipe dataclass with steps,
    batch_size, lr, weight_decay, warmup_steps, bf16, max_minutes and optionally
    :data:`_OPTIONAL_FIELDS`) in the run ``ctx``; keyword arguments override ctx's seed,
    out_dir, device and progress, and ``overrides`` any field. Fields a recipe leaves at their
    off value (0 / None / ()) are not passed, so an ``--impl`` engine without them still grades."""
    cfg = dict(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, weight_decay=recipe.weight_decay,
               warmup_steps=recipe.warmup_steps, bf16=recipe.bf16,
               seed=seed if seed is not None else (ctx.seed if ctx else 0),
               out_dir=str(out_dir) if out_dir is not None else (str(ctx.out_dir) if ctx else None),
               device=device or (ctx.device if ctx else "cpu"),
               progress=progress if progress is not None else (ctx.progress if ctx else False),
               max_seconds=recipe.max_minutes * 60 if getattr(recipe, "max_minutes", None) else None)
    for name in _OPTIONAL_FIELDS:
        value = getattr(recipe, name, None)
        if value not in (None, 0, ()):
            cfg[name] = value
    if getattr(recipe, "restarts", ()):
        cfg["restarts"] = recipe.restarts
    cfg.update(overrides)
    return cfg


def world_split(ctx, split: str, n: int | None = None, **kwargs):
    """A split of the embedded world drawn from ``ctx.split_world_seed(split)`` (``--world-seed``;
    the test splits' from ``--hidden-seed``'s draw), from the grader's own copy of the world;
    ``kwargs`` go to ``make_split`` (``single``, ``captions``)."""
    from eval.reference.data.world import WorldConfig, make_split
    return make_split(split, n, WorldConfig(seed=ctx.split_world_seed(split)), **kwargs)


def data_root(ctx, subdir: str, needed: str) -> Path:
    """Where a real dataset is: ``--data-root`` if given, else ``$MMSYS_SHARED_DATA/<subdir>``
    when that exists. ``needed`` completes the error line ("m1 full profile needs CIFAR-10:
    pass --data-root ..."); raises DataMissingError (exit 2) when neither is there."""
    if ctx.data_root is not None:
        return Path(ctx.data_root)
    shared = shared_data_root()
    if shared is not None and (shared / subdir).exists():
        return shared / subdir
    raise DataMissingError(needed)


# what each kind of checkpoint must carry in ``extra`` for the grader to use it
REQUIRED_EXTRA = {"clip": ("tokenizer",), "captioner": ("tokenizer",), "t2i": ("tokenizer",),
                  "audio": ("tokenizer", "clip_checkpoint")}


def read_checkpoint(path, kind: str) -> dict:
    """The grader reads checkpoint files itself (``weights_only``; kind and format checked):
    ``{"model", "ema", "model_config", "extra", "step", ...}``, its contents checked before
    anything is built (:func:`eval.reference.checkpoint.check_contents`: model_config a dict,
    the kind's :data:`REQUIRED_EXTRA`, finite weights within the parameter limit). Raises
    CheckpointError (exit 2), one line naming the file. The model itself is rebuilt with
    :func:`load_into` (the grader's copy of :func:`mmsys.checkpoint.load_into`)."""
    ck = load_checkpoint(path, expect_kind=kind)
    check_contents(path, ck, required_extra=REQUIRED_EXTRA.get(kind, ()))
    return ck


@torch.no_grad()
def batched(fn, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Apply ``fn`` (float (b, 3, H, W) in [-1, 1] -> tensor (b, ...)) to uint8 ``images``
    (N, 3, H, W) in batches, converting pixels with the grader's own :func:`to_float`;
    returns the outputs concatenated (N, ...)."""
    return torch.cat([fn(to_float(images[i:i + batch_size])).float() for i in range(0, len(images), batch_size)])


__all__ = ["CheckpointError", "DataMissingError", "REQUIRED_EXTRA", "batched", "config_errors", "data_root",
           "eval_weights", "load_into", "read_checkpoint",
           "sha256_file", "to_float", "to_uint8", "train_config"]
