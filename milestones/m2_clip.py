"""m2 — CLIP: a shared image/text embedding space learned contrastively.

Acceptance: two towers that share no weights (a ViT or CNN image tower, a transformer text tower
over a tokenizer learned from the training captions) are trained with the symmetric InfoNCE loss
and a learnable, clamped temperature; gradient accumulation keeps the negatives of the whole
effective batch (GradCache); known duplicates in a batch are masked out of the softmax
denominators. The model classifies zero-shot from text prompts on classes it never saw
(held-out (colour, shape) compositions; CIFAR-10 in the full profile) and retrieves images from
text and text from images. Probes measure what it does not understand (relations, binding, count).

What the implementation must provide: the m2 section of :mod:`milestones.adapters` (the report's
Interface section is generated from it).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from eval.clip_controls import GateEmbeddings
from eval.clip_figures import figure_set
from eval.probes import run_probes
from eval.reference.data.world import (RGB, WorldConfig, canonical_caption, composition_classes,
                                       composition_label, scene_row)
from eval.retrieval import image_to_image_topk, image_to_text_recall, text_to_image_recall, zero_shot_topk
from eval.reference.images import resize_uint8  # the grader's pixel conversion
from eval.validation import hold_out_last, record
from milestones.adapters import CANDIDATE, Implementation
from milestones.base import Criterion, Milestone, RunContext, RunResult
from milestones.m2_checks import (CONTROLS, FULL_UNTRAINED_N, GATES, PITFALLS, measure_controls, measure_symptoms,
                                  untrained_clip)
from milestones.common import (DataMissingError, batched, config_errors, data_root, load_into, read_checkpoint,
                               train_config, world_split)

# ------------------------------------------------------------------ thresholds (the one place)
THRESHOLDS = {
    # issue: zero-shot top-5 > 0.60 and text->image R@10 > 0.50; raised to what a correct run clears.
    # Chance: top-5 of 80 compositions 0.0625, top-1 0.0125; R@10 of 2,000 images 0.005.
    # Calibrated (results/calibration/m2.md: (seed, world seed) = (0,0), (1,1), (2,2), rule: at
    # least max(3 sd, 2 %) below the worst honest run, above the best control):
    # top-5 0.933 / 0.896 / 0.918 (sd 0.019; 0.80 is 5.2 sd below the worst; best control 0.116);
    # R@10 0.9691 / 0.9619 / 0.9243 (sd 0.024; 0.85 is 3.1 sd below; best control 0.0066);
    # top-1 0.521 / 0.364 / 0.424 (sd 0.079): first set to 0.25 from one run, which is only 1.4 sd
    # below the worst; lowered to the rule's bound, 0.126 (3 sd below the worst run; 10.1x chance,
    # above the best control 0.087; tests/test_m2_gates.py keeps it above 10x chance).
    "quick": {"zeroshot_top5": 0.80, "zeroshot_top1": 0.126, "t2i_R@10": 0.85},
    # the spec: CIFAR-10 zero-shot top-5 > 60 %; COCO val2017 (5k images) text->image R@10 > 50 %.
    # Chance: top-5 of CIFAR-10's 10 classes 0.50 (a constant embedding scores exactly that; an
    # untrained full-size CLIP 0.4495), top-1 0.10; R@10 of 5,000 images 0.002.
    # zeroshot_top1 (issue 23, not a spec number): provisional: calibrated by benchmarks/calibrate.py --
    # 2x chance, 15 binomial standard deviations above it at 2,000 images; no full run measured yet.
    "full": {"zeroshot_top5": 0.60, "zeroshot_top1": 0.20, "t2i_R@10": 0.50},
}
# Points per gate (--format gradescope; a failed gate costs its own). Hidden: zero-shot top-1, so
# the public feedback does not say how far past chance the model must rank the right class first.
POINTS = {"zeroshot_top5": 4, "zeroshot_top1": 2, "t2i_R@10": 4}
HIDDEN = ("zeroshot_top1",)

TEMPLATES = ("a photo of a {}", "a {}", "a picture of a {}", "there is a {}", "a small {}", "a large {}")
SINGLE_PROMPT = TEMPLATES[0]


# ------------------------------------------------------------------ training recipes
@dataclass
class M2Recipe:
    data: str = "world"  # "world" (embedded) or "coco" (COCO captions + CIFAR-10 zero-shot)
    n_train: int | None = 50_000  # None = the whole training split
    n_test: int | None = 2_000
    n_heldout: int | None = 1_000
    n_val: int = 1_000  # validation images, what recipes are chosen on: the world's val split / COCO's last train2017 images
    model: dict = field(default_factory=lambda: dict(
        image_tower="vit", image_size=32, patch_size=8, vision_dim=96, vision_depth=4, vision_heads=4,
        context_length=32, text_dim=96, text_depth=2, text_heads=4, mlp_ratio=2.0, embed_dim=96))
    min_freq: int = 1  # tokenizer: words seen fewer times map to <unk>
    steps: int = 500
    batch_size: int = 256
    grad_accum: int = 1  # > 1: GradCache micro-batches (same loss and gradient, less memory)
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    bf16: bool = False
    mask_duplicates: bool = True
    max_minutes: float | None = None  # optional time budget (steps are sized for ~2.5 min idle)


RECIPES = {
    "quick": M2Recipe(),
    "full": M2Recipe(data="coco", n_train=None, n_test=None, n_heldout=None, n_val=1_000, min_freq=5,
                     model=dict(image_tower="vit", image_size=64, patch_size=8, vision_dim=384, vision_depth=8,
                                vision_heads=6, context_length=40, text_dim=256, text_depth=4, text_heads=4,
                                mlp_ratio=4.0, embed_dim=256),
                     steps=20_000, batch_size=1024, grad_accum=4, lr=5e-4, weight_decay=0.1,
                     warmup_steps=1000, bf16=True, max_minutes=None),
}

# --smoke: the same run path with a few GradCache steps (proves the path, not quality). The full
# one reads a small COCO copy (the shared coco-mini, 80 train / 159 val images) and CIFAR-10.
SMOKE_RECIPES = {
    "quick": replace(RECIPES["quick"], n_train=2000, n_test=200, n_heldout=100, n_val=100, steps=6, batch_size=32,
                     grad_accum=2, warmup_steps=2),
    "full": replace(RECIPES["quick"], data="coco", n_train=None, n_test=None, n_heldout=None, n_val=16, steps=6,
                    batch_size=32, grad_accum=2, warmup_steps=2),
}


# ------------------------------------------------------------------ embedding through the seam
@contextmanager
def _eval_mode(model):
    """Evaluate ``model`` in eval mode, restoring its train/eval state afterwards."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def embed_images(model, images: torch.Tensor, impl: Implementation = CANDIDATE) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> (N, E) unit vectors on the CPU: pixels converted by the grader, 500
    images per batch on the model's device, in eval mode."""
    dev = next(model.parameters()).device
    with _eval_mode(model):
        return batched(lambda x: impl.clip_encode_images(model, x.to(dev)).cpu(), images)


