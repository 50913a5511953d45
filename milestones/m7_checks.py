"""m7's gates, controls and pitfalls: what must fail the representation gates, and what a failing
gate names.

Both gates read frozen features only (the candidate's encoder through the seam) and score them
with the grader's probes (:mod:`eval.representation`) on the grader's labels. Controls
(:data:`CONTROLS`, measured in every run with the gates' protocol): the candidate's encoder
untrained, raw pixels as the features (an encoder must add something over its input), one
constant feature vector, and the trained model's predictions scored against permuted test
labels. Pitfalls (:data:`PITFALLS`): a collapsed representation, a loss flat after warm-up and
positives the model cannot pick out of the batch.
"""

from __future__ import annotations

import math

import torch

from eval.classification import accuracy
from eval.classification_controls import permuted_labels
from eval.diagnostics import loss_drop_after_warmup
from eval.reference.data.split import to_float
from eval.representation import KNN_K, KNN_T, effective_rank, feature_spread, knn_predict, linear_probe
from milestones.adapters import CANDIDATE, Implementation
from milestones.base import Control, Gate, Pitfall
from milestones.common import batched

UNTRAINED_SEED = 10_000  # the untrained control is built from UNTRAINED_SEED + --seed
PERMUTE_SEED = 20_000  # the permuted-labels control's order
KEYS = ("linear_probe", "knn_accuracy")

GATES = (
    Gate("linear_probe", "linear-probe accuracy: multinomial logistic regression (eval/representation.py) fitted "
         "on the frozen features of the labelled probe-training images, scored on the test split (quick: world, "
         "5,000 probe-training / 2,000 test single-object scenes, 10 shape classes, chance 0.10; full: CIFAR-10, "
         "50,000 / 10,000)"),
    Gate("knn_accuracy", f"weighted kNN accuracy (k = {KNN_K}, votes exp(cosine / {KNN_T})) of the same test "
         "features against the same labelled probe-training features"),
)
CONTROLS = (
    Control("untrained encoder", "the candidate's own builder, the trained model's config, seed 10,000 + --seed, no "
            "training; the gates' own images and probes", KEYS),
    Control("raw pixels", "the images' pixels in [-1, 1], flattened, as the features: an encoder that adds nothing "
            "over its input", KEYS),
    Control("constant features", "every image given the same feature vector (the mean of the trained model's "
            "probe-training features)", KEYS),
    Control("labels permuted", "the trained model's probe predictions scored against the test labels in a seeded "
            "random order (seed 20,000 + --seed)", KEYS),
)
PITFALLS = (
    Pitfall("representation collapsed", KEYS, "feature_spread", lambda v: v < 0.01,
            "the unit-normalised test features vary by only {value:.4f} (mean per-dimension deviation): every image "
            "maps to nearly one direction (the loss has no negatives, or the projection ignores its input)"),
    Pitfall("loss flat after warm-up", KEYS, "loss_drop_after_warmup", lambda v: v < 0.02,
            "the contrastive loss fell only {value:.3f} (relative) after warm-up: the model is not learning"),
    Pitfall("positives not found", KEYS, "pos_acc_over_chance", lambda v: v < 3,
            "at the end of training the positive view was the most similar one only {value:.1f} x as often as chance "
            "(1 in 2B - 1 views): the two views of an image are not paired in the loss (rows i and B + i), or the "
            "views differ too much to match"),
)


# ------------------------------------------------------------------ features and gates
@torch.no_grad()
def features(model, images: torch.Tensor, impl: Implementation = CANDIDATE) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> frozen features (N, D) on the CPU (pixels converted by the grader)."""
    model.eval()
    return batched(lambda x: impl.ssl_features(model, x), images)


def gate_metrics(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 n_classes: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Both gates from probe-training and test features -> (metrics, {"linear", "knn"}: the
    predictions, for the permuted-labels control and the confusion figure)."""
    preds = {"linear": linear_probe(train_x, train_y, test_x),
             "knn": knn_predict(train_x, train_y, test_x, n_classes)}
    return {"linear_probe": accuracy(preds["linear"], test_y), "knn_accuracy": accuracy(preds["knn"], test_y)}, preds


def score_split(model, probe_x: torch.Tensor, probe_y: torch.Tensor, split, impl: Implementation = CANDIDATE):
    """Both gates' metrics of ``model`` on ``split`` with probes fitted on (``probe_x``, ``probe_y``)
    -> (metrics, predictions, the split's features)."""
    x = features(model, split.images, impl)
    metrics, preds = gate_metrics(probe_x, probe_y, x, split.labels, len(split.classes))
    return metrics, preds, x


def untrained(config: dict, seed: int, impl: Implementation = CANDIDATE):
    """``impl``'s model built from ``config`` with seed ``UNTRAINED_SEED + seed``, in eval mode
    (the global RNG state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNTRAINED_SEED + seed)
        return impl.ssl_build(config).eval()


def measure_controls(config: dict, seed: int, probe_split, test_split, trained: tuple, preds: dict,
                     impl: Implementation = CANDIDATE) -> dict[str, dict[str, float]]:
    """{control: gate metrics}; ``trained`` = (probe-training features, test features) of the
    trained model, ``preds`` its predictions (see :func:`gate_metrics`)."""
    n_classes = len(test_split.classes)
    ty, sy = probe_split.labels, test_split.labels
    fresh = untrained(config, seed, impl)
    out = {"untrained encoder": gate_metrics(features(fresh, probe_split.images, impl), ty,
                                             features(fresh, test_split.images, impl), sy, n_classes)[0],
           "raw pixels": gate_metrics(to_float(probe_split.images).flatten(1), ty,
                                      to_float(test_split.images).flatten(1), sy, n_classes)[0]}
    mean = trained[0].mean(0, keepdim=True)
    out["constant features"] = gate_metrics(mean.expand(len(ty), -1), ty, mean.expand(len(sy), -1), sy, n_classes)[0]
    shuffled = permuted_labels(sy, PERMUTE_SEED + seed)
    out["labels permuted"] = {"linear_probe": accuracy(preds["linear"], shuffled),
                              "knn_accuracy": accuracy(preds["knn"], shuffled)}
    return out


def measure_symptoms(test_x: torch.Tensor, summary: dict | None, warmup_steps: int,
                     batch_size: int = 0) -> dict[str, float]:
    """The numbers :data:`PITFALLS` read: the spread and effective rank of the test features and,
    for a model trained in this run, the loss drop after warm-up and the final positive accuracy
    (also as a multiple of chance, 1 / (2 ``batch_size`` - 1))."""
    out = {"feature_spread": feature_spread(test_x), "effective_rank": effective_rank(test_x)}
    if summary and summary.get("loss_curve"):
        drop = loss_drop_after_warmup(summary["loss_curve"], warmup_steps)
        if math.isfinite(drop):
            out["loss_drop_after_warmup"] = drop
    final = (summary or {}).get("final_metrics") or {}
    if "pos_acc" in final:
        out["final_pos_acc"] = float(final["pos_acc"])
        if batch_size:
            out["pos_acc_over_chance"] = float(final["pos_acc"]) * (2 * batch_size - 1)
    return out
