"""m5's controls and pitfall symptoms: generators that must fail the gates, and the numbers that
betray the spec's known mistakes.

Controls (each measured every run with the gates' own protocol, on fewer prompts):

- :func:`colour_only_images`: the grader's own "generator" that gets only the colour right: for
  each world prompt a scene of the world renderer (:func:`eval.reference.data.world.render`)
  with the prompt's colour and a random shape, size and position. A judge that sees only colour
  would pass it; the gates must not.
- the untrained generator (the candidate's builder, a fresh seed), guidance 0 (unconditional
  samples of the trained model) and shuffled prompts (the gate samples judged against a
  derangement of their prompts) are made in :mod:`milestones.m5_text_to_image` from the
  candidate's code; :func:`gate_values` measures any of them.

Symptoms (:func:`eps_condition_gap`): conditional and unconditional predictions equal means the
text conditioning is ignored (guidance then does nothing).
"""

from __future__ import annotations

import torch

from eval.reference.data.world import WorldConfig, render, sample_scenes


def colour_only_images(prompts: list[str], seed: int = 0) -> torch.Tensor:
    """uint8 (P, 3, 32, 32): one world scene per prompt with the prompt's colour and a random
    shape, size and position (and the world's usual jitter, background and noise), seeded by
    ``seed``. Prompts without a colour word keep the random colour."""
    from eval.prompt_match import parse_prompt
    g = torch.Generator().manual_seed(10_007 + seed)
    table = sample_scenes(len(prompts), "test", g, WorldConfig(p_two=0.0))
    for i, p in enumerate(prompts):
        c = parse_prompt(p)["colour"]
        if c is not None:
            table["colour"][i, 0] = c
    return render(table, g)


def gate_values(judges, images: torch.Tensor, prompts: list[str], floor: float, r_precision_k: int = 3,
                seed: int = 0) -> dict:
    """The sample-quality gates of ``images`` (uint8 (P, 3, H, W)) for ``prompts``, as the gates
    measure them: clip_score (mean cosine in the judge CLIP), clip_score_margin (minus the
    shuffled-real ``floor``), prompt_match (the automatic judge) and clip_r_precision (quick
    profile: the true prompt beats its attribute swaps)."""
    from eval.clip_score import clip_score
    cos = clip_score(judges.clip, judges.tok, images, prompts)["mean_cosine"]
    out = {"clip_score": cos, "clip_score_margin": cos - floor,
           "prompt_match": judges.match_rates(prompts, judges.predict(images))["prompt_match"]}
    if judges.r_precision is not None:
        out["clip_r_precision"] = judges.r_precision(images, prompts)["r_precision"]
    return out


def guidance_gain_values(judges, guided: torch.Tensor, plain: torch.Tensor, prompts: list[str]) -> dict:
    """The guidance-gain gate on paired samples (same prompts and seeds): ``guidance_gain`` =
    prompt match of ``guided`` minus that of ``plain`` (s = 1), ``guidance_gain_sign_p`` = the
    one-sided sign test's p (the gate: p below its threshold)."""
    from eval.text2image_eval import sign_test
    a = judges.match_table(prompts, judges.predict(guided))["all"]
    b = judges.match_table(prompts, judges.predict(plain))["all"]
    return {"guidance_gain": (a.float().mean() - b.float().mean()).item(), "guidance_gain_sign_p": sign_test(a, b)}


@torch.no_grad()
def eps_condition_gap(eps_c: torch.Tensor, eps_u: torch.Tensor) -> float:
    """Relative difference ||eps_c - eps_u|| / ||eps_u|| of conditional and unconditional
    predictions on the same noisy inputs (any shape, same for both). ~0: the model ignores its
    text (the pitfall "conditional and unconditional predictions equal"); NaN when eps_u is 0."""
    d, n = (eps_c.float() - eps_u.float()).norm(), eps_u.float().norm()
    return float(d / n) if n > 0 else float("nan")
