"""Validation is not test: every milestone reports what recipes are chosen on, measured on a split
disjoint from the test split, after the gates (issue "Gates an auditor can trust", item 6).
Small constructed inputs and untrained models; no training."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from eval.reference.data.world import make_split
from eval.validation import RULE, record
from grader.report import to_markdown
from milestones import m2_clip as m2, m3_caption as m3, m4_ddpm as m4, m5_text_to_image as m5
from milestones.adapters import CANDIDATE as impl
from milestones.base import RunContext
from milestones.common import world_split

CTX = RunContext(world_seed=0)


def image_keys(split) -> set[bytes]:
    return {bytes(x.flatten().tolist()) for x in split.images}


@pytest.mark.integration
def test_world_val_split_is_disjoint_from_test():
    val, test = world_split(CTX, "val", 300), world_split(CTX, "test", 300)
    assert not image_keys(val) & image_keys(test)


@pytest.mark.integration
def test_m2_validates_on_the_val_split():
    train, val = make_split("train", 200), world_split(CTX, "val", 60)
    tok = impl.tokenizer_train([c for cs in train.captions for c in cs])
    torch.manual_seed(0)
    model = impl.clip_build({**m2.RECIPES["quick"].model, "vocab_size": len(tok)}).eval()
    v = m2.validate_world(model, tok, val)
    assert v["split"] == val.name == "world/val" and v["n"] == 60 and v["rule"] == RULE
    assert set(v["metrics"]) == {"val_t2i_R@10", "val_i2t_R@10", "val_zeroshot_top1", "val_zeroshot_top5"}
    assert all(0.0 <= x <= 1.0 for x in v["metrics"].values())
    assert m2.RECIPES["quick"].n_val > 0


@pytest.mark.integration
def test_m3_loads_a_val_split_beside_test():
    recipe = replace(m3.RECIPES["quick"], n_train=50, n_val=40, n_test=30)
    train, val, test = m3.load_data(recipe, CTX)
    assert (len(train), len(val), len(test)) == (50, 40, 30) and val.name.endswith("val")
    assert not image_keys(val) & image_keys(test)
    assert m3.load_data(replace(recipe, n_val=0), CTX)[1] is None


def test_m4_validation_is_fid_against_val_not_test():
    recipe = m4.RECIPES["quick"]
    floor = SimpleNamespace(name="world/val")
    info = {"fids": {"inception": {"ddim": 130.0, "val": 128.0}, "attributes": {"ddim": 10.0, "val": 11.0}}}
    v = m4.validation_record(recipe, floor, info)
    assert v["metrics"] == {"val_fid_ddim50": 128.0, "val_in_domain_fid_ddim50": 11.0} and v["split"] == "world/val"
    assert "training images" in m4.validation_record(replace(recipe, data="cifar10"), floor, info)["not_measured"]


@pytest.mark.integration
def test_m5_validation_prompts_come_from_the_val_split():
    seen = {}

    def sample(prompts, guidance):
        seen["prompts"], seen["guidance"] = prompts, guidance
        return torch.zeros(len(prompts), 3, 32, 32, dtype=torch.uint8)

    import eval.text2image_controls as controls
    from eval.prompt_match import world_prompts
    recipe = replace(m5.RECIPES["quick"], n_val=8)
    original = controls.gate_values
    try:
        controls.gate_values = lambda judges, x, p, floor: {"prompt_match": 0.5, "clip_score": 0.1}
        v = m5.validate(sample, None, 0.0, recipe, world_seed=0)
    finally:
        controls.gate_values = original
    assert seen["prompts"] == world_prompts("val", 8)[0] and seen["prompts"] != world_prompts("test", 8)[0]
    assert seen["guidance"] == recipe.sampling.guidance
    assert v["metrics"] == {"val_prompt_match": 0.5, "val_clip_score": 0.1} and v["n"] == 8
    assert "class names" in m5.validate(sample, None, 0.0, replace(recipe, data="cifar10"), 0)["not_measured"]


def test_report_shows_validation_or_says_it_was_not_measured():
    base = {"milestone": "toy", "title": "t", "profile": "quick", "gates": [], "tests": {}, "criteria": [],
            "status": "pass", "error": None,
            "provenance": {"seed": 0, "git": {"commit": "abc" * 5, "dirty": False}, "wall_time_s": 1.0,
                           "device": {"device": "cpu"}, "command": "python grader.py toy", "libraries": {},
                           "network": {"statement": "offline"}}}
    md = to_markdown({**base, "validation": record("world/val", 10, {"val_acc": 0.5}, "as the gate")})
    assert "## Validation (what recipes are chosen on)" in md and "| val_acc | 0.5" in md and "`world/val`" in md
    assert "Not measured: this profile has no validation split." in to_markdown({**base, "validation": {}})
    assert "Not measured: a reason." in to_markdown({**base, "validation": {"not_measured": "a reason"}})


def test_hold_out_last_keeps_captions_and_meta_in_step():
    from eval.validation import hold_out_last
    split = world_split(CTX, "train", 30)
    train, val = hold_out_last(split, 10)
    assert (len(train), len(val)) == (20, 10) and val.name == "world/val"
    assert val.captions == split.captions[20:] and torch.equal(val.images, split.images[20:])
    assert val.identity["held_out"]["this_part"] == "validation images"
