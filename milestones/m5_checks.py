"""m5's gates, controls and pitfalls: what the text-to-image gates measure, what must fail them,
and what a failing gate names.

Controls (:data:`CONTROLS`, measured in every run with the gates' protocol on ``n_control``
prompts, :func:`measure_controls`, :mod:`eval.text2image_controls`): an untrained generator from
the candidate's own builder, a colour-only generator (the grader's world renderer; quick only),
guidance 0 (unconditional samples), the gate samples judged against shuffled prompts. Pitfalls
(:data:`PITFALLS`): conditional and unconditional predictions equal, the loss flat after warm-up,
the guidance sign flipped -- each read from :func:`measure_symptoms`.
"""

from __future__ import annotations

import torch

from eval.text2image_eval import shuffled
from milestones.adapters import CANDIDATE
from milestones.base import Control, Gate, Pitfall

# the gates a set of samples is judged on, and the controls' names (measure_controls, M5.controls)
SAMPLE_GATES = ("clip_score", "clip_score_margin", "clip_r_precision", "prompt_match")
UNTRAINED, COLOUR_ONLY, GUIDANCE_0, SHUFFLED = ("untrained generator", "colour-only generator",
                                                "guidance 0 (unconditional)", "shuffled prompts")
HUMAN_GATE = Gate("human_prompt_match", "share of the 100 default-guidance samples a person says show the prompt's "
                  "colour, shape and position, averaged over annotators (the mean of each one's share; each "
                  "one's score and their agreement, Cohen's kappa for two / Fleiss' for more, are in "
                  "info['human_eval']; runs/m5/human_eval.json; pending until recorded)")

GATES = (
    Gate("clip_score", "mean cosine between each of the 100 default-guidance samples and its prompt in the judge "
         "CLIP (another run and seed than the conditioning CLIP; quick: trained with attribute-swapped hard "
         "negatives); torchmetrics CLIPScore = 100 x this"),
    Gate("clip_score_margin", "clip_score minus the judge's score on shuffled real (image, caption) pairs"),
    Gate("clip_r_precision", "CLIP R-precision (Park et al. 2021) of the 100 default-guidance samples: share whose "
         "prompt the judge CLIP scores above each of its attribute swaps (quick: 3 colour, 3 shape, 3 position "
         "swaps, R = 10; full: the other 9 class prompts)"),
    Gate("prompt_match", "share of the 100 default-guidance samples whose colour, shape and position (quick) / "
         "class (full) the automatic judge finds as the prompt says"),
    Gate("guidance_gain_sign_p", "one-sided exact sign test (McNemar) p that prompt match at the default guidance "
         "beats s = 1 on n_gain (400 quick) paired samples (same prompts and seeds); guidance_gain (the "
         "difference) beside it", direction="<"),
)
# Controls: each must FAIL the gates it lists, measured every run with their protocol. The
# human gate has none: a person is its instrument (there is no model to swap in), and it
# never passes unless answers are recorded (pending otherwise).
CONTROLS = (
    Control(UNTRAINED, "the candidate's builder with the run's configuration, fresh seed (7919 + seed): the "
            "first n_control (50) gate prompts at the default guidance; guidance gain on those prompts "
            "against s = 1", SAMPLE_GATES + ("guidance_gain_sign_p",)),
    Control(COLOUR_ONLY, "the grader's world renderer: the first n_control (50) gate prompts, each drawn with "
            "its colour and a random shape, size and position (quick profile only)", SAMPLE_GATES),
    Control(GUIDANCE_0, "the trained model sampled at s = 0 (unconditional) on the first n_control (50) gate "
            "prompts; guidance gain: these against the s = 1 samples of the same prompts and seeds",
            SAMPLE_GATES + ("guidance_gain_sign_p",)),
    Control(SHUFFLED, "the 100 default-guidance gate samples judged against a derangement of their prompts; "
            "guidance gain: the n_gain pairs against deranged prompts", SAMPLE_GATES + ("guidance_gain_sign_p",)),
)
PITFALLS = (
    Pitfall("conditional and unconditional predictions equal", SAMPLE_GATES + ("guidance_gain_sign_p",),
            "eps_condition_gap", lambda v: v < 1e-3,
            "the relative difference of eps_c and eps_u on 16 noisy real test images is {value:.2g}: the "
            "U-Net ignores its text (cross-attention or the context not wired in), so no prompt is followed "
            "and guidance does nothing"),
    Pitfall("loss flat after warm-up", SAMPLE_GATES + ("guidance_gain_sign_p",), "loss_drop_after_warmup",
            lambda v: v < 0.1, "the training loss fell only {value:.1%} after warm-up: the generator is not "
            "learning (learning rate 0, a detached graph, a loss that ignores the model)"),
    Pitfall("guidance sign flipped", ("prompt_match", "clip_r_precision", "guidance_gain_sign_p"),
            "guidance_loss_sign_p", lambda v: v < 0.05,
            "s = 1 beats the default guidance on prompt match (one-sided sign test p = {value:.2g}): guidance "
            "pushes away from the prompt, as eps_u - s (eps_c - eps_u) (a flipped sign) would"),
)


