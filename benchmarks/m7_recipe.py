"""Choose m7's quick recipe on the world's validation split (never the test split): train m7's quick
recipe with the given changes through the milestone's own training function, and print the
linear-probe and kNN accuracy of the val split's features (m7's probes, fitted on its probe images).

    python -m benchmarks.m7_recipe                                   # the quick recipe as it is
    python -m benchmarks.m7_recipe --temperature 0.05 --crop-min 1.0 # one candidate

The single-knob studies are ``python -m studies.ssl_ablations KNOB``; this is for a combination of
the knobs they pointed to. One torch thread; run candidates side by side as separate processes.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace


def candidate(base, temperature: float | None, crop_min: float | None, steps: int | None):
    """``base`` (an M7Recipe) with the given fields changed (None = as it is)."""
    model, views = dict(base.model), dict(base.views)
    if temperature is not None:
        model["temperature"] = temperature
    if crop_min is not None:
        views["crop_scale"] = (crop_min, 1.0)
    r = replace(base, model=model, views=views)
    if steps is not None:
        r = replace(r, steps=steps, warmup_steps=base.warmup_steps * steps // base.steps)
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.m7_recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--temperature", type=float)
    p.add_argument("--crop-min", type=float, help="the random resized crop's smallest area (1.0 = no crop)")
    p.add_argument("--steps", type=int, help="training steps (the warm-up scaled with them)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.crop_min is not None and not 0 < a.crop_min <= 1:
        p.error(f"--crop-min must be in (0, 1], got {a.crop_min}")
    import tempfile
    import time
    from pathlib import Path

    import torch
    torch.set_num_threads(1)
    from milestones.base import RunContext
    from milestones.m7_checks import features, score_split
    from milestones.m7_ssl import RECIPES, load_data, probe_split, train
    recipe = candidate(RECIPES["quick"], a.temperature, a.crop_min, a.steps)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(out_dir=Path(tmp), seed=a.seed, progress=False)
        train_split, val, _ = load_data(recipe, ctx)
        t0 = time.perf_counter()
        model, summary = train(recipe, train_split, ctx)
        wall = time.perf_counter() - t0
        probe = probe_split(train_split, recipe.n_probe)
        m, _, _ = score_split(model, features(model, probe.images), probe.labels, val)
    print(json.dumps({"temperature": recipe.model["temperature"], "crop_scale": list(recipe.views["crop_scale"]),
                      "steps": recipe.steps, "seed": a.seed, "val_linear_probe": m["linear_probe"],
                      "val_knn_accuracy": m["knn_accuracy"], "train_wall_s": round(wall, 1),
                      "final_loss": (summary.get("final_metrics") or {}).get("loss")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
