"""studies.clip_scaling: the power-law fit, the sweeps' recipes, the held-out loss, bad input, and (slow)
the whole --smoke path."""

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from studies.clip_scaling import (FULL, SMOKE, base_recipe, fit_power_law, heldout_loss, main, power_law_band,
                                  recipe_for, settings)


def test_power_law_fit_recovers_a_known_exponent():
    rng = np.random.default_rng(0)
    x = np.array([1e3, 3e3, 1e4, 3e4, 5e4])
    y = 3 * x ** -0.3 * np.exp(rng.normal(0, 0.01, len(x)))
    fit = fit_power_law(x, y)
    assert abs(fit["alpha"] - 0.3) < 0.02 and abs(fit["a"] - 3) / 3 < 0.2
    lo_a, hi_a = fit["alpha_ci"]
    assert lo_a < 0.3 < hi_a and fit["r2"] > 0.99 and fit["n"] == 5
    grid = np.geomspace(1e3, 5e4, 20)
    mid, lo, hi = power_law_band(fit, grid)
    assert np.all(hi - lo > 0) and np.all((lo <= mid) & (mid <= hi))
    assert np.all((lo <= 3 * grid ** -0.3) & (3 * grid ** -0.3 <= hi))  # the band holds the true curve
    exact = fit_power_law(x, 3 * x ** -0.3)  # noiseless: the exact exponent, a zero-width interval
    assert exact["alpha"] == pytest.approx(0.3, abs=1e-9) and exact["alpha_ci"][1] - exact["alpha_ci"][0] < 1e-6


@pytest.mark.parametrize("study", [FULL, SMOKE], ids=["full", "smoke"])
def test_each_sweep_changes_only_its_own_knob(study):
    base = asdict(base_recipe(study))
    assert len(study.widths) >= 5 and len(study.sizes) >= 5
    assert study.base_width in study.widths and study.base_n in study.sizes and study.n_val % study.loss_batch == 0
    for sweep, values, allowed in (("params", study.widths, {"model"}), ("data", study.sizes, {"n_train"})):
        for v in values:
            r = asdict(recipe_for(study, sweep, v))
            assert {k for k in base if r[k] != base[k]} <= allowed, (sweep, v)
            if sweep == "params":
                changed = {k for k in base["model"] if r["model"][k] != base["model"][k]}
                assert changed <= {"vision_dim", "text_dim", "embed_dim"}
                assert r["model"]["vision_dim"] == r["model"]["text_dim"] == r["model"]["embed_dim"] == v
            else:
                assert r["n_train"] == v
    assert len(settings(study)) == len(study.widths) + len(study.sizes) - 1  # the base trained once
    with pytest.raises(ValueError):
        recipe_for(study, "depth", 3)


def test_the_full_base_is_m2s_quick_recipe_with_fewer_steps():
    from milestones.m2_clip import RECIPES
    quick, base = asdict(RECIPES["quick"]), asdict(base_recipe(FULL))
    assert {k for k in quick if quick[k] != base[k]} == {"steps", "warmup_steps"}
    with pytest.raises(ValueError):
        recipe_for(FULL, "params", 30)  # not a multiple of the 4 heads


def test_heldout_loss_on_hand_made_examples():
    B = 8
    eye = torch.eye(B)
    assert heldout_loss(eye, eye, 100.0, batch=B) < 1e-3  # aligned orthogonal pairs at a high scale
    same = F.normalize(torch.ones(B, 4), dim=-1)
    assert heldout_loss(same, same, 20.0, batch=B) == pytest.approx(math.log(B), abs=1e-5)  # all alike: log B
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(2 * B + 3, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(2 * B + 3, 5, generator=g), dim=-1)
    direct = []
    for i in (0, B):  # two full batches; the remainder of 3 is dropped
        logits = 20.0 * img[i:i + B] @ txt[i:i + B].T
        labels = torch.arange(B)
        direct.append((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
    assert heldout_loss(img, txt, 20.0, batch=B) == pytest.approx(float(sum(direct) / 2), abs=1e-5)
    # a duplicate masked out of the denominators: pairs 0 and 1 share an image key
    keys = torch.arange(2 * B + 3)
    keys[1] = 0
    logits = 20.0 * img[:B] @ txt[:B].T
    logits[0, 1] = logits[1, 0] = float("-inf")
    labels = torch.arange(B)
    masked = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert heldout_loss(img[:B], txt[:B], 20.0, keys[:B], batch=B) == pytest.approx(float(masked), abs=1e-5)


@pytest.mark.parametrize("bad", [["--jobs", "0"], "out-is-a-file"])
def test_bad_input_exits_2_and_writes_nothing(bad, tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("x")
    argv = ["--out", str(f)] if bad == "out-is-a-file" else [*bad, "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error:" in err[-1] and ("--jobs" in err[-1] or "is a file" in err[-1])
    assert f.read_text() == "x" and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smoke_run_writes_the_table_figure_and_rows(tmp_path):
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "scaling.json").read_text())
    assert {"command", "commit", "dirty", "cpu", "torch_threads", "jobs", "wall_s", "seed", "base_recipe", "rows",
            "fits"} <= set(rec)
    assert rec["smoke"] and rec["torch_threads"] == 1 and len(rec["rows"]) == 9
    for row in rec["rows"]:
        for key in ("params", "params_non_embedding", "compute_flops", "val_loss", "val_loss_unmasked",
                    "val_loss_own_T", "val_zeroshot_top1", "val_zeroshot_top5", "val_t2i_R@10", "train_wall_s",
                    "final_train_loss"):
            assert math.isfinite(row[key]), key
        assert 0 < row["params_non_embedding"] < row["params"]
    widths = sorted({r["width"] for r in rec["rows"] if r["n_train"] == SMOKE.base_n})
    assert widths == list(SMOKE.widths)
    assert sorted({r["n_train"] for r in rec["rows"] if r["width"] == SMOKE.base_width}) == list(SMOKE.sizes)
    for name in ("params", "data"):
        assert math.isfinite(rec["fits"][name]["alpha"]) and len(rec["fits"][name]["alpha_ci"]) == 2
    md = (tmp_path / "scaling.md").read_text()
    assert "## Parameters" in md and "## Training pairs" in md and "spending compute" in md
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
