"""The studies' recipes: each ablation changes only its own knob of m7's quick recipe."""

from dataclasses import asdict

import pytest

from milestones.m7_ssl import RECIPES
from studies.ssl_ablations import KNOBS, recipe_for

BASE = asdict(RECIPES["quick"])


@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_each_ablation_changes_only_its_knob(knob):
    assert len(KNOBS[knob]) >= (5 if knob in ("temperature", "augment") else 4)
    for value in KNOBS[knob]:
        r = asdict(recipe_for(knob, value))
        changed = {k for k in BASE if r[k] != BASE[k]}
        allowed = {"temperature": {"model"}, "batch": {"batch_size", "steps", "warmup_steps"},
                   "augment": {"views"}, "queue": {"model"}}[knob]
        assert changed <= allowed, (value, changed)
        if knob == "batch":
            assert r["steps"] * r["batch_size"] == BASE["steps"] * BASE["batch_size"]
    with pytest.raises(ValueError):
        recipe_for("depth", 3)
