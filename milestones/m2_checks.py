"""m2's controls and pitfalls: what must fail the CLIP gates, and what a failing gate names.

Controls (:data:`CONTROLS`, measured in every run with the gates' protocol, see
:mod:`eval.clip_controls`): an untrained CLIP from the candidate's own builder, the trained
model's embeddings with captions/prompts shuffled against images/classes, and a constant image
embedding. Pitfalls (:data:`PITFALLS`): the temperature at its clamp, stuck at its initial value,
at 1 or ignored by the loss; the loss flat after warm-up; a one-directional loss -- each read from
:func:`measure_symptoms` (:mod:`eval.clip_symptoms`, :func:`eval.diagnostics.loss_drop_after_warmup`).
"""

from __future__ import annotations

import math

import torch

from eval.clip_controls import GATE_KEYS, GateEmbeddings, constant_embedding, gate_metrics, shuffled_captions
from eval.clip_symptoms import SPEC_MAX_LOGIT_SCALE, logit_scale_symptoms, loss_scale_effect, loss_swap_asymmetry
from eval.diagnostics import loss_drop_after_warmup
from milestones.adapters import CANDIDATE, Implementation
from milestones.base import Control, Gate, Pitfall

UNTRAINED_SEED = 10_000  # the untrained control is built from seed UNTRAINED_SEED + --seed
CONTROL_SEED = 20_000  # the shuffled-captions derangements are drawn from CONTROL_SEED + --seed
# the full profile's untrained control: the first images of each set (reduced; quick uses the gates' own)
FULL_UNTRAINED_N = {"coco_val": 1000, "cifar": 2000}


GATES = (
    Gate("zeroshot_top5", "zero-shot top-5 from prompt-ensemble text embeddings (quick: 1,000 held-out (colour, "
         "shape) images scored among all 80 compositions, chance 0.0625; full: CIFAR-10 test, class-name prompts, "
         "chance 0.50 -- a constant embedding scores exactly 0.50)"),
    Gate("zeroshot_top1", "zero-shot top-1, same protocol (quick chance 0.0125; full chance 0.10): added because "
         "the spec's top-5 over CIFAR-10's 10 classes sits only 0.10 above chance"),
    Gate("t2i_R@10", "text->image recall@10, every caption a query, its own image the answer, ties counted "
         "against it (quick: world test split, 2,000 images / 10,000 captions, chance 0.005; full: COCO "
         "val2017, 5,000 images, chance 0.002)"))
CONTROLS = (
    Control("untrained model", "the candidate's own CLIP builder, the trained model's config and tokenizer, seed "
            "10,000 + --seed, no training, measured like the gates: quick on the gates' own data (1,000 held-out "
            "images, 2,000 test images / 10,000 captions); full on the first 1,000 val2017 images with their "
            "captions and the first 2,000 CIFAR-10 test images (a smaller gallery makes R@10 easier)", GATE_KEYS),
    Control("shuffled captions", "the trained model's gate embeddings with the pairing broken by fixed "
            "derangements (seed 20,000 + --seed): every caption's answer is another image, every class is "
            "scored with another class's prompt ensemble", GATE_KEYS),
    Control("constant embedding", "every image (zero-shot and gallery) given one embedding, the normalised mean "
            "of the trained model's image embeddings of that set, against the trained text embeddings; the "
            "gates' own data (full: top-5 0.50, top-1 0.10 by construction)", GATE_KEYS),
)
# provisional: calibrated by benchmarks/calibrate.py (the symptom thresholds below)
PITFALLS = (
    Pitfall("temperature at its clamp", GATE_KEYS, "logit_scale_over_clamp", lambda v: v >= 0.99,
            "the learned logit scale is {value:.3f} of its clamp (100): stuck at the maximum, where the clamp "
            "passes no gradient (initialised above it, or a loss that only sharpens)"),
    Pitfall("temperature stuck at its initial value", GATE_KEYS, "logit_scale_log_change", lambda v: v < 1e-3,
            "the learned logit scale moved only |ln(s / s_init)| = {value:.4f} from a fresh model's: the "
            "temperature is not learned (not a parameter the optimiser updates, or unused by the loss)"),
    Pitfall("temperature at 1", GATE_KEYS, "logit_scale", lambda v: v <= 1.5,
            "the learned logit scale is {value:.3f}: the logits are about plain cosines in [-1, 1], so every "
            "softmax is nearly uniform and the loss barely separates pairs"),
    Pitfall("loss ignores the temperature", GATE_KEYS, "loss_scale_effect", lambda v: v < 1e-3,
            "the loss changes by {value:.2e} (relative) between logit scale 1 and 10 on a fixed example: it does "
            "not apply the learned temperature"),
    Pitfall("loss flat after warm-up", GATE_KEYS, "loss_drop_after_warmup", lambda v: v < 0.05,
            "the training loss fell only {value:.3f} (relative) after warm-up: the model is not learning "
            "(learning rate 0, a detached graph, a loss that ignores its inputs)"),
    Pitfall("asymmetric loss (one direction only)", GATE_KEYS, "loss_swap_asymmetry", lambda v: v > 1e-3,
            "swapping images and texts changes the loss by {value:.3f} (relative) on a fixed example: it is not "
            "the symmetric InfoNCE (only image->text or only text->image cross-entropy)"),
)


def untrained_clip(model_config: dict, seed: int, device: str = "cpu", impl: Implementation = CANDIDATE):
    """The untrained control: ``impl``'s own CLIP built from ``model_config`` with seed
    ``UNTRAINED_SEED + seed``, in eval mode (the global RNG state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNTRAINED_SEED + seed)
        return impl.clip_build(model_config).to(device).eval()


def measure_controls(trained: GateEmbeddings, untrained: GateEmbeddings, seed: int) -> dict[str, dict[str, float]]:
    """{control name: {gate key: value}} for :data:`CONTROLS`: the untrained model's embeddings,
    and the trained model's with the pairing shuffled or the images made constant."""
    return {"untrained model": gate_metrics(untrained),
            "shuffled captions": shuffled_captions(trained, CONTROL_SEED + seed),
            "constant embedding": constant_embedding(trained)}


def measure_symptoms(model, fresh, model_config: dict, summary: dict | None, warmup_steps: int,
                     impl: Implementation = CANDIDATE) -> dict[str, float]:
    """The symptoms :data:`PITFALLS` read: the learned logit scale against its clamp and against
    ``fresh``'s (the same architecture untrained), the swap asymmetry and scale effect of
    ``impl.clip_loss`` (:mod:`eval.clip_symptoms`), and, for a model trained in this run, the
    loss drop after warm-up of ``summary["loss_curve"]``."""
    clamp = float(model_config.get("max_logit_scale", SPEC_MAX_LOGIT_SCALE))
    out = logit_scale_symptoms(float(impl.clip_logit_scale(model).detach()),
                               float(impl.clip_logit_scale(fresh).detach()), clamp)

    def loss_fn(image_emb, text_emb, scale):
        return impl.clip_loss(image_emb, text_emb, scale)[0]
    out.update(loss_swap_asymmetry=loss_swap_asymmetry(loss_fn), loss_scale_effect=loss_scale_effect(loss_fn))
    drop = loss_drop_after_warmup(summary["loss_curve"], warmup_steps) if summary and summary.get("loss_curve") else None
    if drop is not None and math.isfinite(drop):  # NaN: under 4 logged points after warm-up
        out["loss_drop_after_warmup"] = drop
    return out