@torch.no_grad()
def embed_texts(model, tok, texts: list[str], impl: Implementation = CANDIDATE,
                batch_size: int = 1000) -> torch.Tensor:
    """T strings -> (T, E) unit vectors on the CPU: ``batch_size`` texts at a time, each batch
    tokenised to its longest text (at most the model's context length), in eval mode."""
    dev, length = next(model.parameters()).device, impl.clip_context_length(model)
    out = []
    with _eval_mode(model):
        for i in range(0, len(texts), batch_size):
            ids, pad = impl.clip_tokenize(tok, texts[i:i + batch_size], length)
            out.append(impl.clip_encode_texts(model, ids.to(dev), pad.to(dev)).cpu())
    return torch.cat(out)


def temperature_stats(model, impl: Implementation = CANDIDATE) -> dict[str, float]:
    """{"temperature": T, "logit_scale": 1 / T} of a CLIP, as reported."""
    scale = float(impl.clip_logit_scale(model).detach())
    return {"temperature": 1.0 / scale, "logit_scale": scale}


# ------------------------------------------------------------------ training
def world_image_keys(scenes: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) id of each scene's canonical caption: equal ids = scenes that mean the same thing."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(canonical_caption(scene_row(scenes, i)), len(index))
                         for i in range(len(scenes["shape"]))])


