"""m4's pitfalls, planted: each symptom (milestones.m4_measure.symptoms, the function run() uses)
betrays its planted bug and names it beside a failing gate, and the same tiny recipe without a bug
shows none of them. Plants: learning rate 0 (eps-MSE not falling), the time embedding hidden
(m4.TimeBlind: t ignored), x_0 regressed instead of the noise. Also the comparison gates'
conditioning: a constant output or garbage model, whose DDIM and DDPM are equally bad, fails them."""

import math
from dataclasses import replace

import pytest

from milestones import m4_ddpm as m4
from milestones import m4_measure as mm
from milestones.base import RunContext, RunResult
from milestones.common import world_split

pytestmark = [pytest.mark.m4, pytest.mark.usefixtures("one_thread")]

TINY = replace(m4.RECIPES["quick"], n_train=512, steps=80, batch_size=32, warmup_steps=5, lr=3e-3, ema_decay=0.9,
               unet=dict(base=8, channel_mults=(1, 2), n_res=1, attn_resolutions=(), dropout=0.0, groups=4))
PLANTS = {"honest": {}, "lr0": {"lr": 0.0}, "no_time": {"bug": "no_time"}, "x0_target": {"bug": "x0_target"}}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    ctx = RunContext(progress=False)
    train, val = world_split(ctx, "train", 512, captions=False), world_split(ctx, "val", 64, captions=False)
    out = {}
    for name, change in PLANTS.items():
        recipe = replace(TINY, **change)
        model, schedule, summary = m4.train(recipe, train, RunContext(out_dir=tmp_path_factory.mktemp(name),
                                                                       progress=False))
        out[name] = mm.symptoms(model, schedule, summary, recipe, val.images)
    return out


def diagnosed(symptoms: dict) -> set[str]:
    """The pitfalls the grader names beside a failing fid_ddim50 row with these symptoms."""
    rows = [{"gate": "fid_ddim50", "status": "fail"}]
    m4.MILESTONE.diagnose(rows, RunResult(metrics={}, symptoms=symptoms))
    return {p["pitfall"] for p in rows[0].get("likely_pitfalls", [])}


@pytest.mark.integration
def test_planted_pitfalls_are_diagnosed(measured):
    assert diagnosed(measured["honest"]) == set(), measured["honest"]
    assert "eps-MSE not falling" in diagnosed(measured["lr0"]), measured["lr0"]
    assert "timestep ignored" in diagnosed(measured["no_time"]), measured["no_time"]
    assert measured["no_time"]["eps_time_sensitivity"] == 0.0
    assert "x0 predicted instead of eps" in diagnosed(measured["x0_target"]), measured["x0_target"]


def test_comparison_gates_are_conditioned_on_the_fid_gates():
    th = m4.THRESHOLDS["quick"]
    good, bad = th["fid_ddim50"] / 2, th["fid_ddim50"] * 2
    ok = mm.conditioned(0.05, 20.0, good, th["fid_ddpm"] / 2, th)
    assert ok == {"ddim_vs_ddpm_fid_rel_diff": 0.05, "ddim_speedup": 20.0}
    # garbage: DDIM and DDPM equally bad and the sampler as fast: the gates must still fail
    garbage = mm.conditioned(0.0, 20.0, bad, bad, th)
    assert garbage["ddim_vs_ddpm_fid_rel_diff"] == math.inf and garbage["ddim_speedup"] == 0.0
    gates = {g.key: g for g in m4.MILESTONE.gates}
    assert not any(gates[k].passes(v, th[k]) for k, v in garbage.items())
    assert mm.conditioned(0.0, 20.0, good, math.nan, th)["ddim_vs_ddpm_fid_rel_diff"] == math.inf


def test_every_gate_has_a_control():
    covered = {g for c in m4.MILESTONE.controls for g in c.gates}
    assert covered == {g.key for g in m4.MILESTONE.gates}
    assert {"untrained U-Net", "constant output", "per-pixel Gaussian"} <= {c.name for c in m4.MILESTONE.controls}
