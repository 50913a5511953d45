"""m7 — self-supervised image representations: SimCLR and MoCo v2, judged by a linear probe and kNN.

Acceptance: an encoder trained without labels (two random views of each image, NT-Xent over the
2N views or MoCo's InfoNCE against a momentum encoder's queue) whose frozen features let a
linear classifier and a k-nearest-neighbour vote recognise the images' classes, clearly better
than the same encoder untrained and than the raw pixels. The grader fits both probes itself
(:mod:`eval.representation`) on labels the training never saw.

Quick: the embedded world's single-object scenes (10 shapes), a small ViT. Full: CIFAR-10 with
a ResNet-18 (CIFAR stem), the SimCLR paper's small-scale setting (sec. B.9): a GPU recipe,
not measured on this project's CPUs.

What the implementation must provide: the m7 section of :mod:`milestones.adapters`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch

from eval.classification import confusion_matrix
from eval.validation import hold_out, record
from milestones.adapters import CANDIDATE, Implementation
from milestones.base import Criterion, Milestone, RunContext, RunResult
from milestones.common import data_root, load_into, read_checkpoint, train_config, world_split
from milestones.m7_checks import CONTROLS, GATES, PITFALLS, features, measure_controls, measure_symptoms, score_split

# ------------------------------------------------------------------ thresholds (the one place)
THRESHOLDS = {
    # quick: calibrated (results/calibration/m7.md, `python -m benchmarks.calibrate m7 --jobs 2` at
    # 53a2bc0 with the recipe of 2026-12-04 (temperature 0.1, no crop), (seed, world seed) = (0, 0),
    # (1, 1), (2, 2), one thread; chance 0.10). Linear probe 0.76 / 0.7035 / 0.727 (sd 0.028); best
    # control the raw pixels, 0.6365 (3,072 inputs to the logistic regression against the encoder's
    # 128). The rule (3 sd below the worst honest run, above the best control) cannot be met: the
    # gap between them, 0.067, is 2.4 sd. 0.65 stays: 0.0135 above the raw pixels, 0.0535 (1.9 sd)
    # below the worst run. (The recipe before, at 5218dbb: 0.6965 / 0.739 / 0.6945, the same control.)
    # kNN 0.7185 / 0.6065 / 0.6665 (sd 0.056; before 0.45-0.48): raised from the hand-set 0.40, which
    # cleared the raw pixels (0.3905) by 0.0095 only, to 0.43, under the rule's suggestion 0.4384:
    # 0.0395 above the raw pixels, 0.1765 (3.15 sd) below the worst run.
    # Untrained encoder: 0.45-0.47 / 0.16-0.19.
    "quick": {"linear_probe": 0.65, "knn_accuracy": 0.43},
    # full: SimCLR's small-scale CIFAR-10 result is 94.0 % linear evaluation (ResNet-50, 1,000
    # epochs, batch 4,096, appendix B.9); ResNet-18 reproductions at 800 epochs report ~0.90-0.91.
    # The full gate is 0.90 for the ResNet-18 recipe below; not measured here (no GPU).
    "full": {"linear_probe": 0.90, "knn_accuracy": 0.85},
}
POINTS = {"linear_probe": 6, "knn_accuracy": 4}


# ------------------------------------------------------------------ training recipes
@dataclass
class M7Recipe:
    data: str = "world"  # "world" (embedded) or "cifar10"
    n_train: int | None = 20_000  # images the encoder trains on, labels unused (None = the whole split)
    n_probe: int = 5_000  # labelled images (the first of the training split) the probes are fitted on
    n_val: int = 2_000  # what recipes are chosen on: the world's val split / CIFAR-10 training images held out
    n_test: int | None = 2_000
    model: dict = field(default_factory=lambda: dict(
        method="simclr", encoder="vit", image_size=32, patch_size=8, dim=128, depth=4, n_heads=4, mlp_ratio=2.0,
        pool="mean", proj_hidden=512, proj_dim=128, temperature=0.1))
    # the augmentation (mmsys.views.ViewConfig fields) and the temperature. Chosen on the world's val
    # split (linear probe / kNN of the probe features; untrained encoder 0.467 / 0.177, mean-pooled):
    # crop scale (0.2, 1) loses the small objects (0.43 / 0.14 after 300 x 256 steps); (0.8, 1) with
    # full-circle hue jitter (0.5) and jitter strength 0.8 gave 0.54 / 0.30 (300 x 256), 0.63 / 0.36
    # (600 x 128, CLS trained, mean probed), 0.69 / 0.50 (600 x 128, mean-pooled, temperature 0.5),
    # 0.70 / 0.44 (temperature 0.2, the recipe until 2026-12-04). Then the single-knob studies
    # (results/ssl_ablations/): temperature 0.05 0.740 / 0.541; no crop 0.714 / 0.725; and the two
    # combined (`python -m benchmarks.m7_recipe --temperature T --crop-min 1.0`, seed 0, at 9951791):
    # T 0.05 0.700 / 0.649, T 0.1 0.753 / 0.712 (this recipe). The crop is off: on 32x32 scenes whose
    # object may fill a ninth of the image even (0.8, 1) can cut it. Steps x batch at equal cost:
    # 600 x 128 beat 300 x 256.
    views: dict = field(default_factory=lambda: dict(crop_scale=(1.0, 1.0), brightness=0.8, contrast=0.8,
                                                     saturation=0.8, hue=0.5))
    steps: int = 600
    batch_size: int = 128  # images per step: 2 x 128 views, 254 negatives per anchor
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 60
    min_lr_ratio: float = 0.0
    bf16: bool = False
    max_minutes: float | None = None


RECIPES = {
    "quick": M7Recipe(),
    # SimCLR appendix B.9 on CIFAR-10 with a ResNet-18 (CIFAR stem), 800 epochs at batch 512 (AdamW in
    # place of LARS); views as the paper's CIFAR setting (colour strength 0.5, no blur)
    "full": M7Recipe(data="cifar10", n_train=None, n_probe=45_000, n_val=5_000, n_test=None,
                     model=dict(method="simclr", encoder="resnet18", image_size=32, proj_hidden=2048, proj_dim=128,
                                temperature=0.5),
                     views=dict(crop_scale=(0.08, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
                     steps=70_000, batch_size=512, lr=2e-3, weight_decay=1e-6, warmup_steps=1_000, bf16=True),
}
SMOKE_RECIPES = {
    "quick": replace(RECIPES["quick"], n_train=512, n_probe=256, n_val=128, n_test=128, steps=6, batch_size=32,
                     warmup_steps=2, model={**RECIPES["quick"].model, "dim": 32, "depth": 1, "proj_hidden": 64}),
    "full": replace(RECIPES["full"], n_probe=200, n_val=20, steps=4, batch_size=16, warmup_steps=1,
                    model={**RECIPES["full"].model, "proj_hidden": 64}),
}


# ------------------------------------------------------------------ data, training, loading
CIFAR_NEEDED = ("m7 full profile needs CIFAR-10: pass --data-root pointing at a cifar-10-batches-py folder, "
                "a train/test JPEG tree or cifar10-jpg.tar.gz")


def load_data(recipe: M7Recipe, ctx: RunContext):
    """(train, val, test) DataSplits from the grader's own loaders; the probe's labelled images
    are the first ``n_probe`` of train."""
    if recipe.data == "world":
        split = lambda name, n: world_split(ctx, name, n, single=True, captions=False)  # noqa: E731
        return split("train", recipe.n_train), split("val", recipe.n_val), split("test", recipe.n_test)
    from eval.reference.data.cifar import load_cifar10
    root = data_root(ctx, "cifar10", CIFAR_NEEDED)
    full = not ctx.smoke
    train, val = hold_out(load_cifar10(root, "train", download=ctx.download, expect_full=full), recipe.n_val)
    return train, val, load_cifar10(root, "test", download=ctx.download, expect_full=full)


def train(recipe: M7Recipe, train_split, ctx: RunContext, impl: Implementation = CANDIDATE):
    """Train ``impl``'s model on two views of each training image (labels unused). Returns
    (model in eval mode, trainer summary)."""
    torch.manual_seed(ctx.seed)
    model = impl.ssl_build(recipe.model)
    images = train_split.images
    trainer = impl.trainer(model, train_config(recipe, ctx, log_every=25), loss_fn=impl.ssl_loss,
                           data_size=len(images), get_batch=lambda idx, g: impl.ssl_views(images[idx], g, recipe.views),
                           kind="ssl", model_config=recipe.model, extra={"recipe": asdict(recipe)})
    summary = trainer.fit()
    return trainer.eval_model().eval(), summary


def load_model(path, impl: Implementation = CANDIDATE):
    """``impl``'s model with a checkpoint's weights, read by the grader."""
    return load_into(path, read_checkpoint(path, "ssl"), impl.ssl_build).eval()


def probe_split(train_split, n: int):
    """The labelled images the probes are fitted on: the first ``n`` of the training split."""
    from eval.reference.data.split import DataSplit
    n = min(n, len(train_split))
    return DataSplit(f"{train_split.name}[:{n}]", train_split.images[:n], train_split.labels[:n], train_split.classes,
                     None, {**train_split.identity, "subset": f"first {n} images, labelled, for the probes"}, {})


# ------------------------------------------------------------------ figures
def make_figures(recipe: M7Recipe, train_split, test_split, test_x: torch.Tensor, preds: torch.Tensor,
                 ctx: RunContext, impl: Implementation = CANDIDATE) -> list[str]:
    """The two views of 8 training images (what the encoder learned to match), a 2-D PCA of the
    test features coloured by class, and the linear probe's confusion matrix."""
    from eval.image_grid import save_grid
    from eval.representation_figures import pca_figure
    from eval.vit_figures import confusion_figure
    imgs = train_split.images[:8]
    views = impl.ssl_views(imgs, ctx.seed, recipe.views)  # (8, 2, 3, H, W)
    from eval.reference.data.split import to_float
    grid = torch.cat([to_float(imgs), views[:, 0].float(), views[:, 1].float()])
    figs = [str(save_grid(grid, ctx.path("views.png"), nrow=8, scale=3))]
    figs.append(pca_figure(test_x, test_split.labels, test_split.classes, ctx.path("features_pca.png"),
                           title=f"test features ({len(test_x)} images), first two principal components"))
    cm = confusion_matrix(preds, test_split.labels, len(test_split.classes))
    figs.append(confusion_figure(cm, test_split.classes, ctx.path("confusion_matrix.png")))
    return figs