def fresh_generator(model, tokenizer, seed: int, device: str = "cpu", impl=CANDIDATE):
    """The untrained control: the candidate's builder with ``model``'s configuration (text
    tower included: a fresh CLIP of the same config), parameters from ``seed``, eval mode."""
    mc = impl.text2image_model_config(model)
    torch.manual_seed(seed)
    clip = impl.clip_build(mc["clip"])
    return impl.text2image_build({k: v for k, v in mc.items() if k != "clip"}, clip, tokenizer).to(device).eval()


def measure_controls(sample, untrained_sample, judges, samples: dict, prompts: list[str], floor: float,
                     guidance: float, n: int, seed: int, colour_only: bool) -> dict[str, dict[str, float]]:
    """Every control's gate values, each with the gates' own protocol (:data:`M5.controls` says
    what each one is). ``sample``/``untrained_sample``: the trained and untrained generators'
    samplers (:func:`sampler_for`); ``samples``: what :func:`evaluate` drew (the gate samples at
    ``guidance``, the guidance-gain pairs); ``floor``: the shuffled-real CLIP floor; ``n``: prompts
    per generated control."""
    from eval.text2image_controls import colour_only_images, gate_values, guidance_gain_values
    p, gain, gain_prompts = prompts[:n], samples["gain"], samples["gain_prompts"]
    x, x1 = untrained_sample(p, guidance), untrained_sample(p, 1.0)
    out = {UNTRAINED: {**gate_values(judges, x, p, floor), **guidance_gain_values(judges, x, x1, p)}}
    x0 = sample(p, 0.0)  # unconditional: eps_u + 0 (eps_c - eps_u)
    out[GUIDANCE_0] = {**gate_values(judges, x0, p, floor),
                       **guidance_gain_values(judges, x0, gain[1.0][:n], p)}
    out[SHUFFLED] = {**gate_values(judges, samples[guidance], shuffled(prompts, seed + 1), floor),
                     **guidance_gain_values(judges, gain[guidance], gain[1.0], shuffled(gain_prompts, seed + 1))}
    if colour_only:
        out[COLOUR_ONLY] = gate_values(judges, colour_only_images(p, seed), p, floor)
    return out


@torch.no_grad()
def eps_gap(model, images: torch.Tensor, captions: list[str], seed: int = 0, impl=CANDIDATE) -> float:
    """Relative difference of the conditional (``captions``) and unconditional ("") noise
    predictions on real ``images`` (uint8 (N, 3, H, W)) noised at N timesteps spread over
    [0.1 T, 0.9 T] with seeded noise (:func:`eval.text2image_controls.eps_condition_gap`)."""
    from eval.text2image_controls import eps_condition_gap
    from milestones.common import to_float
    dev = next(model.parameters()).device
    x0, n = to_float(images).to(dev), len(images)
    ab_all = impl.text2image_alpha_bars(model).float().to(dev)
    t = (torch.linspace(0.1, 0.9, n) * (len(ab_all) - 1)).long().to(dev)
    ab = ab_all[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(dev)
    c, m = impl.text2image_encode(model, captions)
    u, um = impl.text2image_encode(model, [""] * n)
    return eps_condition_gap(impl.text2image_eps(model, x_t, t, c, m), impl.text2image_eps(model, x_t, t, u, um))


def measure_symptoms(model, images, captions, seed: int, metrics: dict, training: dict | None, warmup: int,
                     impl=CANDIDATE) -> dict[str, float]:
    """The numbers :data:`M5.pitfalls` read: ``eps_condition_gap`` (:func:`eps_gap` on 16 real
    test images), ``loss_drop_after_warmup`` (the training loss curve; absent for a loaded
    checkpoint), ``guidance_loss_sign_p`` (s = 1 beating the default guidance: a flipped sign)."""
    from eval.diagnostics import loss_drop_after_warmup
    out = {"eps_condition_gap": eps_gap(model, images, captions, seed, impl),
           "guidance_loss_sign_p": metrics["guidance_loss_sign_p"]}
    if training and training.get("loss_curve"):
        out["loss_drop_after_warmup"] = loss_drop_after_warmup(training["loss_curve"], warmup)
    return out