def clip_model_config(recipe: M2Recipe, tok) -> dict:
    """The CLIP config dict of ``recipe`` with the tokenizer's vocabulary size."""
    return {**recipe.model, "vocab_size": len(tok)}


def train_clip(recipe: M2Recipe, train_split, seed: int = 0, out_dir=None, progress: bool = True,
               device: str = "cpu", on_init=None, extra: dict | None = None, *,
               impl: Implementation = CANDIDATE, log_every: int = 25):
    """Learn a tokenizer from ``train_split``'s captions and train ``impl``'s CLIP with its engine.

    Args:
        recipe: model dict and optimisation recipe.
        train_split: DataSplit with captions (world splits also give duplicate keys via meta["scenes"]).
        out_dir: where the trainer writes checkpoint.pt and metrics.jsonl (None = nowhere).
        on_init: optional ``fn(model, tokenizer)`` called before the first step (e.g. to embed
            a few items for the before/after figure).
        extra: more plain data for the checkpoint's ``extra`` (e.g. where the retrieval index lives).
        impl: the implementation trained (m5 trains its judge with ``REFERENCE``, the grader's own).
        log_every: steps per logged point (the summary's ``loss_curve``).
    Returns:
        (model in eval mode, tokenizer, trainer summary + temperature and duplicate statistics).
    """
    tok = impl.tokenizer_train([c for cs in train_split.captions for c in cs], min_freq=recipe.min_freq)
    model_config = clip_model_config(recipe, tok)
    torch.manual_seed(seed)
    model = impl.clip_build(model_config)
    scenes = train_split.meta.get("scenes")
    keys = world_image_keys(scenes) if scenes is not None else None
    pairs = impl.clip_pairs(train_split.images, train_split.captions, tok, impl.clip_context_length(model), keys)
    if on_init is not None:
        on_init(model, tok)

    def get_batch(idx, g):
        batch = pairs.get_batch(idx, g)
        if not recipe.mask_duplicates:
            batch.pop("image_key"), batch.pop("text_key")
        return batch

    cfg = train_config(recipe, seed=seed, out_dir=out_dir, device=device, progress=progress, log_every=log_every)
    extra = {"tokenizer": impl.tokenizer_state(tok), "train_data": train_split.name, **(extra or {})}
    trainer = impl.trainer(model, cfg, step_fn=impl.clip_train_step, data_size=len(pairs), get_batch=get_batch,
                           kind="clip", model_config=model_config, extra=extra)
    summary = trainer.fit()
    model = trainer.eval_model().eval()
    summary.update(**temperature_stats(model, impl), vocab_size=len(tok),
                   n_unique_image_keys=int(keys.unique().numel()) if keys is not None else len(pairs))
    return model, tok, summary


def load_clip(path, *, impl: Implementation = CANDIDATE):
    """(model in eval mode, tokenizer, checkpoint dict) from a checkpoint of kind "clip": the
    grader reads the file (EMA weights when kept) and loads it into ``impl``'s CLIP."""
    ck = read_checkpoint(path, "clip")
    model = load_into(path, ck, impl.clip_build, required_extra=("tokenizer",))
    with config_errors(path, "extra['tokenizer']"):
        tok = impl.tokenizer_load(ck["extra"]["tokenizer"])
    return model.eval(), tok, ck


# ------------------------------------------------------------------ metrics
def class_embeddings(model, tok, classnames: list[str], templates=TEMPLATES,
                     impl: Implementation = CANDIDATE) -> torch.Tensor:
    """Zero-shot classifier (C, E): per class the normalised mean of its normalised prompt
    embeddings (the CLIP paper's prompt ensemble; one template = a single prompt)."""
    emb = torch.stack([embed_texts(model, tok, [t.format(c) for c in classnames], impl) for t in templates])
    return F.normalize(emb.mean(dim=0), dim=-1)


