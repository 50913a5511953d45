"""m3 gate honesty: BLEU-4 and CIDEr-D (beam search, the real quick-profile thresholds) fail for an
untrained captioner, for the run's controls (untrained model, shuffled captions, constant output:
:func:`milestones.m3_caption.measure_controls`, as run() measures them) and for planted bugs — the
causal mask removed (the decoder learns to copy the next token it is shown, useless when it must
generate), the image cut off (the decoder never sees what is in it), learning rate 0 — each of
which the run's symptoms (:func:`milestones.m3_caption.measure_symptoms`) name as the likely
pitfall beside the failing gates, while an honest run shows none. The COCO path runs end to end
on real images and references when the shared coco-mini folder is present.

The bugs are planted through the seam (an :class:`Implementation` whose decoder drops the mask, or
whose model is only ever shown blank images), so they hold for any implementation graded.
The bug runs are short (60 steps of 32 pairs). With the full quick recipe (600 steps, measured once,
see the README's m3 section) the bugs gave: causal mask removed, BLEU-4 0.000 / CIDEr-D 0.001 ("one
one one ..."); cross-attention cut (image features zeroed), BLEU-4 0.282 / CIDEr-D 0.53 (one caption
for every image) — both far below the quick thresholds 0.45 / 2.0 that the correct recipe clears
(0.54 / 3.2).
"""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from eval.caption_metrics import java_available, score_captions
from eval.reference.data.paths import shared_data_root
from eval.reference.data.world import make_split
from milestones.adapters import CANDIDATE as impl
from milestones.adapters import Implementation
from eval.caption_controls import most_frequent_caption, shuffled
from milestones.base import RunContext, RunResult
from milestones.common import to_float
from milestones.m3_caption import (MILESTONE, RECIPES, THRESHOLDS, caption_images, decoding, measure_controls,
                                   measure_symptoms, train)

pytestmark = [pytest.mark.m3, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not java_available(), reason="caption metrics need Java (PTB tokenizer)")]

LIMITS = THRESHOLDS["quick"]
RECIPE = replace(RECIPES["quick"], n_train=1024, n_test=200, steps=60, batch_size=32, warmup_steps=5,
                 max_minutes=None, decode_batch=200)


class NoCausalMask(Implementation):
    """Planted bug: the decoder has no causal mask (teacher-forcing loss and logits; incremental
    decoding never shows it future tokens anyway)."""

    def captioner_loss(self, model, images, ids, pad_mask, causal=True):
        return super().captioner_loss(model, images, ids, pad_mask, causal=False)

    def captioner_logits(self, model, images, ids, pad_mask=None, causal=True):
        return super().captioner_logits(model, images, ids, pad_mask, causal=False)


class Blind(Implementation):
    """Planted bug: the image never reaches the decoder (every image the model is shown, in
    training and decoding, is blank)."""

    def captioner_loss(self, model, images, ids, pad_mask, causal=True):
        return super().captioner_loss(model, torch.zeros_like(images), ids, pad_mask, causal)

    def captioner_beam_search(self, model, images, *args, **kwargs):
        return super().captioner_beam_search(model, torch.zeros_like(images), *args, **kwargs)

    def captioner_logits(self, model, images, ids, pad_mask=None, causal=True):
        return super().captioner_logits(model, torch.zeros_like(images), ids, pad_mask, causal)


@pytest.fixture(scope="module")
def world():
    return make_split("train", RECIPE.n_train), make_split("test", RECIPE.n_test)


@pytest.fixture(scope="module")
def honest(world, tmp_path_factory):
    """The honest implementation on the short recipe: (model, tokenizer, config, summary)."""
    return train(RECIPE, world[0], RunContext(out_dir=tmp_path_factory.mktemp("honest"), progress=False), impl)