# ------------------------------------------------------------------ the milestone
class M7(Milestone):
    id = "m7"
    checkpoint_kind = "ssl"
    title = "Self-supervised representations: SimCLR and MoCo v2"
    marker = "m7"
    test_files = ("tests/test_ssl.py", "tests/test_m7_gates.py")
    criteria = (
        Criterion("NT-Xent equals its definition, computed another way (a loop over anchors), and its "
                  "positive-pair mask pairs view i with view N + i", "test:tests/test_ssl.py::test_nt_xent_golden"),
        Criterion("a 2-layer projection head; the representation is the encoder's output before it",
                  "test:tests/test_ssl.py::test_shapes_and_head"),
        Criterion("MoCo v2: momentum encoder (no gradients, EMA of the query encoder) and a FIFO queue of keys",
                  "test:tests/test_ssl.py::test_moco_queue_and_momentum"),
        Criterion("the views are torchvision.transforms.v2's operations, batched, per-image parameters",
                  "test:tests/test_ssl.py::test_views_match_torchvision"),
        Criterion("the controls (untrained encoder, raw pixels, constant features, permuted labels) fail the "
                  "gates; a collapsed representation is diagnosed", "test:tests/test_m7_gates.py"),
        Criterion("linear-probe accuracy on frozen features", "gate:linear_probe"),
        Criterion("weighted kNN accuracy on frozen features", "gate:knn_accuracy"),
    )
    gates = GATES
    controls = CONTROLS
    pitfalls = PITFALLS
    thresholds = THRESHOLDS
    points = POINTS
    recipes = RECIPES
    smoke_recipes = SMOKE_RECIPES
    data_needed = {"quick": "none (embedded world)",
                   "full": "CIFAR-10 at --data-root (torchvision pickles, train/test JPEG tree or cifar10-jpg.tar.gz)"}

    def run(self, ctx: RunContext) -> RunResult:
        return run(ctx, self.recipe(ctx))


