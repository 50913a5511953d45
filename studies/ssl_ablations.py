"""Ablations of m7's self-supervised recipe (issue 21, item 4): one knob changed at a time, the rest
m7's quick recipe, each setting scored on the world's **validation** split (the test split is
m7's gate's alone).

    python -m studies.ssl_ablations temperature            # 5 temperatures, SimCLR
    python -m studies.ssl_ablations batch                  # 4 batch sizes at equal images seen
    python -m studies.ssl_ablations augment                # the views with each operation changed in turn
    python -m studies.ssl_ablations queue                  # MoCo v2 with 4 queue sizes
    ... --jobs 2                                           # settings two at a time, one thread each

Writes ``results/ssl_ablations/<knob>.md`` and ``.json`` (per setting: linear-probe and kNN
accuracy on val, training wall time; the command, commit, machine) and ``<knob>.png``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

from studies.ablation import FINAL_LOSS, STEPS_X_BATCH, TRAIN_WALL, Study, at_batch, main, metric
from studies.common import REPO, one_thread_run

KNOBS = {
    "temperature": [0.05, 0.1, 0.2, 0.5, 1.0],
    "batch": [32, 64, 128, 256],  # steps scaled so every setting sees 600 x 128 images
    # the recipe's views, then one operation changed; the crop is off in the recipe since 2026-12-04
    # (results/ssl_ablations/augment.md at 9d61401 removed it from a recipe that had it)
    "augment": ["all", "crop (0.8, 1)", "no flip", "no colour jitter", "no grayscale"],
    "queue": [256, 1024, 4096, 16384],
}


def recipe_for(knob: str, value):
    """m7's quick recipe with ``knob`` set to ``value``."""
    from milestones.m7_ssl import RECIPES
    base = RECIPES["quick"]
    if knob == "temperature":
        return replace(base, model={**base.model, "temperature": value})
    if knob == "batch":
        return at_batch(base, value)
    if knob == "augment":
        off = {"all": {}, "crop (0.8, 1)": {"crop_scale": (0.8, 1.0)}, "no flip": {"flip": 0.0},
               "no colour jitter": {"jitter": 0.0}, "no grayscale": {"grayscale": 0.0}}[value]
        return replace(base, views={**base.views, **off})
    if knob == "queue":  # MoCo v2 at its paper's temperature and momentum
        return replace(base, model={**base.model, "method": "moco", "temperature": 0.2, "queue_size": value,
                                    "momentum": 0.99})
    raise ValueError(f"unknown knob {knob!r}: choose one of {', '.join(KNOBS)}")


def train_and_score(recipe, seed: int) -> dict:
    """Train m7's model with ``recipe`` (one torch thread) and score it on the world's val split:
    linear-probe and kNN accuracy with probes fitted on the recipe's probe images."""
    from milestones.m7_checks import features, score_split
    from milestones.m7_ssl import load_data, probe_split, train
    with one_thread_run(seed) as ctx:
        train_split, val, _ = load_data(recipe, ctx)
        t0 = time.perf_counter()
        model, summary = train(recipe, train_split, ctx)
        wall = time.perf_counter() - t0
        probe = probe_split(train_split, recipe.n_probe)
        m, _, _ = score_split(model, features(model, probe.images), probe.labels, val)
    return {"val_linear_probe": m["linear_probe"], "val_knn_accuracy": m["knn_accuracy"], "train_wall_s": wall,
            "steps": recipe.steps, "batch_size": recipe.batch_size,
            "final_loss": (summary.get("final_metrics") or {}).get("loss")}


def run_setting(args: tuple) -> dict:
    """Train one setting in this process and score it on val."""
    knob, value, seed = args
    return {"setting": str(value), **train_and_score(recipe_for(knob, value), seed)}


def intro(record: dict) -> str:
    """The report's sentence on what was held fixed and what scored it."""
    from milestones.m7_ssl import RECIPES
    base = RECIPES["quick"]
    return (f"m7's quick recipe with only {record['knob']} changed, seed {record['seed']}; scored on the world's val split "
            f"({base.n_val:,} images), probes fitted on {base.n_probe:,} training images.")


STUDY = Study(
    name="m7", module="studies.ssl_ablations", description=__doc__.split("\n\n")[0], knobs=KNOBS, run_setting=run_setting,
    columns=[metric("val_linear_probe", "val linear probe"), metric("val_knn_accuracy", "val kNN"),
             STEPS_X_BATCH, FINAL_LOSS, TRAIN_WALL],
    plotted=[("val_linear_probe", "linear probe"), ("val_knn_accuracy", "kNN")],
    ylabel="accuracy on the world's val split", intro=intro,
    footer=("One seed per setting: differences under about 0.05 (the quick recipe's linear-probe spread across "
            "seeds is 0.025-0.028 sd, results/calibration/m7.md) are noise."),
    default_out=REPO / "results" / "ssl_ablations")


if __name__ == "__main__":
    sys.exit(main(STUDY))