def diagnosed(run, test, bleu4, cider, bug=impl, recipe=RECIPE) -> tuple[set, dict]:
    """The pitfalls the grader names beside the gate rows of ``run`` (model, tok, config, summary)
    whose gates scored ``bleu4`` / ``cider``, from the symptoms run() measures; and those symptoms."""
    model, tok, cfg, summary = run
    symptoms, missing = measure_symptoms(model, tok, test, cfg["max_len"], summary, recipe, bug)
    assert not missing and set(symptoms) == {p.symptom for p in MILESTONE.pitfalls}
    result = RunResult(metrics={"BLEU-4": bleu4, "CIDEr": cider}, symptoms=symptoms)
    rows = MILESTONE.verdicts(result, "quick")
    MILESTONE.diagnose(rows, result)
    return {p["pitfall"] for r in rows for p in r.get("likely_pitfalls", [])}, symptoms


def gate_scores(model, tok, test, bug=impl):
    caps, _ = caption_images(model, tok, test.images, method="beam", **decoding(RECIPE), impl=bug)
    s = score_captions(caps, test.captions, metrics=("BLEU", "CIDEr"))
    return s["BLEU-4"], s["CIDEr"], caps


def assert_fails(bleu4, cider):
    assert bleu4 < LIMITS["BLEU-4"], f"BLEU-4 {bleu4:.3f} clears the gate"
    assert cider < LIMITS["CIDEr"], f"CIDEr {cider:.3f} clears the gate"


@pytest.mark.integration
def test_untrained_model_fails(world):
    train_split, test = world
    tok = impl.tokenizer_train((c for caps in train_split.captions for c in caps), min_freq=1)
    torch.manual_seed(0)
    model = impl.captioner_build({"vocab_size": len(tok), **RECIPE.model}).eval()
    assert_fails(*gate_scores(model, tok, test)[:2])


@pytest.mark.integration
def test_controls_fail_both_gates(world, honest):
    """The three controls, measured as run() measures them, each fail both quick gates."""
    model, tok, cfg, _ = honest
    test = world[1]
    caps = gate_scores(model, tok, test)[2]
    values, info = measure_controls(cfg, tok, test, caps, world[0].captions, RECIPE, RunContext(progress=False))
    assert set(values) == {c.name for c in MILESTONE.controls}
    rows = MILESTONE.control_rows(RunResult(metrics={}, controls=values), "quick")
    assert len(rows) == 6 and all(r["passed"] and not r["cleared"] for r in rows), rows
    assert set(info["samples"]["constant output"]) == {info["constant_caption"]}


def test_control_captions():
    caps = [f"caption {i}" for i in range(50)]
    out = shuffled(caps, seed=3)
    assert sorted(out) == sorted(caps) and all(a != b for a, b in zip(out, caps))  # a derangement
    assert shuffled(caps, seed=3) == out  # seeded
    assert most_frequent_caption([["a b", "c"], ["c", "d"], ["a b", "c"]]) == ("c", 3)


@pytest.mark.integration
def test_honest_run_shows_no_pitfall(world, honest):
    """Even beside failing gates (this run is short), an honest run's symptoms name no pitfall."""
    found, symptoms = diagnosed(honest, world[1], 0.0, 0.0)
    assert found == set(), symptoms
    assert symptoms["future_token_leak"] < 1e-4 and symptoms["image_sensitivity"] > 1e-2
    assert symptoms["loss_drop_after_warmup"] > 0.3


@pytest.mark.integration
def test_causal_mask_removed_fails_and_is_diagnosed(world, tmp_path):
    bug = NoCausalMask("mmsys")
    run = train(RECIPE, world[0], RunContext(out_dir=tmp_path, progress=False), bug)
    model, tok, cfg, _ = run
    # teacher forcing without the mask is easy (each position reads the token it must predict) ...
    test = world[1]
    ids, _ = impl.caption_encode_sets(tok, test.captions[:64], cfg["max_len"])
    with torch.no_grad():
        x, pad = to_float(test.images[:64]), ids == impl.caption_special_ids()["pad"]
        unmasked, masked = (impl.captioner_loss(model, x, ids, pad, causal=c).item() for c in (False, True))
    assert unmasked < 0.5 * masked, (unmasked, masked)
    # ... but generation, which cannot see the future, is useless
    bleu4, cider, _ = gate_scores(model, tok, test, bug)
    assert_fails(bleu4, cider)
    # and the report names the pitfall: later tokens move earlier logits
    found, symptoms = diagnosed(run, test, bleu4, cider, bug)
    assert found == {"caption decoder sees future tokens"}, symptoms


