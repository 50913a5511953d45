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
    from milestones.m7_ssl import RECIPES
    from studies.ssl_ablations import train_and_score
    recipe = candidate(RECIPES["quick"], a.temperature, a.crop_min, a.steps)
    print(json.dumps({"temperature": recipe.model["temperature"], "crop_scale": list(recipe.views["crop_scale"]),
                      "seed": a.seed, **train_and_score(recipe, a.seed)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
