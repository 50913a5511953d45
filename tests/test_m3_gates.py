"""m3 gate honesty: BLEU-4 and CIDEr-D (beam search, the real quick-profile thresholds) fail for an
untrained captioner and for two planted bugs — the causal mask removed during training (the
decoder learns to copy the next token it is shown, useless when it must generate) and the image
cut off (the decoder never sees what is in it) — and the COCO path runs end to end on real images
and references when the shared coco-mini folder is present.

The bugs are planted through the seam (an :class:`Implementation` whose loss drops the mask, or
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
from milestones.base import RunContext
from milestones.common import to_float
from milestones.m3_caption import MILESTONE, RECIPES, THRESHOLDS, caption_images, decoding, train

pytestmark = [pytest.mark.m3, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not java_available(), reason="caption metrics need Java (PTB tokenizer)")]

LIMITS = THRESHOLDS["quick"]
RECIPE = replace(RECIPES["quick"], n_train=1024, n_test=200, steps=60, batch_size=32, warmup_steps=5,
                 max_minutes=None, decode_batch=200)


class NoCausalMask(Implementation):
    """Planted bug: training's teacher-forcing loss runs the decoder without its causal mask."""

    def captioner_loss(self, model, images, ids, pad_mask, causal=True):
        return super().captioner_loss(model, images, ids, pad_mask, causal=False)


class Blind(Implementation):
    """Planted bug: the image never reaches the decoder (every image the model is shown, in
    training and decoding, is blank)."""

    def captioner_loss(self, model, images, ids, pad_mask, causal=True):
        return super().captioner_loss(model, torch.zeros_like(images), ids, pad_mask, causal)

    def captioner_beam_search(self, model, images, *args, **kwargs):
        return super().captioner_beam_search(model, torch.zeros_like(images), *args, **kwargs)


@pytest.fixture(scope="module")
def world():
    return make_split("train", RECIPE.n_train), make_split("test", RECIPE.n_test)


def gate_scores(model, tok, test, bug=impl):
    caps, _ = caption_images(model, tok, test.images, method="beam", **decoding(RECIPE), impl=bug)
    s = score_captions(caps, test.captions, metrics=("BLEU", "CIDEr"))
    return s["BLEU-4"], s["CIDEr"], caps


def assert_fails(bleu4, cider):
    assert bleu4 < LIMITS["BLEU-4"], f"BLEU-4 {bleu4:.3f} clears the gate"
    assert cider < LIMITS["CIDEr"], f"CIDEr {cider:.3f} clears the gate"


def test_untrained_model_fails(world):
    train_split, test = world
    tok = impl.tokenizer_train((c for caps in train_split.captions for c in caps), min_freq=1)
    torch.manual_seed(0)
    model = impl.captioner_build({"vocab_size": len(tok), **RECIPE.model}).eval()
    assert_fails(*gate_scores(model, tok, test)[:2])


def test_causal_mask_removed_in_training_fails(world, tmp_path):
    model, tok, cfg, _ = train(RECIPE, world[0], RunContext(out_dir=tmp_path, progress=False), NoCausalMask("mmsys"))
    # teacher forcing without the mask is easy (each position reads the token it must predict) ...
    test = world[1]
    ids, _ = impl.caption_encode_sets(tok, test.captions[:64], cfg["max_len"])
    with torch.no_grad():
        x, pad = to_float(test.images[:64]), ids == impl.caption_special_ids()["pad"]
        unmasked, masked = (impl.captioner_loss(model, x, ids, pad, causal=c).item() for c in (False, True))
    assert unmasked < 0.5 * masked, (unmasked, masked)
    # ... but generation, which cannot see the future, is useless
    assert_fails(*gate_scores(model, tok, test)[:2])


def test_image_cut_fails(world, tmp_path):
    blind = Blind("mmsys")
    model, tok, _, _ = train(RECIPE, world[0], RunContext(out_dir=tmp_path, progress=False), blind)
    bleu4, cider, caps = gate_scores(model, tok, world[1], blind)
    assert len(set(caps)) == 1  # blind: one caption for every image
    assert_fails(bleu4, cider)


COCO_MINI = shared_data_root() / "coco-mini" if shared_data_root() else None


@pytest.mark.skipif(COCO_MINI is None or not COCO_MINI.is_dir(),
                    reason="shared coco-mini data not found (set MMSYS_SHARED_DATA or place it at ../shared/data)")
def test_coco_mini_end_to_end(tmp_path):
    """Real COCO images and references: train a few steps, decode, score with pycocoevalcap."""
    ctx = RunContext(profile="full", out_dir=tmp_path, data_root=COCO_MINI, progress=False, smoke=True)
    result = MILESTONE.run(ctx)
    train_info, test_info = result.datasets
    assert train_info["name"] == "coco/train2017" and train_info["n_images"] == 80
    assert test_info["name"] == "coco/val2017-test" and test_info["n_images"] == 159 - 159 // 2
    assert test_info["n_captions"] >= 5 * test_info["n_images"]  # the real references, all of them
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr",
                "greedy_BLEU-4", "greedy_CIDEr"):
        assert 0.0 <= result.metrics[key] <= (10.0 if "CIDEr" in key else 1.0), key
    assert "SPICE" in result.info["skipped"]
    assert (tmp_path / "checkpoint.pt").is_file() and all(Path(f).is_file() for f in result.figures)
    assert result.info["training"]["steps"] == MILESTONE.smoke_recipes["full"].steps