@pytest.mark.integration
def test_image_cut_fails_and_is_diagnosed(world, tmp_path):
    blind = Blind("mmsys")
    run = train(RECIPE, world[0], RunContext(out_dir=tmp_path, progress=False), blind)
    bleu4, cider, caps = gate_scores(run[0], run[1], world[1], blind)
    assert len(set(caps)) == 1  # blind: one caption for every image
    assert_fails(bleu4, cider)
    found, symptoms = diagnosed(run, world[1], bleu4, cider, blind)
    assert found == {"cross-attention ignores the image"}, symptoms


@pytest.mark.integration
def test_learning_rate_zero_fails_and_is_diagnosed(world, tmp_path):
    """lr 0 on a tiny captioner: the loss stays flat after warm-up, and the report says so."""
    tiny = dict(RECIPE.model, enc_dim=32, enc_depth=1, enc_heads=2, dim=32, depth=1, n_heads=2)
    recipe = replace(RECIPE, model=tiny, lr=0.0, steps=40, batch_size=16)
    run = train(recipe, world[0], RunContext(out_dir=tmp_path, progress=False), impl)
    bleu4, cider, _ = gate_scores(run[0], run[1], world[1])
    assert_fails(bleu4, cider)
    found, symptoms = diagnosed(run, world[1], bleu4, cider, recipe=recipe)
    assert found == {"loss flat after warm-up"}, symptoms


COCO_MINI = shared_data_root() / "coco-mini" if shared_data_root() else None


@pytest.mark.skipif(COCO_MINI is None or not COCO_MINI.is_dir(),
                    reason="shared coco-mini data not found (set MMSYS_SHARED_DATA or place it at ../shared/data)")
@pytest.mark.integration
def test_coco_mini_end_to_end(tmp_path):
    """Real COCO images and references: train a few steps, decode, score with pycocoevalcap."""
    ctx = RunContext(profile="full", out_dir=tmp_path, data_root=COCO_MINI, progress=False, smoke=True)
    result = MILESTONE.run(ctx)
    train_info, val_info, test_info = result.datasets
    assert train_info["name"] == "coco/train2017" and train_info["n_images"] == 80
    assert val_info["name"] == "coco/val2017-val" and val_info["n_images"] == 159 // 2  # recipes are chosen here
    assert result.validation["split"] == "coco/val2017-val" and set(result.validation["metrics"]) == {
        "val_BLEU-4", "val_CIDEr"}
    assert test_info["name"] == "coco/val2017-test" and test_info["n_images"] == 159 - 159 // 2
    assert test_info["n_captions"] >= 5 * test_info["n_images"]  # the real references, all of them
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr",
                "greedy_BLEU-4", "greedy_CIDEr"):
        assert 0.0 <= result.metrics[key] <= (10.0 if "CIDEr" in key else 1.0), key
    assert "SPICE" in result.info["skipped"]
    assert result.metrics["SPICE"].startswith("not run (needs ")  # a skipped metric says so in the report
    # every run measures the controls and the pitfalls' symptoms
    assert set(result.controls) == {c.name for c in MILESTONE.controls}
    assert all(set(v) == {"BLEU-4", "CIDEr"} for v in result.controls.values())
    assert set(result.symptoms) == {p.symptom for p in MILESTONE.pitfalls}
    assert (tmp_path / "checkpoint.pt").is_file() and all(Path(f).is_file() for f in result.figures)
    assert result.info["training"]["steps"] == MILESTONE.smoke_recipes["full"].steps