def zero_shot(model, tok, image_emb, labels, classnames, impl: Implementation = CANDIDATE
              ) -> tuple[dict[str, float], torch.Tensor]:
    """Top-1/top-5 with the prompt ensemble and with the single prompt ``a photo of a {class}``.
    Returns (metrics, the ensemble classifier (C, E))."""
    classifier = class_embeddings(model, tok, classnames, impl=impl)
    ens = zero_shot_topk(image_emb, classifier, labels)
    one = zero_shot_topk(image_emb, class_embeddings(model, tok, classnames, (SINGLE_PROMPT,), impl), labels)
    return {"zeroshot_top1": ens["top1"], "zeroshot_top5": ens["top5"],
            "zeroshot_single_prompt_top1": one["top1"], "zeroshot_single_prompt_top5": one["top5"]}, classifier


def caption_queries(captions: list[list[str]]) -> tuple[list[str], torch.Tensor]:
    """Every caption of every image as a query: (T texts, (T,) long index of each one's image)."""
    return [c for cs in captions for c in cs], torch.tensor([i for i, cs in enumerate(captions) for _ in cs])


def retrieval(model, tok, split, impl: Implementation = CANDIDATE
              ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text->image and image->text recall@1/5/10 over every caption of ``split``.
    Returns (metrics, image_emb (N, E), text_emb (T, E), text_to_image (T,))."""
    texts, t2i = caption_queries(split.captions)
    img, txt = embed_images(model, split.images, impl), embed_texts(model, tok, texts, impl)
    a, b = text_to_image_recall(txt, img, t2i), image_to_text_recall(img, txt, t2i)
    metrics = {**{f"t2i_{k}": a[k] for k in ("R@1", "R@5", "R@10", "median_rank")},
               **{f"i2t_{k}": b[k] for k in ("R@1", "R@5", "R@10", "median_rank")},
               "n_text_queries": len(texts), "n_gallery_images": len(img)}
    return metrics, img, txt, t2i


def composition_names() -> list[str]:
    """The 80 (colour, shape) class names of the world's zero-shot, in label order."""
    return [f"{c} {s}" for c, s in composition_classes()]


def evaluate_world(model, tok, test, heldout, impl: Implementation = CANDIDATE) -> tuple[dict, dict, GateEmbeddings]:
    """All quick-profile numbers: zero-shot on held-out compositions (scored among all 80),
    retrieval on the test split, image->image P@k (same composition), probes.
    -> (metrics, info, the embeddings the gates were computed from)."""
    names, labels = composition_names(), composition_label(heldout.meta["scenes"])
    zs_img = embed_images(model, heldout.images, impl)
    metrics, classifier = zero_shot(model, tok, zs_img, labels, names, impl)
    r, img, txt, t2i = retrieval(model, tok, test, impl)
    metrics.update(r)
    scenes = test.meta["scenes"]
    single = scenes["n_objects"] == 1
    seen, _ = zero_shot(model, tok, img[single], composition_label(scenes)[single], names, impl)
    metrics.update({f"seen_{k}": v for k, v in seen.items()})
    i2i = image_to_image_topk(img[single], composition_label(scenes)[single])
    metrics.update({f"i2i_{k}": i2i[k] for k in ("P@1", "P@5", "P@10")})
    probes = run_probes(img, scenes, lambda texts: embed_texts(model, tok, texts, impl))
    metrics.update({f"probe_{p}": v["rate"] for p, v in probes.items()})
    metrics.update(temperature_stats(model, impl))
    info = {"probes": probes, "probe_chance": 0.5,
            "zeroshot_protocol": f"{len(heldout)} held-out single-object images, classes = all {len(names)} "
                                 f"(colour, shape) compositions, prompt ensemble {list(TEMPLATES)}",
            "i2i_protocol": f"{int(single.sum())} single-object test images, relevant = same (colour, shape)"}
    return metrics, info, GateEmbeddings(zs_img, classifier, labels, txt, img, t2i)


def validate_world(model, tok, val, impl: Implementation = CANDIDATE) -> dict:
    """What quick recipes are chosen on (:func:`eval.validation.record`): on the world's val split,
    retrieval with every caption a query, and zero-shot among all 80 compositions on its
    single-object images (seen compositions: the held-out ones are the test's)."""
    r, img, _, _ = retrieval(model, tok, val, impl)
    scenes = val.meta["scenes"]
    single = scenes["n_objects"] == 1
    zs, _ = zero_shot(model, tok, img[single], composition_label(scenes)[single], composition_names(), impl)
    metrics = {"val_t2i_R@10": r["t2i_R@10"], "val_i2t_R@10": r["i2t_R@10"],
               "val_zeroshot_top1": zs["zeroshot_top1"], "val_zeroshot_top5": zs["zeroshot_top5"]}
    return record(val.name, len(val), metrics, f"retrieval over its {len(val)} images and {r['n_text_queries']} "
                  f"captions (ties against the query); zero-shot on its {int(single.sum())} single-object images "
                  f"among all 80 compositions, prompt ensemble")


# ------------------------------------------------------------------ controls and symptoms
def gate_embeddings(model, tok, zs_images, zs_labels, classnames, ret_images, ret_captions,
                    impl: Implementation = CANDIDATE) -> GateEmbeddings:
    """What the gates are computed from, for ``model``: uint8 zero-shot images (N, 3, H, W) with
    labels (N,) among ``classnames`` (prompt ensemble), uint8 gallery images (G, 3, H, W) with
    their captions (G lists) as the text queries."""
    texts, t2i = caption_queries(ret_captions)
    return GateEmbeddings(embed_images(model, zs_images, impl), class_embeddings(model, tok, classnames, impl=impl),
                          zs_labels, embed_texts(model, tok, texts, impl), embed_images(model, ret_images, impl), t2i)


def controls_and_symptoms(model, tok, model_config, trained: GateEmbeddings, untrained_data: tuple,
                          ctx: RunContext, summary: dict | None, warmup_steps: int) -> tuple[dict, dict, float]:
    """Both, timed: ``untrained_data`` is :func:`gate_embeddings`' data after (model, tok).
    Returns (controls, symptoms, seconds)."""
    t0 = time.perf_counter()
    fresh = untrained_clip(model_config, ctx.seed, ctx.device)
    controls = measure_controls(trained, gate_embeddings(fresh, tok, *untrained_data), ctx.seed)
    symptoms = measure_symptoms(model, fresh, model_config, summary, warmup_steps)
    for name, values in controls.items():
        ctx.log(f"control {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return controls, symptoms, time.perf_counter() - t0


# ------------------------------------------------------------------ figures
def make_figures(model, tok, split, ctx: RunContext, before=None, impl: Implementation = CANDIDATE) -> list[str]:
    """The figure set of :func:`eval.clip_figures.figure_set` on ``split`` (world splits add
    duplicate gold frames, same-composition frames and object colours)."""
    scenes = split.meta.get("scenes")
    world = {} if scenes is None else {"keys": world_image_keys(scenes), "labels": composition_label(scenes),
                                       "colours": RGB[scenes["colour"][:, 0]] / 255}
    figs = figure_set(split.images, split.captions, lambda x: embed_images(model, x, impl),
                      lambda texts: embed_texts(model, tok, texts, impl), ctx.path, before=before, **world)
    return [str(f) for f in figs]


# ------------------------------------------------------------------ data (full profile)
COCO_NEEDED = ("m2 full profile needs COCO 2017 captions: <data-root>/coco/{train2017,val2017}/ images and "
               "annotations/captions_{train2017,val2017}.json (from https://cocodataset.org/#download), and "
               "CIFAR-10 at <data-root>/cifar10 (or add --download for CIFAR-10)")
CIFAR_NEEDED = "m2 full profile needs CIFAR-10 for zero-shot: pass --data-root holding cifar10/ (or add --download)"


def coco_root(ctx: RunContext) -> Path:
    """The COCO folder (holding annotations/captions_train2017.json): ``--data-root`` or the
    shared data's ``coco`` (``coco-mini`` for a smoke run), itself or its coco/, coco2017/."""
    sub = "coco-mini" if ctx.smoke else "coco"
    base = data_root(ctx, sub, COCO_NEEDED + "; no --data-root was given")
    for c in (base / sub, base / "coco2017", base):
        if (c / "annotations" / "captions_train2017.json").is_file():
            return c
    raise DataMissingError(COCO_NEEDED + f"; nothing found under {base}")


def load_full_data(ctx: RunContext, recipe: M2Recipe, need_train: bool = True):
    """(coco train2017 or None, coco val2017 (5k), cifar10 test, validation or None) from the
    grader's loaders — all checked before any training. The validation images are the last
    ``recipe.n_val`` of train2017, held out of training (None when evaluating a checkpoint: no
    training images are loaded). A smoke run takes a small copy's val2017 as it is."""
    from eval.reference.data.cifar import load_cifar10
    from eval.reference.data.coco import load_coco_captions
    root, size = coco_root(ctx), recipe.model["image_size"]
    val = load_coco_captions(root, "val2017", size, limit=recipe.n_test)
    if recipe.n_test is None and len(val) < 5000 and not ctx.smoke:
        raise DataMissingError(f"COCO val2017 at {root} has {len(val)} of the 5,000 images the full-profile "
                               f"gate is measured on; for a small copy such as coco-mini run "
                               f"`python grader.py m2 --profile full --smoke --data-root <folder>` instead")
    cifar = load_cifar10(data_root(ctx, "cifar10", CIFAR_NEEDED), "test", download=ctx.download,
                         expect_full=not ctx.smoke)
    train = load_coco_captions(root, "train2017", size, limit=recipe.n_train) if need_train else None
    held = None
    if train is not None and recipe.n_val:  # validation: the last n_val training images, never trained on
        train, held = hold_out_last(train, recipe.n_val)
    return train, val, cifar, held


# ------------------------------------------------------------------ the milestone
DUPLICATES = ("Known duplicates are masked, not used as negatives: each batch item carries an image key "
              "(world: the scene's canonical description; COCO: the image) and a text key (the exact "
              "normalised caption); off-diagonal pairs sharing either key are removed from both softmax "
              "denominators. Near-duplicates that neither key catches (a caption that omits the size "
              "against a scene differing only in size; paraphrases) remain negatives.")
ACCUMULATION = ("GradCache: embed all micro-batches without grad, compute the loss over the full effective "
                "batch on the cached embeddings, then re-run each micro-batch with grad (same RNG state) and "
                "back-propagate the cached embedding gradients: every item sees the negatives of the whole "
                "effective batch; gradient equals the no-accumulation gradient (tests/test_clip.py).")


class M2(Milestone):
    id = "m2"
    checkpoint_kind = "clip"  # what --checkpoint must be (read first by grader.cli.check_usage)
    title = "CLIP: contrastive image/text embeddings"
    marker = "m2"
    test_files = ("tests/test_clip.py", "tests/test_m2_gates.py")
    criteria = (
        Criterion("word tokenizer learned from training captions (specials, padding, unk, save/load)",
                  "test:tests/test_clip.py::test_tokenizer_shapes_and_roundtrip"),
        Criterion("text tower (transformer, EOT/CLS pool) and ViT/CNN image tower, projected, L2-normalised, "
                  "no shared weights", "test:tests/test_clip.py::test_towers_shapes_and_no_shared_weights"),
        Criterion("symmetric InfoNCE equals its definition on a hand-computed 4x4 example",
                  "test:tests/test_clip.py::test_loss_hand_computed_4x4"),
        Criterion("loss symmetric in the two modalities", "test:tests/test_clip.py::test_loss_symmetry"),
        Criterion("learnable temperature, log logit-scale init 1/0.07, clamped at 100",
                  "test:tests/test_clip.py::test_temperature_init_and_clamp"),
        Criterion("duplicate pairs masked out of the denominators",
                  "test:tests/test_clip.py::test_duplicate_mask_removes_false_negatives"),
        Criterion("GradCache accumulation gives the no-accumulation gradient",
                  "test:tests/test_clip.py::test_gradcache_equals_full_batch_gradient"),
        Criterion("recall@K and zero-shot metrics on constructed embeddings",
                  "test:tests/test_clip.py::test_retrieval_and_zero_shot_metrics_known_answers"),
        Criterion("gates fail for an untrained model and for planted bugs", "test:tests/test_m2_gates.py"),
        Criterion("zero-shot top-5 on unseen classes", "gate:zeroshot_top5"),
        Criterion("zero-shot top-1 on unseen classes, well above chance", "gate:zeroshot_top1"),
        Criterion("text->image recall@10", "gate:t2i_R@10"),
    )
    gates = GATES
    controls = CONTROLS
    pitfalls = PITFALLS
    thresholds = THRESHOLDS
    points = POINTS
    hidden_gates = HIDDEN
    recipes = RECIPES
    data_needed = {"quick": "none (embedded world)",
                   "full": "COCO 2017 captions (train2017 + val2017 images, annotations/captions_*.json) at "
                           "<data-root>/coco and CIFAR-10 at <data-root>/cifar10 (or --download for CIFAR-10)"}

    smoke_recipes = SMOKE_RECIPES

    def run(self, ctx: RunContext) -> RunResult:
        recipe = self.recipe(ctx)
        return run_full(ctx, recipe) if ctx.profile == "full" else run_quick(ctx, recipe)


def _train_or_load(ctx, recipe, train, extra, before_items=None, impl: Implementation = CANDIDATE):
    """Train (or load ctx.checkpoint). Returns (model, tok, ckpt path, info, before-embeddings, model config)."""
    before = {}

    def on_init(model, tok):
        if before_items is not None:
            imgs, caps = before_items
            before["emb"] = (embed_images(model, imgs, impl), embed_texts(model, tok, caps, impl))

    if ctx.checkpoint:
        model, tok, ck = load_clip(ctx.checkpoint, impl=impl)
        model = model.to(ctx.device)
        torch.manual_seed(ctx.seed)  # the "before" panel: a fresh init of the same architecture
        on_init(impl.clip_build(ck["model_config"]), tok)
        return model, tok, str(ctx.checkpoint), {"loaded_step": ck.get("step")}, before.get("emb"), ck["model_config"]
    t0 = time.perf_counter()
    model, tok, summary = train_clip(recipe, train, ctx.seed, ctx.out_dir, ctx.progress, ctx.device,
                                     on_init, extra, impl=impl)
    summary["train_call_s"] = time.perf_counter() - t0
    summary["duplicate_pairs_masked_share"] = summary["final_metrics"].get("masked_frac")
    return (model, tok, str(ctx.path("checkpoint.pt")), {"training": summary}, before.get("emb"),
            clip_model_config(recipe, tok))


def run_quick(ctx: RunContext, recipe: M2Recipe) -> RunResult:
    """Train on the embedded world (or load ``ctx.checkpoint``) and measure everything on it."""
    t0 = time.perf_counter()
    train = None if ctx.checkpoint else world_split(ctx, "train", recipe.n_train)  # evaluating only: not needed
    test, heldout = world_split(ctx, "test", recipe.n_test), world_split(ctx, "heldout", recipe.n_heldout)
    splits = [s for s in (train, test, heldout) if s is not None]
    ctx.log("data: " + ", ".join(f"{s.name} {len(s)}" for s in splits) + f" ({time.perf_counter() - t0:.1f} s)")
    index = {"dataset": "world", "split": "test", "n": len(test), "world_config": asdict(WorldConfig(seed=ctx.split_world_seed("test")))}
    model, tok, ckpt, info, before, model_config = _train_or_load(
        ctx, recipe, train, {"index": index}, (test.images[:300], [cs[0] for cs in test.captions[:300]]))
    t1 = time.perf_counter()
    metrics, more, emb = evaluate_world(model, tok, test, heldout)
    eval_s = time.perf_counter() - t1
    controls, symptoms, controls_s = controls_and_symptoms(
        model, tok, model_config, emb, (heldout.images, emb.labels, composition_names(), test.images, test.captions),
        ctx, info.get("training"), recipe.warmup_steps)
    temp = temperature_stats(model)
    info.update(more, eval_s=eval_s, controls_s=controls_s, duplicates=DUPLICATES, accumulation=ACCUMULATION, **temp)
    ctx.log(f"temperature {temp['temperature']:.4f} (logit scale {temp['logit_scale']:.1f}); "
            f"zero-shot top-5 {metrics['zeroshot_top5']:.3f}, t2i R@10 {metrics['t2i_R@10']:.3f}")
    figs = make_figures(model, tok, test, ctx, before)
    validation = {}
    if recipe.n_val:  # after every gate number: the test split is measured as if this were not here
        val = world_split(ctx, "val", recipe.n_val)
        splits.append(val)
        validation = validate_world(model, tok, val)
        ctx.log("validation: " + ", ".join(f"{k} {v:.3f}" for k, v in validation["metrics"].items()))
    return RunResult(metrics=metrics, info=info, datasets=[s.summary() for s in splits], checkpoint=ckpt,
                     config={"recipe": asdict(recipe), "profile": "quick"}, figures=figs,
                     controls=controls, symptoms=symptoms, validation=validation)


def run_full(ctx: RunContext, recipe: M2Recipe) -> RunResult:
    """Train on COCO train2017 (or load ``ctx.checkpoint``); retrieval on val2017, zero-shot on CIFAR-10."""
    from eval.reference.data.cifar import CIFAR10_CLASSES
    train, val, cifar, held = load_full_data(ctx, recipe, need_train=not ctx.checkpoint)
    splits = [s for s in (train, val, cifar, held) if s is not None]
    ctx.log("data: " + ", ".join(f"{s.name} {len(s)}" for s in splits))
    index = {"dataset": "coco", "split": "val2017", "root": str(coco_root(ctx))}
    model, tok, ckpt, info, before, model_config = _train_or_load(
        ctx, recipe, train, {"index": index}, (val.images[:300], [cs[0] for cs in val.captions[:300]]))
    metrics, img, txt, t2i = retrieval(model, tok, val)
    size, classes = recipe.model["image_size"], list(CIFAR10_CLASSES)
    cimg = embed_images(model, resize_uint8(cifar.images, size))
    zs, classifier = zero_shot(model, tok, cimg, cifar.labels, classes)
    metrics.update(zs)
    n_val, n_cifar = FULL_UNTRAINED_N["coco_val"], FULL_UNTRAINED_N["cifar"]
    controls, symptoms, controls_s = controls_and_symptoms(
        model, tok, model_config, GateEmbeddings(cimg, classifier, cifar.labels, txt, img, t2i),
        (resize_uint8(cifar.images[:n_cifar], size), cifar.labels[:n_cifar], classes, val.images[:n_val],
         val.captions[:n_val]), ctx, info.get("training"), recipe.warmup_steps)
    temp = temperature_stats(model)
    metrics.update(temp)
    info.update(duplicates=DUPLICATES, accumulation=ACCUMULATION, temperature=temp["temperature"],
                controls_s=controls_s)
    figs = make_figures(model, tok, val, ctx, before)
    validation = {"not_measured": "evaluating a --checkpoint: its training run held the validation images "
                                  "out (no training images are loaded now)"} if held is None else {}
    if held is not None:  # after every gate number
        r = retrieval(model, tok, held)[0]
        validation = record(held.name, len(held), {"val_t2i_R@10": r["t2i_R@10"], "val_i2t_R@10": r["i2t_R@10"]},
                            f"retrieval over its {len(held)} images and {r['n_text_queries']} captions, as the gate")
    return RunResult(metrics=metrics, info=info, datasets=[s.summary() for s in splits], checkpoint=ckpt,
                     config={"recipe": asdict(recipe), "profile": "full"}, figures=figs,
                     controls=controls, symptoms=symptoms, validation=validation)


MILESTONE = M2()
