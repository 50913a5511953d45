"""The seam: every function the grader and the shape tests need from an implementation.

This module is the only place that reaches into the code under test (Stanford CS336's
``tests/adapters.py`` is the model). The implementation supplies models, losses, samplers, the
tokenizer and the training engine; the grader supplies everything it measures with — data,
judges, metrics, pixel conversions, checkpoint reading — from its own copy of the bundled
library (:mod:`eval.reference`), whatever the implementation contains.

Two implementations go through the same seam:

- ``CANDIDATE``: the package named ``mmsys``, i.e. the code being graded. ``grader.py --impl
  PATH`` loads ``PATH/mmsys`` under that name (:func:`use_implementation`) without putting PATH
  on ``sys.path``, so an ``eval/`` or ``milestones/`` folder beside it is never imported. A
  module the implementation does not have is taken from the bundled package, and the report
  says which package supplied each module (:func:`supplied_by`).
- ``REFERENCE``: the grader's own copy of the bundled library, for the grader's judges (m5's
  judge CLIP is trained through this seam, never through the candidate).

Every method states tensor shapes. Images cross the seam as float ``(B, 3, H, W)`` in [-1, 1]
(the grader converts its uint8 data with its own :func:`eval.reference.data.split.to_float`).
The ``Interface`` section of each milestone's report is generated from this file
(:func:`interface`), so it cannot drift from what the grader calls.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

BUNDLED = Path(__file__).resolve().parents[1] / "mmsys"  # the reference implementation's folder

# ------------------------------------------------------------------ loading the code under test


class ImplementationError(Exception):
    """The implementation folder cannot be graded (no ``mmsys`` package, fails to import ...)."""


class _BundledFallback(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: a ``mmsys.<module>`` the implementation lacks is loaded from
    the bundled folder (still as ``mmsys.<module>``, so its relative imports reach the
    implementation's modules first)."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("mmsys."):
            return None
        rel = Path(*fullname.split(".")[1:])
        for candidate, is_pkg in ((BUNDLED / rel / "__init__.py", True), (BUNDLED / rel.with_suffix(".py"), False)):
            if candidate.is_file():
                return importlib.util.spec_from_file_location(
                    fullname, candidate, submodule_search_locations=[str(candidate.parent)] if is_pkg else None)
        return None


_loaded: dict[str, Any] = {}  # what use_implementation loaded: {"path": ..., "root": ...}


def use_implementation(impl: Path | str | None) -> dict:
    """Make ``import mmsys`` load the implementation to grade; call before anything imports it.

    ``impl``: a folder holding an ``mmsys`` package, or None for the bundled one. Modules the
    folder lacks fall back to the bundled package (listed by :func:`supplied_by`). Returns
    ``{"path": folder of the graded mmsys package, "bundled": bool}``.
    Raises ImplementationError when the folder has no ``mmsys/__init__.py`` or ``mmsys`` was
    already imported from elsewhere."""
    root = BUNDLED if impl is None else Path(impl).resolve() / "mmsys"
    if _loaded:
        if _loaded["root"] != root:
            raise ImplementationError(f"an implementation from {_loaded['root']} is already loaded; "
                                      f"cannot switch to {root} in the same process")
        return dict(_loaded["info"])
    if not (root / "__init__.py").is_file():
        raise ImplementationError(f"--impl {impl}: no mmsys package there (expected {root / '__init__.py'})")
    existing = sys.modules.get("mmsys")
    if existing is not None and Path(existing.__file__).resolve().parent != root:
        raise ImplementationError(f"mmsys was imported from {Path(existing.__file__).parent} before "
                                  f"the implementation at {root} could be loaded")
    if existing is None:
        spec = importlib.util.spec_from_file_location("mmsys", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["mmsys"] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules["mmsys"]
            raise ImplementationError(f"--impl {impl}: importing its mmsys package failed: "
                                      f"{type(e).__name__}: {e}") from e
    if root != BUNDLED and not any(isinstance(f, _BundledFallback) for f in sys.meta_path):
        sys.meta_path.append(_BundledFallback())
    _loaded.update(root=root, info={"path": str(root), "bundled": root == BUNDLED})
    return dict(_loaded["info"])


def supplied_by() -> dict[str, str]:
    """``{module: "implementation" | "bundled"}`` for every ``mmsys`` module imported so far:
    which package supplied each part of what was graded (the report prints it)."""
    out = {}
    for name, mod in sorted(sys.modules.items()):
        if (name == "mmsys" or name.startswith("mmsys.")) and getattr(mod, "__file__", None):
            inside = Path(mod.__file__).resolve().is_relative_to(BUNDLED)
            out[name] = "bundled" if inside else "implementation"
    return out


# ------------------------------------------------------------------ the seam


def capability(*milestones: str) -> Callable:
    """Mark a method of :class:`Implementation` as part of the interface of ``milestones``."""
    def mark(fn):
        fn.milestones = milestones
        return fn
    return mark


class Implementation:
    """One implementation seen through the seam: ``package`` is ``"mmsys"`` (the candidate) or
    ``"eval.reference"`` (the grader's own copy, for judges)."""

    def __init__(self, package: str):
        self.package = package

    def module(self, name: str) -> ModuleType:
        """The implementation's module ``name`` (e.g. ``"vit"``, ``"diffusion.samplers"``)."""
        if self.package == "mmsys" and not _loaded:
            use_implementation(None)
        return importlib.import_module(f"{self.package}.{name}")

    # ---------------------------------------------------------------- engine (every milestone)
    @capability("m1", "m2", "m3", "m4", "m5")
    def trainer(self, model, config: dict, **kwargs):
        """The training engine: ``train.Trainer(model, train.TrainConfig(**config), **kwargs)``.

        config: the recipe's TrainConfig fields (steps, batch_size, lr, weight_decay,
        warmup_steps, seed, out_dir, device, progress, ...; built by
        :func:`milestones.common.train_config`). kwargs: loss_fn(model, batch) -> (loss, logs)
        or step_fn, data_size, get_batch(idx (B,), generator) -> batch, kind, model_config,
        extra, resume_from. The returned object has ``fit() -> summary dict``, ``step`` and
        ``eval_model() -> nn.Module`` (EMA weights when the recipe keeps them) and writes
        ``out_dir/checkpoint.pt`` in the format :func:`eval.reference.checkpoint` reads."""
        train = self.module("train")
        return train.Trainer(model, train.TrainConfig(**config), **kwargs)

    # ---------------------------------------------------------------- m1: ViT
    @capability("m1", "m3")
    def vit_build(self, config: dict):
        """A ViT from its config dict (``vit.ViTConfig`` fields: image_size, patch_size,
        in_channels, dim, depth, n_heads, mlp_ratio, n_classes, dropout). Returns an nn.Module."""
        vit = self.module("vit")
        return vit.ViT(vit.ViTConfig(**config))

    @capability("m1")
    def vit_logits(self, model, images):
        """images (B, C, H, W) float in [-1, 1] -> class logits (B, n_classes). Each image's
        logits depend on that image only. H = W may differ from the config's image_size (the
        full recipe trains its first steps at 16x16): the positional embeddings are resized to
        the (H/p) x (W/p) patch grid."""
        return model(images)

    @capability("m1")
    def vit_patchify(self, model, images):
        """images (B, C, H, W) -> flattened patches (B, N, C * p * p), p = the model's
        patch_size, N = (H/p) * (W/p) in row-major order over the patch grid, each patch
        flattened channel-major as (C, p, p). Raises ValueError when H or W is not a multiple of p."""
        return self.module("vit").patchify(images, model.cfg.patch_size)

    @capability("m1")
    def vit_embeddings(self, model) -> dict:
        """The learnable embeddings added before the encoder: ``{"cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + N, dim)}`` as the model's own nn.Parameters (N patches at the
        config's image_size; position 0 is the CLS token's)."""
        return {"cls_token": model.cls_token, "pos_embed": model.pos_embed}

    @capability("m1")
    def vit_tokens(self, model, images):
        """images (B, 3, H, W) -> encoder output tokens (B, 1 + N, dim), CLS first."""
        return model.tokens(images)[0]

    @capability("m1")
    def vit_attention_maps(self, model, images) -> list:
        """images (B, 3, H, W) -> per layer, attention weights (B, heads, 1 + N, 1 + N)."""
        return model.attention_maps(images)

    @capability("m1")
    def vit_attention_rollout(self, weights: list):
        """Per-layer attention weights [(B, heads, 1 + N, 1 + N)] -> CLS-to-patch rollout (B, N)
        (Abnar & Zuidema 2020), each row summing to 1."""
        return self.module("vit").attention_rollout(weights)

    @capability("m1")
    def random_crop_flip(self, images, generator, pad: int, flip: bool):
        """Training augmentation: uint8 (B, 3, H, W) -> float (B, 3, H, W) in [-1, 1], randomly
        translated by up to ``pad`` pixels (zero padding) and, with ``flip``, mirrored."""
        return self.module("augment").random_crop_flip(images, generator, pad=pad, flip=flip)

    @capability("m1")
    def cutout(self, images, generator, size: int):
        """Cutout: float (B, 3, H, W) -> the same with one ``size`` x ``size`` square per image zeroed."""
        return self.module("augment").cutout(images, generator, size)

    @capability("m1")
    def mix_batch(self, images, labels, generator, n_classes: int, mixup: float, cutmix: float,
                  label_smoothing: float):
        """Mixup / CutMix (one of the two per batch): float images (B, 3, H, W), labels (B,) ->
        (mixed images (B, 3, H, W), soft targets (B, n_classes)) with label smoothing folded in."""
        return self.module("augment").mix_batch(images, labels, generator, n_classes, mixup, cutmix,
                                                label_smoothing)

    # ================================================================ m2: CLIP
    # (the m2 methods go here, in the order the milestone uses them)
    # ---------------------------------------------------------------- end of m2



    # ================================================================ m3: captioner
    # (the m3 methods go here, in the order the milestone uses them)
    # ---------------------------------------------------------------- end of m3



    # ================================================================ m4: DDPM / DDIM
    # (the m4 methods go here, in the order the milestone uses them)
    # ---------------------------------------------------------------- end of m4



    # ================================================================ m5: text-to-image
    # (the m5 methods go here, in the order the milestone uses them)
    # ---------------------------------------------------------------- end of m5




CANDIDATE = Implementation("mmsys")
REFERENCE = Implementation("eval.reference")


def capabilities(milestone: str) -> list[tuple[str, Callable]]:
    """``[(name, method)]`` of the seam used by ``milestone``, in the order they are defined."""
    return [(name, fn) for name, fn in vars(Implementation).items()
            if milestone in getattr(fn, "milestones", ())]


def interface(milestone: str) -> str:
    """The Interface section of a milestone, generated from this file: each capability's
    signature and the first paragraph of its docstring."""
    lines = [f"Implementation methods used by {milestone} (milestones/adapters.py; the implementation is "
             f"the `mmsys` package, `--impl PATH` loads PATH/mmsys):"]
    for name, fn in capabilities(milestone):
        sig = str(inspect.signature(fn)).replace("(self, ", "(").replace("(self)", "()")
        doc = inspect.getdoc(fn) or ""
        lines.append(f"  {name}{sig}\n      " + doc.split("\n\n")[0].replace("\n", "\n      "))
    return "\n".join(lines)
