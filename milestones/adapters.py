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
        """images (B, 3, H, W) float in [-1, 1] -> class logits (B, n_classes)."""
        return model(images)

    @capability("m1")
    def vit_patchify(self, model, images):
        """images (B, 3, H, W) -> flattened patches (B, N, patch_size**2 * 3), row-major over
        the patch grid, each patch flattened as (p, p, C)."""
        return self.module("vit").patchify(images, model.cfg.patch_size)

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
    @capability("m2")
    def tokenizer_train(self, texts: list[str], min_freq: int = 1):
        """A word tokenizer learned from ``texts`` (every training caption): the specials
        <pad> <unk> <bos> <eos> first, then every word seen at least ``min_freq`` times; unseen
        words map to <unk>. ``len(tokenizer)`` is its vocabulary size."""
        return self.module("text").Tokenizer.train(texts, min_freq=min_freq)

    @capability("m2")
    def tokenizer_state(self, tokenizer) -> dict:
        """The tokenizer as plain data (strings, lists, numbers), stored in a checkpoint's
        ``extra["tokenizer"]``; :meth:`tokenizer_load` rebuilds it."""
        return tokenizer.state_dict()

    @capability("m2")
    def tokenizer_load(self, state: dict):
        """The tokenizer saved by :meth:`tokenizer_state`."""
        return self.module("text").Tokenizer.from_state_dict(state)

    @capability("m2")
    def tokenizer_special_ids(self, tokenizer) -> dict:
        """``{"pad", "unk", "bos", "eos"}`` -> token id."""
        return {"pad": tokenizer.pad_id, "unk": tokenizer.unk_id, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id}

    @capability("m2")
    def tokenizer_decode(self, tokenizer, ids) -> str:
        """ids (L,) -> the words up to the first <eos>, specials dropped, joined by spaces."""
        return tokenizer.decode(ids)

    @capability("m2")
    def clip_tokenize(self, tokenizer, texts: list[str], context_length: int):
        """B strings -> (ids (B, L) long, pad_mask (B, L) bool, True = padding): each text
        ``<bos> words <eos>``, right-padded; L = the longest, at most ``context_length``
        (longer texts are truncated and keep their final <eos>)."""
        return tokenizer.batch_encode(texts, context_length)

    @capability("m2")
    def clip_build(self, config: dict):
        """A CLIP from its config dict (``clip.CLIPConfig`` fields: image_tower ("vit" | "cnn"),
        image_size, patch_size, vision_dim, vision_depth, vision_heads, cnn_width, vocab_size,
        context_length, text_dim, text_depth, text_heads, text_pool, mlp_ratio, dropout, embed_dim,
        init_temperature, max_logit_scale). Two towers sharing no weights; returns an nn.Module
        whose ``load_state_dict`` reads the checkpoint's weights."""
        clip = self.module("clip")
        return clip.CLIP(clip.CLIPConfig(**config))

    @capability("m2")
    def clip_context_length(self, model) -> int:
        """The most tokens the model's text tower takes (L <= this in :meth:`clip_encode_texts`)."""
        return model.context_length

    @capability("m2")
    def clip_pairs(self, images, captions: list[list[str]], tokenizer, context_length: int, image_keys=None):
        """The contrastive batch maker over uint8 images (N, 3, H, W) and their captions (N lists,
        each >= 1). ``image_keys`` (N,) long: equal for images that mean the same thing (None: every
        image its own). The result has ``len() == N`` and ``get_batch(idx (B,), generator) ->
        {images (B, 3, H, W) float in [-1, 1], ids (B, L), pad_mask (B, L), image_key (B,),
        text_key (B,)}``: one caption per image drawn with ``generator``, text_key equal for
        identical (normalised) caption texts."""
        return self.module("clip").PairedCaptions(images, captions, tokenizer, context_length, image_keys)

    @capability("m2")
    def clip_loss(self, image_emb, text_emb, scale, mask=None):
        """Symmetric InfoNCE (CLIP fig. 3): unit vectors (B, E) and (B, E) with row i a matching
        pair, 0-d logit scale, optional (B, B) bool mask of known duplicate pairs (False on the
        diagonal) left out of both softmax denominators -> (0-d loss, {"acc_i2t", "acc_t2i"})."""
        return self.module("clip").clip_loss(image_emb, text_emb, scale, mask)

    @capability("m2")
    def clip_duplicate_mask(self, image_key, text_key=None):
        """Keys (B,) (and optionally text keys (B,)) -> (B, B) bool, True for off-diagonal pairs
        sharing an image key or a text key (the mask :meth:`clip_loss` takes)."""
        return self.module("clip").duplicate_mask(image_key, text_key)

    @capability("m2")
    def clip_train_step(self, model, batch: dict, n_micro: int, autocast_ctx=None) -> dict:
        """The engine's ``step_fn``: :meth:`clip_loss` over the whole batch (a
        :meth:`clip_pairs` batch; duplicate keys masked when present) computed in ``n_micro``
        GradCache micro-batches (Gao et al. 2021); leaves in ``.grad`` the gradient of the
        full-batch loss. Returns metrics {"loss", "acc_i2t", "acc_t2i", "logit_scale",
        "masked_frac" (with keys)}.

        Calls ``clip.gradcache_step(model, batch, n_micro, autocast_ctx, loss_fn=self.clip_loss)``:
        the loss goes through the seam, so a variant of this class can study (or plant a bug in)
        the loss alone."""
        return self.module("clip").gradcache_step(model, batch, n_micro, autocast_ctx, loss_fn=self.clip_loss)

    @capability("m2")
    def clip_encode_images(self, model, images):
        """images (B, 3, H, W) float in [-1, 1] -> (B, E) unit vectors."""
        return model.encode_image(images)

    @capability("m2")
    def clip_encode_texts(self, model, ids, pad_mask):
        """ids (B, L) long, pad_mask (B, L) bool (True = padding) -> (B, E) unit vectors."""
        return model.encode_text(ids, pad_mask)

    @capability("m2")
    def clip_logit_scale(self, model):
        """The learned logit scale exp(t) = 1 / temperature (0-d tensor; t is a parameter stored
        as a log, initialised at log(1 / 0.07), the scale clamped at 100)."""
        return model.scale()
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
