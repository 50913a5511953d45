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
import importlib.machinery
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
    """First on ``sys.meta_path`` for ``mmsys.*`` names: the implementation's own module when its
    folder has it, else the bundled one (still as ``mmsys.<module>``, so its relative imports
    reach the implementation's modules first). First, so that no other finder — e.g. the one
    ``pip install -e`` adds, which maps ``mmsys.*`` to wherever the checkout was installed from —
    can answer for a module the implementation lacks."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("mmsys."):
            return None
        own = importlib.machinery.PathFinder.find_spec(fullname, path)  # in the parent package's folder
        if own is not None:
            return own
        rel = Path(*fullname.split(".")[1:])
        for candidate, is_pkg in ((BUNDLED / rel / "__init__.py", True), (BUNDLED / rel.with_suffix(".py"), False)):
            if candidate.is_file():
                return importlib.util.spec_from_file_location(
                    fullname, candidate, submodule_search_locations=[str(candidate.parent)] if is_pkg else None)
        return None


_loaded: dict[str, Any] = {}  # what use_implementation loaded: {"path": ..., "root": ...}


def describe_implementation(impl: Path | str | None) -> dict:
    """``{"path": folder of the mmsys package graded, "bundled": bool}`` without importing it
    (``--isolation process``: the implementation is imported only in the candidate process).
    Raises ImplementationError when the folder has no ``mmsys/__init__.py``."""
    root = BUNDLED if impl is None else Path(impl).resolve() / "mmsys"
    if not (root / "__init__.py").is_file():
        raise ImplementationError(f"--impl {impl}: no mmsys package there (expected {root / '__init__.py'})")
    return {"path": str(root), "bundled": root == BUNDLED}


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
        sys.meta_path.insert(0, _BundledFallback())
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

    def route_to(self, other) -> None:
        """Answer every seam method (and :meth:`module`) from ``other`` instead: with
        ``--isolation process`` the candidate's methods become calls into the candidate process
        (:class:`grader.candidate.RemoteImplementation`). The object stays the same, so every
        ``impl=CANDIDATE`` default already bound in the milestones follows."""
        for name, fn in vars(Implementation).items():
            if getattr(fn, "milestones", None):
                setattr(self, name, getattr(other, name))
        self.module = other.module

    def module(self, name: str) -> ModuleType:
        """The implementation's module ``name`` (e.g. ``"vit"``, ``"diffusion.samplers"``)."""
        if self.package == "mmsys" and not _loaded:
            use_implementation(None)
        return importlib.import_module(f"{self.package}.{name}")

    # ---------------------------------------------------------------- engine (every milestone)
    @capability("m1", "m2", "m3", "m4", "m5", "m6", "m7")
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
    @capability("m1")
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

    @capability("m1", "m4")
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
    @capability("m2", "m3", "m5", "m6")
    def tokenizer_train(self, texts: list[str], min_freq: int = 1):
        """A word tokenizer learned from ``texts`` (every training caption): the specials
        <pad> <unk> <bos> <eos> first, then every word seen at least ``min_freq`` times; unseen
        words map to <unk>. ``len(tokenizer)`` is its vocabulary size."""
        return self.module("text").Tokenizer.train(texts, min_freq=min_freq)

    @capability("m2", "m3", "m5", "m6")
    def tokenizer_state(self, tokenizer) -> dict:
        """The tokenizer as plain data (strings, lists, numbers), stored in a checkpoint's
        ``extra["tokenizer"]``; :meth:`tokenizer_load` rebuilds it."""
        return tokenizer.state_dict()

    @capability("m2", "m3", "m5", "m6")
    def tokenizer_load(self, state: dict):
        """The tokenizer saved by :meth:`tokenizer_state`."""
        return self.module("text").Tokenizer.from_state_dict(state)

    @capability("m2", "m3", "m5", "m6")
    def tokenizer_special_ids(self, tokenizer) -> dict:
        """``{"pad", "unk", "bos", "eos"}`` -> token id."""
        return {"pad": tokenizer.pad_id, "unk": tokenizer.unk_id, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id}

    @capability("m2", "m3", "m5", "m6")
    def tokenizer_decode(self, tokenizer, ids) -> str:
        """ids (L,) -> the words up to the first <eos>, specials dropped, joined by spaces."""
        return tokenizer.decode(ids)

    @capability("m2", "m5", "m6")
    def clip_tokenize(self, tokenizer, texts: list[str], context_length: int):
        """B strings -> (ids (B, L) long, pad_mask (B, L) bool, True = padding): each text
        ``<bos> words <eos>``, right-padded; L = the longest, at most ``context_length``
        (longer texts are truncated and keep their final <eos>)."""
        return tokenizer.batch_encode(texts, context_length)

    @capability("m2", "m5", "m6")
    def clip_build(self, config: dict):
        """A CLIP from its config dict (``clip.CLIPConfig`` fields: image_tower ("vit" | "cnn"),
        image_size, patch_size, vision_dim, vision_depth, vision_heads, cnn_width, vocab_size,
        context_length, text_dim, text_depth, text_heads, text_pool, mlp_ratio, dropout, embed_dim,
        init_temperature, max_logit_scale). Two towers sharing no weights; returns an nn.Module
        whose ``load_state_dict`` reads the checkpoint's weights."""
        clip = self.module("clip")
        return clip.CLIP(clip.CLIPConfig(**config))

    @capability("m2", "m5", "m6")
    def clip_context_length(self, model) -> int:
        """The most tokens the model's text tower takes (L <= this in :meth:`clip_encode_texts`)."""
        return model.context_length

    @capability("m2", "m5", "m6")
    def clip_pairs(self, images, captions: list[list[str]], tokenizer, context_length: int, image_keys=None):
        """The contrastive batch maker over uint8 images (N, 3, H, W) and their captions (N lists,
        each >= 1). ``image_keys`` (N,) long: equal for images that mean the same thing (None: every
        image its own). The result has ``len() == N`` and ``get_batch(idx (B,), generator) ->
        {images (B, 3, H, W) float in [-1, 1], ids (B, L), pad_mask (B, L), image_key (B,),
        text_key (B,)}``: one caption per image drawn with ``generator``, text_key equal for
        identical (normalised) caption texts."""
        return self.module("clip").PairedCaptions(images, captions, tokenizer, context_length, image_keys)

    @capability("m2", "m5", "m6")
    def clip_loss(self, image_emb, text_emb, scale, mask=None):
        """Symmetric InfoNCE (CLIP fig. 3): unit vectors (B, E) and (B, E) with row i a matching
        pair, 0-d logit scale, optional (B, B) bool mask of known duplicate pairs (False on the
        diagonal) left out of both softmax denominators -> (0-d loss, {"acc_i2t", "acc_t2i"})."""
        return self.module("clip").clip_loss(image_emb, text_emb, scale, mask)

    @capability("m2", "m5", "m6")
    def clip_duplicate_mask(self, image_key, text_key=None):
        """Keys (B,) (and optionally text keys (B,)) -> (B, B) bool, True for off-diagonal pairs
        sharing an image key or a text key (the mask :meth:`clip_loss` takes)."""
        return self.module("clip").duplicate_mask(image_key, text_key)

    @capability("m2", "m5", "m6")
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

    @capability("m2", "m5", "m6")
    def clip_encode_images(self, model, images):
        """images (B, 3, H, W) float in [-1, 1] -> (B, E) unit vectors."""
        return model.encode_image(images)

    @capability("m2", "m5", "m6")
    def clip_encode_texts(self, model, ids, pad_mask):
        """ids (B, L) long, pad_mask (B, L) bool (True = padding) -> (B, E) unit vectors."""
        return model.encode_text(ids, pad_mask)

    @capability("m2", "m5", "m6")
    def clip_logit_scale(self, model):
        """The learned logit scale exp(t) = 1 / temperature (0-d tensor; t is a parameter stored
        as a log, initialised at log(1 / 0.07), the scale clamped at 100)."""
        return model.scale()
    # ---------------------------------------------------------------- end of m2



    # ================================================================ m3: captioner
    @capability("m3")
    def caption_special_ids(self) -> dict:
        """The captioner's special token ids ``{"pad", "bos", "eos"}``: sequences are
        ``<bos> w1 .. wn <eos>`` right-padded with <pad>."""
        c = self.module("captioner")
        return {"pad": c.PAD_ID, "bos": c.BOS_ID, "eos": c.EOS_ID}

    @capability("m3")
    def caption_vocab(self, tok) -> list:
        """The tokenizer's vocabulary: ``vocab[i]`` is the word (or special token) of id i."""
        return list(tok.vocab)

    @capability("m3")
    def caption_encode_sets(self, tok, captions: list, max_len: int):
        """Every reference caption of every image as ids: ``captions`` (per image its list of
        strings, lengths may differ) -> (ids (N, C, L) long, count (N,) long); C = most captions
        of an image (missing slots all <pad>), L <= ``max_len`` (<bos> .. <eos>, truncated)."""
        return self.module("captioner").encode_caption_sets(tok, captions, max_len)

    @capability("m3")
    def caption_pairs(self, count):
        """One training item per (image, caption): count (N,) -> (image index (M,), caption index
        (M,)), M = count.sum(), so an epoch over the items uses every caption once."""
        return self.module("captioner").caption_pairs(count)

    @capability("m3")
    def caption_gather(self, ids, image, caption):
        """Caption ``caption[j]`` of image ``image[j]``: ids (N, C, L), image (b,), caption (b,) ->
        (ids (b, 1, L'), pad_mask (b, 1, L') True = padding), L' = the longest one drawn."""
        return self.module("captioner").gather_captions(ids, image, caption)

    @capability("m3")
    def captioner_build(self, config: dict):
        """A captioner from its config dict (``captioner.CaptionerConfig`` fields: vocab_size,
        max_len, image_size, patch_size, enc_dim, enc_depth, enc_heads, enc_mlp_ratio, dim, depth,
        n_heads, mlp_ratio, dropout, tie_head): a ViT encoder (patch tokens with positions) and a
        causal transformer decoder with cross-attention to them. Returns an nn.Module."""
        c = self.module("captioner")
        return c.Captioner(c.CaptionerConfig(**config))

    @capability("m3")
    def captioner_loss(self, model, images, ids, pad_mask, causal: bool = True):
        """Teacher-forcing cross-entropy (scalar), averaged over real target tokens: images
        (B, 3, S, S) in [-1, 1], ids and pad_mask (B, k, L) (k captions per image, True = pad).
        ``causal=False`` drops the decoder's causal mask (an ablation the gate tests plant)."""
        return self.module("captioner").caption_loss(model, images, ids, pad_mask, causal=causal)

    @capability("m3")
    def captioner_greedy(self, model, images, max_len: int):
        """Greedy decoding: images (B, 3, S, S) in [-1, 1] -> ids (B, L'), ``<bos> .. <eos>``
        right-padded with <pad>, at most ``max_len`` generated tokens (<eos> included)."""
        return model.greedy(images, max_len=max_len)

    @capability("m3")
    def captioner_beam_search(self, model, images, beam: int, max_len: int, alpha: float,
                              return_scores: bool = False):
        """Batched beam search: images (B, 3, S, S) -> ids (B, L') of the best finished hypothesis
        (as :meth:`captioner_greedy`), scored with GNMT length normalisation
        ``log P / ((5 + |Y|) / 6) ** alpha`` (Wu et al. 2016, eq. 14); with ``return_scores``
        also per image its finished hypotheses ``[(score, ids list), ...]`` best first.
        Equals greedy at ``beam=1``."""
        return model.beam_search(images, beam=beam, max_len=max_len, alpha=alpha,
                                 return_scores=return_scores)

    @capability("m3")
    def caption_decode(self, tok, ids) -> list:
        """ids (N, L) -> N strings: the words up to the first <eos>, special tokens dropped."""
        return [tok.decode(s) for s in ids.tolist()]

    @capability("m3")
    def captioner_cross_attention(self, model, images, ids):
        """Where the decoder looked for each generated token: images (B, 3, S, S), ids (B, L)
        (decoded) -> (B, L - 1, g, g) attention mass on the g x g patch grid (heads and blocks
        averaged, CLS share left out); row k belongs to token ``ids[:, k + 1]``."""
        return model.cross_attention(images, ids)

    @capability("m3")
    def captioner_encode(self, model, images):
        """images (B, 3, S, S) -> visual tokens (B, 1 + N, enc_dim): CLS, then the N = (S/p)^2
        patches in row-major order, each with its position embedding."""
        return model.encode(images)

    @capability("m3")
    def captioner_logits(self, model, images, ids, pad_mask=None, causal: bool = True):
        """Teacher-forced next-token logits: images (B, 3, S, S), ids (B, L), pad_mask (B, L)
        (True = pad) -> (B, L, vocab_size); logits[:, t] scores token t + 1 given ids[:, :t + 1]."""
        return model(images, ids, pad_mask, causal=causal)

    @capability("m3")
    def captioner_cross_weights(self, model, images, ids) -> list:
        """Cross-attention weights of the teacher-forced decoder: images (B, 3, S, S), ids (B, L)
        -> per decoder block (B, heads, L, 1 + N) (text positions x CLS + patch tokens)."""
        return model.decode(model.encode(images), ids, need_weights=True)[1]

    @capability("m3")
    def captioner_cached_log_probs(self, model, images, ids):
        """Next-token log-probabilities one position at a time on the key/value cache (the path
        greedy and beam search take): images (B, 3, S, S), ids (B, L) -> (B, L, vocab_size)."""
        return model.cached_log_probs(images, ids)

    @capability("m3")
    def engine_batch_indices(self, step: int, n_items: int, batch_size: int, seed: int):
        """The engine's global batch at ``step``: (batch_size,) indices into ``n_items`` training
        items, a fresh seeded permutation per epoch (each item once per epoch)."""
        return self.module("train").batch_indices(step, n_items, batch_size, seed)
    # ---------------------------------------------------------------- end of m3



    # ================================================================ m4: DDPM / DDIM
    # schedules: the forward process (Ho et al. 2020, eq. 2-7; 0-based t = 0 .. T-1)
    @capability("m4", "m5")
    def diffusion_schedule(self, kind: str = "linear", T: int = 1000):
        """The variance schedule by name: ``"linear"`` (DDPM: betas 1e-4 .. 0.02) or ``"cosine"``
        (Nichol & Dhariwal 2021, eq. 17) with T steps. Returns the implementation's schedule
        object (``.T`` steps), handed back to the methods below."""
        return self.module("diffusion.schedule").NoiseSchedule.make(kind, T)

    @capability("m4")
    def diffusion_schedule_tables(self, schedule) -> dict:
        """The schedule's tables, each (T,) float64: ``betas``, ``alphas`` (1 - beta),
        ``alpha_bars`` (cumulative product), ``posterior_variance`` (beta_tilde, eq. 7; 0 at t = 0)
        and ``posterior_log_variance_clipped`` (its log, the t = 0 value replaced by t = 1's)."""
        names = ("betas", "alphas", "alpha_bars", "posterior_variance", "posterior_log_variance_clipped")
        return {k: getattr(schedule, k) for k in names}

    @capability("m4")
    def diffusion_q_sample(self, schedule, x0, t, noise):
        """x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) noise (eq. 4): x0, noise (B, C, H, W),
        t (B,) long -> x_t (B, C, H, W)."""
        return schedule.q_sample(x0, t, noise)

    @capability("m4")
    def diffusion_posterior(self, schedule, x0, x_t, t):
        """q(x_{t-1} | x_t, x0) (eq. 6-7): x0, x_t (B, C, H, W), t (B,) -> (mean (B, C, H, W),
        variance (B, 1, 1, 1), log-variance clipped (B, 1, 1, 1))."""
        return schedule.posterior(x0, x_t, t)

    @capability("m4")
    def diffusion_predict_x0(self, schedule, x_t, t, eps):
        """eq. 4 solved for x0: (x_t - sqrt(1 - a_bar_t) eps) / sqrt(a_bar_t); (B, C, H, W) each, t (B,)."""
        return schedule.predict_x0(x_t, t, eps)

    @capability("m4")
    def diffusion_predict_eps(self, schedule, x_t, t, x0):
        """eq. 4 solved for the noise: (x_t - sqrt(a_bar_t) x0) / sqrt(1 - a_bar_t); (B, C, H, W) each."""
        return schedule.predict_eps(x_t, t, x0)

    @capability("m4")
    def diffusion_snr(self, schedule, t):
        """Signal-to-noise ratio a_bar_t / (1 - a_bar_t): t (B,) long -> (B,) float64."""
        return schedule.snr(t)

    # the eps model
    @capability("m4")
    def unet_build(self, config: dict):
        """A U-Net from its config dict (``diffusion.unet.UNetConfig`` fields: in_ch, base,
        channel_mults, n_res, attn_resolutions, dropout, groups, n_heads, image_size, ...);
        ``forward(x (B, in_ch, H, W), t (B,)) -> (B, in_ch, H, W)``, zero at initialisation."""
        unet = self.module("diffusion.unet")
        return unet.UNet(unet.UNetConfig(**config))

    @capability("m4")
    def ddpm_config(self, unet: dict, schedule: dict, patch: int = 1, image_size: int = 32, in_ch: int = 3) -> dict:
        """The m4 model's config dict (stored in the checkpoint as ``model_config``): U-Net fields
        ``unet`` (its in_ch / image_size derived from the space-to-depth ``patch``), ``patch``,
        image geometry and ``schedule`` ``{"kind", "T"}``."""
        return self.module("diffusion.ddpm").model_config(unet, schedule, patch=patch, image_size=image_size,
                                                          in_ch=in_ch)

    @capability("m4")
    def ddpm_build(self, config: dict):
        """The eps model from a :meth:`ddpm_config` dict: an nn.Module with ``n_params()`` and the
        image geometry ``in_ch`` / ``image_size``; ``torch.manual_seed`` before it fixes its init."""
        return self.module("diffusion.ddpm").build_model(config)

    @capability("m4")
    def ddpm_schedule(self, config: dict, device: str = "cpu"):
        """The schedule of a :meth:`ddpm_config` dict (``config["schedule"]``), its tables on ``device``."""
        return self.diffusion_schedule(**config["schedule"]).to(device)

    @capability("m4")
    def ddpm_eps(self, model, x_t, t):
        """Noise prediction eps_theta(x_t, t): x_t (B, 3, H, W) float, t (B,) long -> (B, 3, H, W)."""
        return model(x_t, t)

    @capability("m4")
    def ddpm_loss(self, model, x0, schedule, snr_gamma: float | None = None, target: str = "eps"):
        """The DDPM training loss (Ho et al. 2020, alg. 1 / eq. 14) on clean images x0
        (B, 3, H, W) in [-1, 1] -> (scalar loss, logs). Draws t ~ U{0..T-1} (B,) and then eps
        (B, 3, H, W) from the global torch RNG; Min-SNR-gamma weights (Hang et al. 2023) when
        ``snr_gamma``; ``target="x0"`` regresses x0 instead (the planted-bug test)."""
        return self.module("diffusion.ddpm").eps_loss(model, x0, schedule, snr_gamma=snr_gamma, target=target)

    # the reverse process: one step API, one loop
    @capability("m4", "m5")
    def diffusion_sampler(self, schedule, name: str, steps: int | None = None, eta: float = 0.0,
                          clip_x0: bool = True):
        """A sampler with its timesteps set: ``"ddpm"`` (ancestral, all T steps; ``steps`` None
        or T) or ``"ddim"`` (``steps`` evenly spaced, default 50: 980, 960, ..., 0 for T = 1000;
        stochasticity ``eta``). Has ``timesteps`` ((n,) long, visiting order) and
        ``set_timesteps(n)``; ``clip_x0`` clips each predicted x0 to [-1, 1]."""
        return self.module("diffusion.samplers").make_sampler(schedule, name, steps, eta, clip_x0)

    @capability("m4", "m5")
    def diffusion_step(self, sampler, model_output, t, sample, generator=None):
        """One reverse step at timestep t: eps (B, C, H, W), x_t (B, C, H, W) -> object with
        ``prev_sample`` (B, C, H, W) and ``pred_x0`` (B, C, H, W); noise from ``generator`` (one
        torch.Generator or one per sample)."""
        return sampler.step(model_output, t, sample, generator=generator)

    @capability("m4", "m5")
    def diffusion_sample(self, eps_fn, sampler, shape, generator=None, x_T=None, bf16: bool = False,
                         progress: bool = False, on_step=None):
        """The reverse loop: x_T ~ N(0, I) of ``shape`` (B, C, H, W) drawn from ``generator``
        (unless given), then one ``eps_fn(x_t (B, C, H, W), t (B,))`` call and one sampler step per
        timestep -> x_0 (B, C, H, W) float32, unclipped. ``on_step(t, x_t, step_output)`` is
        called after every step."""
        return self.module("diffusion.samplers").sample(eps_fn, sampler, shape, generator, x_T=x_T, bf16=bf16,
                                                        progress=progress, on_step=on_step)

    @capability("m4")
    def diffusion_generators(self, seed: int, start: int, n: int) -> list:
        """One torch.Generator per sample ``start .. start + n - 1``, each seeded by (seed, i) only."""
        return self.module("diffusion.samplers").sample_generators(seed, start, n)

    @capability("m4")
    def ddpm_sample_images(self, model, schedule, n: int, sampler: str, steps: int | None = None,
                           eta: float = 0.0, seed: int = 0, batch_size: int = 250, bf16: bool = True,
                           progress: bool = False):
        """``n`` images uint8 (n, 3, H, W) drawn with the named sampler, ``batch_size`` at a time;
        image i depends only on (seed, i) (:meth:`diffusion_generators`), whatever the batch."""
        return self.module("diffusion.ddpm").sample_images(model, schedule, n, sampler, steps, eta, seed=seed,
                                                           batch_size=batch_size, bf16=bf16, progress=progress)
    # ---------------------------------------------------------------- end of m4



    # ================================================================ m5: text-to-image
    @capability("m5")
    def text2image_build(self, config: dict, clip, tokenizer):
        """A fresh text-to-image model from its config dict (``text2image.TextToImageConfig``
        fields: unet (U-Net fields: base, channel_mults, n_res, attn_resolutions, dropout, groups,
        n_heads), image_size, patch, schedule, T, p_uncond, min_snr_gamma, prediction, pooled,
        coord_channels, layout_channels, word_features, math_attention), conditioned on a frozen
        copy of the text tower of ``clip`` (an m2 CLIP of this implementation) and its
        ``tokenizer``. Builds the parameters in a fixed order from the global torch RNG."""
        t2i = self.module("text2image")
        return t2i.from_clip(t2i.TextToImageConfig(**config), clip, tokenizer)

    @capability("m5")
    def text2image_from_checkpoint(self, model_config: dict, tokenizer_state: dict, weights: dict):
        """The model a text-to-image checkpoint holds (eval mode), from the parts the grader read:
        ``model_config``, ``extra["tokenizer"]`` and the weights (EMA when kept). Raises
        ``CheckpointError`` when they do not describe a model this implementation can build."""
        return self.module("text2image").from_checkpoint(model_config, tokenizer_state, weights)

    @capability("m5")
    def text2image_model_config(self, model) -> dict:
        """The model's config dict (what :meth:`text2image_build` takes, plus ``clip``: the text
        tower's CLIP config); the checkpoint's ``model_config``."""
        return model.cfg.to_dict()

    @capability("m5")
    def text2image_text_tower(self, model):
        """The frozen CLIP text tower the model conditions on (an nn.Module: no parameter
        trains, always in eval mode)."""
        return model.text.tower

    @capability("m5")
    def text2image_n_params(self, model) -> int:
        """Trainable parameters (everything but the frozen text tower)."""
        return model.n_params()

    @capability("m5")
    def text2image_alpha_bars(self, model):
        """The model's noise schedule: alpha_bar_t (T,) float, ``x_t = sqrt(alpha_bar_t) x_0 +
        sqrt(1 - alpha_bar_t) eps`` (DDPM eq. 4); t = 0 the least noisy step."""
        return model.schedule.alpha_bars

    @capability("m5")
    def text2image_captioned_data(self, images, captions: list, tokenizer, context_length: int, p_uncond: float):
        """Training pairs with conditioning dropout: images uint8 (N, 3, H, W), per image a list of
        captions. The object has ``len() = N``, ``ids``/``pad_mask`` (C, L) of all captions (image
        by image, tokenised once) and ``get_batch(idx (B,), generator) -> {"images" float (B, 3,
        H, W) in [-1, 1], "ids" (B, L'), "pad_mask" (B, L') bool True = pad, "dropped" (B,) bool}``:
        one random caption per image, replaced by the empty prompt with probability ``p_uncond``
        (Ho & Salimans 2022, alg. 1)."""
        return self.module("text_conditioning").CaptionedImages(images, captions, tokenizer, context_length,
                                                                p_uncond)

    @capability("m5")
    def text2image_fit_text_standardisation(self, model, ids, pad_mask) -> dict:
        """Fit the fixed per-feature standardisation of the frozen text features on training
        captions ids/pad_mask (C, L). Returns statistics for the report ({"tokens", ...})."""
        return model.text.fit_standardisation(ids, pad_mask)

    @capability("m5")
    def text2image_encode(self, model, prompts: list):
        """P prompts -> (context (P, L, D) float, pad_mask (P, L) bool True = pad): the frozen
        text tower's token features the U-Net cross-attends to (right-padded; "" = <bos> <eos>)."""
        return model.encode(prompts)

    @capability("m5")
    def text2image_eps(self, model, x_t, t, context, pad_mask):
        """Conditional noise prediction eps_theta: x_t (B, 3, H, W), t (B,) long, context (B, L, D),
        pad_mask (B, L) -> eps (B, 3, H, W). This is ``model(x_t, t, context, pad_mask)``, the
        call every sampler makes (tests stand in a constructed eps by replacing ``model.forward``)."""
        return model(x_t, t, context, pad_mask)

    @capability("m5")
    def text2image_guided_eps(self, model, x_t, t, prompts: list, guidance: float, negative=None):
        """Guided noise prediction from prompts: x_t (B, 3, H, W), t (B,), B prompts -> eps (B, 3,
        H, W) = ``eps_u + s (eps_c - eps_u)`` (Ho & Salimans 2022, eq. 6), eps_u the empty prompt's
        or, with ``negative`` (one string or B), the negative prompt's; s = 1: conditional only."""
        return self.module("text2image").guided_noise(model, x_t, t, prompts, guidance, negative)

    @capability("m5")
    def text2image_cross_attention(self, model, x_t, t, context, pad_mask) -> list:
        """Per cross-attention layer of one eps forward pass (x_t (B, 3, H, W), t (B,), context
        (B, L, D), pad_mask (B, L)): weights of image positions over text tokens (B, heads, h * w,
        L) at the layer's h x w resolution; rows sum to 1, no weight on padding."""
        return self.module("text_conditioning").cross_attention_maps(model, x_t, t, context, pad_mask)

    @capability("m5")
    def text2image_loss(self, model, images, ids, pad_mask):
        """Training loss on clean images (B, 3, H, W) in [-1, 1] with captions ids/pad_mask (B, L)
        (dropout already applied): (scalar loss, metrics dict). Draws t and the noise from the
        global torch RNG (the engine reseeds it every step)."""
        return model.loss(images, ids, pad_mask)

    @capability("m5")
    def text2image_sample(self, model, prompts: list, sampling: dict, negative=None, seed: int | None = None,
                          generator=None, n: int = 1, bf16: bool = True, progress: bool = False):
        """Sample with classifier-free guidance: P prompts, each ``n`` times (prompt-major) ->
        uint8 (P * n, 3, H, W). ``sampling``: guidance, sampler ("ddim" | "ddpm"), steps, eta
        (``text2image.SamplingConfig`` fields). ``seed`` gives image i its own stream (seed, i),
        so it depends only on its prompt and seed; or ``generator``: one, or one per image.
        ``negative`` (one string or P) replaces the unconditional branch."""
        return model.sample_images(prompts, negative=negative, seed=seed, generator=generator, n=n, bf16=bf16,
                                   progress=progress, **sampling)
    # ---------------------------------------------------------------- end of m5



    # ================================================================ m6: audio
    # Waveforms cross the seam as float (B, T) in [-1, 1] at 16 kHz, zero-padded, with their
    # lengths (B,) in samples; the grader's speech data (eval.reference.data.speech) makes them.
    @capability("m6")
    def audio_mel_filterbank(self, config: dict):
        """The triangular mel filters (n_mels, n_fft // 2 + 1) of a front-end config dict
        (``audio.features.LogMelConfig`` fields: sample_rate, n_fft, hop, n_mels, f_min, f_max,
        htk, slaney_norm, floor, normalize)."""
        f = self.module("audio.features")
        return f.mel_filterbank(f.LogMelConfig(**config))

    @capability("m6")
    def audio_log_mel(self, config: dict, waves, lengths=None, power: bool = False):
        """The front end: waves (B, T), lengths (B,) -> log-mel (B, n_mels, 1 + T // hop)
        (per-utterance normalised when the config says so; frames past an utterance's end 0), or
        with ``power`` the mel power spectrogram before the log."""
        f = self.module("audio.features")
        front = f.LogMel(f.LogMelConfig(**config))
        return front.power_mel(waves) if power else front(waves, lengths)

    @capability("m6")
    def audio_frame_lengths(self, lengths, hop: int):
        """Samples (B,) -> frames (B,) of the centred STFT, ``1 + L // hop``."""
        return self.module("audio.features").frame_lengths(lengths, hop)

    @capability("m6")
    def audio_spec_augment(self, feats, generator, config: dict, frame_lengths=None):
        """SpecAugment masks: features (B, n_mels, F) -> masked copy; ``config``:
        ``audio.augment.SpecAugmentConfig`` fields; time masks stay inside ``frame_lengths`` (B,)."""
        a = self.module("audio.augment")
        return a.spec_augment(feats, generator, a.SpecAugmentConfig(**config), frame_lengths)

    @capability("m6")
    def audio_tower_build(self, config: dict):
        """An AST tower from its config dict (``audio.tower.AudioTowerConfig`` fields: n_mels,
        patch_freq, patch_time, max_frames, dim, depth, n_heads, mlp_ratio, dropout)."""
        t = self.module("audio.tower")
        return t.AudioTower(t.AudioTowerConfig(**config))

    @capability("m6")
    def audio_tower(self, tower, feats, n_frames=None):
        """feats (B, n_mels, F), frame counts (B,) -> (CLS (B, D), tokens (B, N, D), padding mask
        (B, N) True = past the end); nothing of an utterance depends on what pads it."""
        out = tower(feats, n_frames)
        return out.cls, out.tokens, out.padding_mask

    @capability("m6")
    def audio_build(self, config: dict):
        """The m6 audio model from its config dict (``audio.model.AudioModelConfig`` fields):
        front end + AST tower with an embedding head into a CLIP's space and an m3-style
        transcription decoder. Returns an nn.Module."""
        return self.module("audio.model").build_model(config)

    @capability("m6")
    def audio_pairs(self, model, waves: list, image_emb, text_emb, ids, keys=None):
        """The training batch maker: per utterance a (T_i,) waveform, the frozen CLIP embeddings
        (N, E) of its scene and its transcript, transcript ids (N, L) and optional duplicate keys
        (N,). ``len() == N``; ``get_batch(idx (B,), generator) -> dict`` for :meth:`audio_loss`."""
        return self.module("audio.model").SpokenPairs(model, waves, image_emb, text_emb, ids, keys)

    @capability("m6")
    def audio_loss(self, model, batch: dict, asr_weight: float):
        """Symmetric InfoNCE audio-image and audio-text (averaged) + ``asr_weight`` x teacher-forced
        transcript cross-entropy, on an :meth:`audio_pairs` batch -> (0-d loss, metrics dict)."""
        return self.module("audio.model").audio_loss(model, batch, asr_weight)

    @capability("m6")
    def audio_encode(self, model, waves, lengths):
        """waves (B, T), lengths (B,) -> (B, E) unit vectors in the CLIP space. Each utterance's
        embedding depends on that utterance only (not on the padding of the batch)."""
        return model.encode_audio(waves, lengths)

    @capability("m6")
    def audio_logit_scale(self, model):
        """The audio model's learned logit scale (0-d tensor, 1 / temperature, clamped)."""
        return model.scale()

    @capability("m6")
    def audio_transcribe(self, model, waves, lengths, beam: int = 1, max_len: int | None = None,
                         alpha: float = 0.6):
        """Speech recognition: waves (B, T), lengths (B,) -> ids (B, L) <bos> .. <eos>,
        right-padded; greedy at ``beam=1``, else beam search (GNMT length normalisation)."""
        if beam == 1:
            return model.greedy(waves, lengths, max_len=max_len)
        return model.beam_search(waves, lengths, beam=beam, max_len=max_len, alpha=alpha)

    @capability("m6")
    def audio_cross_attention(self, model, waves, lengths, ids):
        """Where in time the decoder listened: ids (B, L) as transcribed -> (B, L - 1, time
        patches) attention mass; row k belongs to token ``ids[:, k + 1]``."""
        return model.cross_attention(waves, lengths, ids)
    # ---------------------------------------------------------------- end of m6

    # ================================================================ m7: self-supervised representations
    @capability("m7")
    def ssl_build(self, config: dict):
        """A self-supervised model from its config dict (``ssl.SSLConfig`` fields: method
        "simclr" | "moco", encoder "vit" | "resnet18" | "resnet50", image_size, the ViT's
        patch_size, dim, depth, n_heads, mlp_ratio, proj_hidden, proj_dim, temperature,
        queue_size, momentum). Returns an nn.Module."""
        ssl = self.module("ssl")
        return ssl.SSLModel(ssl.SSLConfig(**config))

    @capability("m7")
    def ssl_views(self, images, generator, views: dict):
        """Two random views of each image: uint8 (B, 3, H, W) -> float (B, 2, 3, H, W) in [-1, 1],
        drawn from ``generator`` (a torch.Generator, or an int: a fresh one seeded with it);
        ``views`` holds ``views.ViewConfig`` fields (crop scale and ratio, flip, colour jitter
        probability and strengths, grayscale, blur)."""
        v = self.module("views")
        if isinstance(generator, int):
            import torch
            generator = torch.Generator().manual_seed(generator)
        return v.two_views(images, generator, v.ViewConfig(**views))

    @capability("m7")
    def ssl_loss(self, model, views):
        """The method's contrastive loss on a batch of view pairs (B, 2, 3, H, W) -> (0-d loss,
        metrics dict with "pos_acc": the share of views whose positive scores highest). SimCLR:
        NT-Xent over the 2B views; MoCo v2: InfoNCE against the momentum keys and the queue
        (which it then updates)."""
        return model.loss(views)

    @capability("m7")
    def ssl_features(self, model, images):
        """images (B, 3, H, W) float in [-1, 1] -> the representation (B, D) a probe reads: the
        encoder's output, before the projection head. Each image's features depend on that
        image only (the model in eval mode)."""
        return model.features(images)

    @capability("m7")
    def ssl_nt_xent(self, z, temperature: float):
        """NT-Xent (SimCLR eq. 1): projections z (2N, D), rows i and N + i positives -> (0-d loss:
        mean over the 2N anchors of the cross-entropy of the positive among the other 2N - 1
        views at cosine / temperature, metrics dict)."""
        return self.module("ssl").nt_xent(z, temperature)

    @capability("m7")
    def ssl_momentum_update(self, model):
        """MoCo: move the key encoder and head towards the query ones (theta_k <- m theta_k +
        (1 - m) theta_q)."""
        model.momentum_update()

    @capability("m7")
    def ssl_queue(self, model):
        """MoCo: the queue of negative keys (K, proj_dim) and the index the next key is written
        to (0-d long): views into the model's buffers."""
        return model.queue, model.queue_ptr
    # ---------------------------------------------------------------- end of m7




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
