"""The ablation studies: each changes only its own knob of its milestone's quick recipe (m7, m2), and the
command refuses bad input with exit 2."""

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


def test_clip_ablations_change_only_their_knob():
    from milestones.m2_clip import RECIPES as M2
    from studies.clip_ablations import KNOBS as CLIP_KNOBS
    from studies.clip_ablations import recipe_for as clip_recipe_for
    base = asdict(M2["quick"])
    assert len(CLIP_KNOBS["temperature"]) >= 5 and len(CLIP_KNOBS["batch"]) >= 4
    for knob, values in CLIP_KNOBS.items():
        for value in values:
            r = asdict(clip_recipe_for(knob, value))
            changed = {k for k in base if r[k] != base[k]}
            assert changed <= ({"model"} if knob == "temperature" else {"batch_size", "steps", "warmup_steps"})
            if knob == "temperature":
                assert r["model"]["init_temperature"] == value
                assert {k for k in r["model"] if r["model"][k] != base["model"].get(k)} == {"init_temperature"}
            else:
                assert r["steps"] * r["batch_size"] == base["steps"] * base["batch_size"]
    with pytest.raises(ValueError):
        clip_recipe_for("queue", 4096)


def test_ablation_command_refuses_bad_input(tmp_path):
    from studies.clip_ablations import STUDY
    from studies.ablation import main
    afile = tmp_path / "a.txt"
    afile.write_text("keep")
    for argv in (["batch", "--jobs", "0"], ["batch", "--out", str(afile)], ["depth"]):
        with pytest.raises(SystemExit) as e:
            main(STUDY, argv)
        assert e.value.code == 2
    assert afile.read_text() == "keep"


def _fake_setting(args):
    knob, value, seed = args
    return {"setting": str(value), "score": value / 10, "steps": 10, "batch_size": 4, "final_loss": None,
            "train_wall_s": 0.0}


def test_ablation_main_writes_table_record_and_plot(tmp_path):
    import json

    from studies.ablation import FINAL_LOSS, STEPS_X_BATCH, Study, main, metric
    study = Study(name="mX", module="studies.fake", description="fake", knobs={"k": [1, 2, 3]},
                  run_setting=_fake_setting, columns=[metric("score", "score", 2), STEPS_X_BATCH, FINAL_LOSS],
                  plotted=[("score", "score")], ylabel="score", intro=lambda r: f"knob {r['knob']}.",
                  footer="noise.", default_out=tmp_path)
    assert main(study, ["k", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "k.md").read_text().splitlines()
    assert md[0] == "# mX ablation: k" and md[2].endswith("knob k.")
    assert md[4:7] == ["| setting | score | steps x batch | final loss |", "|---|---|---|---|",
                       "| 1 | 0.10 | 10 x 4 | - |"]
    record = json.loads((tmp_path / "k.json").read_text())
    assert [r["setting"] for r in record["rows"]] == ["1", "2", "3"] and record["command"].startswith("python -m studies.fake k")
    assert (tmp_path / "k.png").stat().st_size > 1000