def run(ctx: RunContext, recipe: M7Recipe) -> RunResult:
    """Train (or load ``ctx.checkpoint``), then probe the frozen features: validation first (what
    recipes are chosen on), the test split once, the controls with the same probes."""
    impl, info = CANDIDATE, {}
    train_split, val_split, test_split = load_data(recipe, ctx)
    probe = probe_split(train_split, recipe.n_probe)
    ctx.log(f"data: {train_split.name} {len(train_split)} images (labels unused in training), probe "
            f"{len(probe)}, {val_split.name} {len(val_split)}, {test_split.name} {len(test_split)}")
    summary = None
    if ctx.checkpoint:
        model, ckpt = load_model(ctx.checkpoint, impl), str(ctx.checkpoint)
    else:
        model, summary = train(recipe, train_split, ctx, impl)
        ckpt, info["training"] = str(ctx.out_dir / "checkpoint.pt"), summary
    t0 = time.perf_counter()
    probe_x = features(model, probe.images, impl)
    vm, _, _ = score_split(model, probe_x, probe.labels, val_split, impl)
    validation = record(val_split.name, len(val_split), {f"val_{k}": v for k, v in vm.items()},
                        "the gates' probes, fitted on the same probe-training features")
    ctx.log("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in validation["metrics"].items()))
    metrics, preds, test_x = score_split(model, probe_x, probe.labels, test_split, impl)
    info["probe_s"] = time.perf_counter() - t0
    info["feature_dim"] = int(test_x.shape[1])
    ctx.log(f"linear probe {metrics['linear_probe']:.4f}, kNN {metrics['knn_accuracy']:.4f}")
    t0 = time.perf_counter()
    config = recipe.model if not ctx.checkpoint else read_checkpoint(ctx.checkpoint, "ssl")["model_config"]
    controls = measure_controls(config, ctx.seed, probe, test_split, (probe_x, test_x), preds, impl)
    info["controls_s"] = time.perf_counter() - t0
    for name, values in controls.items():
        ctx.log(f"control {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    symptoms = measure_symptoms(test_x, summary, recipe.warmup_steps, recipe.batch_size)
    figs = make_figures(recipe, train_split, test_split, test_x, preds["linear"], ctx, impl)
    datasets = [s.summary() for s in (train_split, val_split, test_split)]
    return RunResult(metrics=metrics, info=info, datasets=datasets, checkpoint=ckpt,
                     config={"recipe": asdict(recipe), "profile": ctx.profile}, figures=figs, controls=controls,
                     symptoms=symptoms, validation=validation)


MILESTONE = M7()
