"""Gate honesty for m7: features built to be right pass both gates at the real quick thresholds;
the grader's controls (untrained encoder, raw pixels, constant features, permuted labels) fail
them, measured with the gates' own probes on world images; a collapsed representation is
diagnosed. The calibrated controls of a full-size run are in every report (results/quick/m7)."""

import pytest
import torch

from eval.reference.data.world import WorldConfig, make_split
from milestones import m7_ssl as m7
from milestones.m7_checks import PITFALLS, gate_metrics, measure_controls, measure_symptoms

pytestmark = [pytest.mark.m7, pytest.mark.usefixtures("one_thread")]
QUICK = m7.THRESHOLDS["quick"]
GATES = {g.key: g for g in m7.MILESTONE.gates}


def passes(key, value):
    return GATES[key].passes(value, QUICK[key])


@pytest.fixture(scope="module")
def world():
    cfg = WorldConfig(seed=0)
    return (make_split("train", 1500, cfg, single=True, captions=False),
            make_split("test", 500, cfg, single=True, captions=False))


def clustered(labels: torch.Tensor, n_classes: int, noise: float, seed: int) -> torch.Tensor:
    """Features near one random centre per class: what a good representation looks like."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, 64, generator=torch.Generator().manual_seed(99))
    return centres[labels] + noise * torch.randn(len(labels), 64, generator=g)


@pytest.mark.integration
def test_right_features_pass_and_every_control_fails(world):
    probe, test = world
    n = len(test.classes)
    px, tx = clustered(probe.labels, n, 0.5, 1), clustered(test.labels, n, 0.5, 2)
    metrics, preds = gate_metrics(px, probe.labels, tx, test.labels, n)
    assert passes("linear_probe", metrics["linear_probe"]) and passes("knn_accuracy", metrics["knn_accuracy"])
    config = {**m7.SMOKE_RECIPES["quick"].model}
    controls = measure_controls(config, 0, probe, test, (px, tx), preds)
    assert set(controls) == {c.name for c in m7.MILESTONE.controls}
    for name, values in controls.items():
        for key, value in values.items():
            assert not passes(key, value), f"control {name} clears {key} with {value}"


def test_collapsed_features_are_diagnosed(world):
    _, test = world
    collapsed = torch.ones(len(test), 32) + 1e-4 * torch.randn(len(test), 32, generator=torch.Generator().manual_seed(0))
    symptoms = measure_symptoms(collapsed, None, 0)
    found = [p.name for p in PITFALLS if p.diagnose(symptoms)]
    assert found == ["representation collapsed"]
    healthy = measure_symptoms(clustered(test.labels, 10, 0.5, 3), None, 0)
    assert not [p.name for p in PITFALLS if p.diagnose(healthy)]
