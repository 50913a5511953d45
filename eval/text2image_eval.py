"""m5 evaluation: the judges of generated images and every number of the text-to-image gates.

- :class:`Judges` bundles what grades generated images (none of it the generator's own): the
  judge CLIP (another run and seed than the conditioning CLIP), an automatic prompt-match judge
  (the world's attribute classifier in the quick profile, a class judge on CIFAR-10), the
  negative-concept test and the in-domain FID features.
- :func:`evaluate` samples the same prompts and per-image seeds at every guidance scale
  (``eps = eps_u + s (eps_c - eps_u)``) and measures CLIP score (cosine, torchmetrics CLIPScore =
  100 x cosine), the judge's ceiling (real pairs) and floor (shuffled pairs), prompt match, FID,
  held-out compositions and the negative-prompt effect.

The generator is reached only through a ``sample`` callable, ``sample(prompts, guidance,
negative=None) -> uint8 (P, 3, H, W)`` (one image per prompt; image ``i`` depends only on its
prompt and its seed ``i``): nothing here knows the implementation or the milestone's recipe.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


# ------------------------------------------------------------------ judges
@dataclass
class Judges:
    """Everything that grades generated images, none of it the generator's own.

    clip, tok: the judge CLIP (a different run and seed from the conditioning CLIP).
    predict: uint8 images (N,3,H,W) -> dict of (N,) predictions (attributes or class).
    match_table: (prompts, predictions) -> dict of (N,) bool with key "all" (the prompt match).
    match_rates: (prompts, predictions) -> {"prompt_match", ...}.
    negative_hit: predictions -> (N,) bool, "shows the negative prompt's concept".
    fid_feature: torchmetrics FID feature module (in-domain).
    info: names, hashes, test accuracies.
    r_precision: (images uint8 (N,3,H,W), prompts) -> {"r_precision", ...}: CLIP R-precision in
        the judge CLIP (Park et al. 2021; :mod:`eval.judge_clip`), or None.
    """

    clip: object
    tok: object
    predict: object
    match_table: object
    match_rates: object
    negative_hit: object
    fid_feature: object
    info: dict
    r_precision: object = None


def world_judges(clip, tok, clip_info: dict, progress: bool, negative: str) -> Judges:
    """The quick profile's judges: the judge CLIP ``clip``/``tok`` (the grader's, with CLIP
    R-precision against attribute-swapped prompts), the cached attribute classifier (prompt
    match, its features for FID) and ``negative`` (a colour word) as the negative concept."""
    from eval.judge_clip import r_precision
    from eval.fid import FeatureAdapter
    from eval.prompt_match import match_rates, match_table, parse_prompt
    from eval.attributes import AttributeFeatures, load_or_train, predict_attributes
    from eval.reference.data.world import COLOURS
    attr, ainfo = load_or_train(progress=progress)
    colour = parse_prompt(negative)["colour"]
    if colour is None:
        raise ValueError(f"the quick profile's negative prompt must name a colour of {COLOURS}, got {negative!r}")
    feature = FeatureAdapter(AttributeFeatures(attr), attr.num_features, name=f"attributes-{ainfo['recipe_hash']}")
    info = {"clip_judge": clip_info, "attribute_judge": {k: ainfo.get(k) for k in
                                                          ("recipe_hash", "path", "sha256", "test_accuracies", "trained_now")},
            "negative_concept": f"colour == {COLOURS[colour]} (attribute judge)"}
    return Judges(clip, tok, lambda x: predict_attributes(attr, x), match_table, match_rates,
                  lambda p: p["colour"] == colour, feature, info, lambda x, p: r_precision(clip, tok, x, p))


# ------------------------------------------------------------------ evaluation
def shuffled(captions: list[str], seed: int = 0) -> list[str]:
    """A derangement of ``captions``: a random cyclic shift, so no image keeps its own caption."""
    n = len(captions)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out = [None] * n
    for i in range(n):
        out[perm[i]] = captions[perm[(i + 1) % n]]
    return out


def evaluate(sample: Callable, judges: Judges, prompts: list[str], heldout_prompts: list[str] | None,
             real_images: torch.Tensor, real_captions: list[str], guidance: float, sweep_scales, seed: int = 0,
             gain_prompts: list[str] | None = None, negative: str = "", negative_base: str = "",
             n_negative: int = 0):
    """All m5 numbers. Returns (metrics, info, samples).

    Args:
        sample: ``sample(prompts, guidance, negative=None) -> uint8 (P, 3, H, W)`` (module docstring).
        judges: the grader's :class:`Judges`.
        prompts: the gate prompts; heldout_prompts: held-out compositions (or None).
        real_images: uint8 (N, 3, H, W) real test images; real_captions: N prompt-style captions.
        guidance: the default scale (the gates); sweep_scales: more scales to report (s = 1 and
            ``guidance`` are always added).
        seed: the seed of the shuffled-pair floor (recorded with the sampling protocol).
        gain_prompts: ``prompts`` followed by more (default ``prompts``), sampled at s = 1 and at
            ``guidance`` for the guidance-gain gate: a difference of two prompt-match rates needs
            more samples than either rate (image ``i`` depends only on its prompt and seed, so the
            first ``len(prompts)`` of them are exactly the gate samples).
        negative, negative_base, n_negative: the negative-prompt test: ``n_negative`` samples of
            ``negative_base`` with and without ``negative`` (0 = no test).

    Samples for each scale use the same prompts and per-image seeds, so scales compare pairwise.
    ``samples``: scale -> the gate samples (len(prompts)), "gain" -> {scale: all gain samples}
    (s = 1 and ``guidance``), "gain_prompts", and "heldout" / "negative_*" where drawn.
    """
    from eval.clip_score import clip_score
    from eval.fid import fid, protocol
    timings, samples, sweep = {}, {}, {}
    scales = sorted(set(sweep_scales) | {guidance, 1.0})

    def cos(images, caps):
        return clip_score(judges.clip, judges.tok, images, caps)["mean_cosine"]

    t0 = time.perf_counter()
    real_pred = judges.predict(real_images)
    ceiling, floor = cos(real_images, real_captions), cos(real_images, shuffled(real_captions, seed))
    metrics = {"clip_score_real": ceiling, "clip_score_shuffled": floor,
               "real_prompt_match": judges.match_rates(real_captions, real_pred)["prompt_match"]}
    timings["real_pairs_s"] = time.perf_counter() - t0
    gain_prompts = gain_prompts or prompts
    if gain_prompts[:len(prompts)] != prompts:
        raise ValueError("gain_prompts must start with the gate prompts")
    gain, gain_samples = {}, {}  # scale -> (len(gain_prompts),) bool prompt match / samples, for s = 1 and the default
    for s in scales:
        t0 = time.perf_counter()
        paired = s in (1.0, guidance)
        x = sample(gain_prompts if paired else prompts, s)
        t1 = time.perf_counter()
        pred = judges.predict(x)
        if paired:
            gain[s], gain_samples[s] = judges.match_table(gain_prompts, pred)["all"], x
        samples[s], pred = x[:len(prompts)], {k: v[:len(prompts)] for k, v in pred.items()}
        sweep[s] = {**judges.match_rates(prompts, pred), "clip_score": cos(samples[s], prompts),
                    "fid": fid(real_images, samples[s], judges.fid_feature)}
        sweep[s]["sample_s"], sweep[s]["judge_s"] = t1 - t0, time.perf_counter() - t1
        timings[f"guidance_{s:g}_s"] = time.perf_counter() - t0
    d = sweep[guidance]
    metrics.update({"clip_score": d["clip_score"], "clip_score_100": max(100 * d["clip_score"], 0.0),
                    "clip_score_margin": d["clip_score"] - floor,
                    "prompt_match": d["prompt_match"], "fid": d["fid"],
                    # on len(gain_prompts) paired samples (same prompt and seed at both scales)
                    "guidance_gain": (gain[guidance].float().mean() - gain[1.0].float().mean()).item(),
                    "guidance_gain_n": len(gain_prompts),
                    "guidance_gain_on_gate_prompts": d["prompt_match"] - sweep[1.0]["prompt_match"]})
    metrics["guidance_gain_sign_p"] = sign_test(gain[guidance], gain[1.0])  # the gate (one-sided: s > 1 helps)
    metrics["guidance_loss_sign_p"] = sign_test(gain[1.0], gain[guidance])  # the other side: s > 1 hurts
    if judges.r_precision is not None:  # CLIP R-precision: the true prompt beats its attribute swaps
        r = judges.r_precision(samples[guidance], prompts)
        metrics["clip_r_precision"] = r["r_precision"]
        metrics.update({f"clip_{k}": v for k, v in r.items() if k.endswith(("_swap_acc", "_swap_drop"))})
    if ceiling - floor > 0.05:  # where the generated images sit between the judge's floor (0) and ceiling (1)
        metrics["clip_score_normalised"] = (d["clip_score"] - floor) / (ceiling - floor)
    metrics.update({k: d[k] for k in d if k.endswith("_match") and k != "prompt_match"})
    for s in scales:
        metrics.update({f"prompt_match@{s:g}": sweep[s]["prompt_match"], f"clip_score@{s:g}": sweep[s]["clip_score"],
                        f"fid@{s:g}": sweep[s]["fid"]})
    if heldout_prompts:
        t0 = time.perf_counter()
        samples["heldout"] = sample(heldout_prompts, guidance)
        h = judges.match_rates(heldout_prompts, judges.predict(samples["heldout"]))
        metrics.update({f"heldout_{k}": v for k, v in h.items() if k != "n"})
        metrics["heldout_clip_score"] = cos(samples["heldout"], heldout_prompts)
        timings["heldout_s"] = time.perf_counter() - t0
    if n_negative:
        t0 = time.perf_counter()
        base = [negative_base] * n_negative
        # without a negative prompt: cond = uncond = base, so every scale gives eps_base (one pass)
        samples["negative_off"] = sample(base, 1.0 if not negative_base else guidance)
        samples["negative_on"] = sample(base, guidance, negative)
        off = judges.negative_hit(judges.predict(samples["negative_off"])).float().mean().item()
        on = judges.negative_hit(judges.predict(samples["negative_on"])).float().mean().item()
        metrics.update(negative_frac_without=off, negative_frac_with=on, negative_drop=off - on)
        timings["negative_s"] = time.perf_counter() - t0
    info = {"sweep": {f"{s:g}": sweep[s] for s in scales}, "timings_s": timings,
            "fid_protocol": protocol(judges.fid_feature, real_images, samples[guidance]),
            "guidance_convention": "eps = eps_u + s (eps_c - eps_u): s = 1 plain conditional (one pass), s = 0 "
                                   "unconditional; negative prompt replaces eps_u",
            "clip_score_scale": "clip_score is the mean cosine (judge CLIP); clip_score_100 = torchmetrics "
                                "CLIPScore = max(100 x mean cosine, 0); threshold 0.25 cosine = 25 there",
            "sampling": {"seed": seed, "n_eval": len(prompts), "default_guidance": guidance, "scales": scales},
            "negative_protocol": {"prompt": negative_base, "negative": negative, "n": n_negative,
                                  "guidance": guidance}}
    samples["gain"], samples["gain_prompts"] = gain_samples, gain_prompts
    return metrics, info, samples


def sign_test(a: torch.Tensor, b: torch.Tensor) -> float:
    """One-sided exact sign test (McNemar) on paired booleans: the probability, if neither
    setting were better, that ``a`` wins at least as many of the discordant pairs as it did."""
    wins, losses = int((a & ~b).sum()), int((~a & b).sum())
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n if n else 1.0


# ------------------------------------------------------------------ figures
def make_figures(samples: dict, prompts: list[str], heldout_prompts, judges: Judges, metrics: dict, info: dict,
                 guidance: float, sampler_name: str, out_dir: Path, negative: str = "",
                 negative_base: str = "") -> list[str]:
    """The m5 figures in ``out_dir``: samples, guidance grid and sweep, held-out, negative prompt.

    ``samples``, ``metrics``, ``info``: what :func:`evaluate` returned for the default scale
    ``guidance``; ``sampler_name`` names the sampler in titles (e.g. "DDIM 25 steps");
    ``negative``/``negative_base``: the negative-prompt test's prompts."""
    from eval.text2image_figures import guidance_grid, guidance_sweep_plot, negative_prompt_figure, prompt_grid
    g, k = guidance, min(24, len(prompts))
    ok = judges.match_table(prompts[:k], judges.predict(samples[g][:k]))["all"]
    figs = [prompt_grid(samples[g][:k], prompts[:k], Path(out_dir) / ("samples.png"), ok=ok,
                        title=f"guidance s = {g:g}, {sampler_name} "
                              f"(green: the judge sees colour, shape and position right)")]
    scales = sorted(s for s in samples if isinstance(s, (int, float)))
    figs.append(guidance_grid({s: samples[s][:8] for s in scales}, prompts[:8], Path(out_dir) / ("guidance_grid.png")))
    sweep = {float(s): v for s, v in info["sweep"].items()}
    figs.append(guidance_sweep_plot(sweep, Path(out_dir) / ("guidance_sweep.png"), metrics["clip_score_real"],
                                    metrics["clip_score_shuffled"], g))
    if "heldout" in samples:
        kh = min(16, len(heldout_prompts))
        okh = judges.match_table(heldout_prompts[:kh], judges.predict(samples["heldout"][:kh]))["all"]
        figs.append(prompt_grid(samples["heldout"][:kh], heldout_prompts[:kh], Path(out_dir) / ("heldout_samples.png"),
                                ok=okh, title="held-out (colour, shape) compositions, never in training"))
    if "negative_on" in samples:
        figs.append(negative_prompt_figure(samples["negative_off"], samples["negative_on"], Path(out_dir) / ("negative_prompt.png"),
                                           negative_base, negative, metrics["negative_frac_without"],
                                           metrics["negative_frac_with"], what=negative))
    return figs
