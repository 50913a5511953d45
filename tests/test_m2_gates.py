"""Gate honesty for m2: every gate (zero-shot top-5 and top-1 on held-out compositions,
text->image R@10) fails for an untrained model and for planted bugs — labels off the diagonal,
the temperature applied inverted — at the real quick thresholds, while the same short recipe
without the bug learns (so the bug, not the shortness, is what fails them). The grader's own
controls (untrained, shuffled captions, constant embedding) fail every gate, and each pitfall's
symptom is diagnosed when the pitfall is planted and not on the honest run.

Evaluation here uses smaller galleries than the grader (500 test images instead of 2,000), which
makes recall@10 *easier*: a model that fails here fails the real gate too."""

from dataclasses import replace

import pytest
import torch

from eval.reference.data.split import DataMissingError
from eval.reference.data.world import make_split
from milestones import m2_clip as m2
from milestones.adapters import CANDIDATE as impl
from milestones.base import RunResult
from milestones.m2_checks import measure_controls, measure_symptoms, untrained_clip

pytestmark = pytest.mark.m2
TINY = replace(m2.RECIPES["quick"], n_train=6000, steps=120, batch_size=128, warmup_steps=10, lr=2e-3,
               max_minutes=None,
               model=dict(image_tower="vit", image_size=32, patch_size=8, vision_dim=64, vision_depth=2,
                          vision_heads=2, context_length=32, text_dim=64, text_depth=1, text_heads=2,
                          mlp_ratio=2.0, embed_dim=64))


class LabelsOffDiagonal(type(impl)):
    """Planted bug in the implementation's loss: image i is trained to match the caption of image i + 1."""

    def clip_loss(self, image_emb, text_emb, scale, mask=None):
        return super().clip_loss(image_emb, torch.roll(text_emb, 1, dims=0), scale)


class TemperatureInverted(type(impl)):
    """Planted bug in the implementation's loss: logits multiplied by the temperature instead of divided by it."""

    def clip_loss(self, image_emb, text_emb, scale, mask=None):
        return super().clip_loss(image_emb, text_emb, 1.0 / scale, mask)


@pytest.fixture(scope="module")
def data():
    return make_split("train", TINY.n_train), make_split("test", 500), make_split("heldout", 300)


def gates(metrics, profile="quick"):
    return {g.key: g.passes(metrics[g.key], m2.THRESHOLDS[profile][g.key]) for g in m2.MILESTONE.gates}


@pytest.mark.integration
def test_untrained_model_fails_both_gates(data):
    train, test, heldout = data
    tok = impl.tokenizer_train([c for cs in train.captions for c in cs])
    torch.manual_seed(0)
    model = impl.clip_build({**m2.RECIPES["quick"].model, "vocab_size": len(tok)}).eval()
    metrics, _, _ = m2.evaluate_world(model, tok, test, heldout)
    assert metrics["zeroshot_top5"] < 0.25 and metrics["t2i_R@10"] < 0.15
    assert not any(gates(metrics).values()) and not any(gates(metrics, "full").values())


@pytest.fixture(scope="module")
def short_runs(data):
    train, test, heldout = data
    out = {}
    for name, trained in (("correct", impl), ("labels_off_diagonal", LabelsOffDiagonal(impl.package)),
                          ("temperature_inverted", TemperatureInverted(impl.package))):
        model, tok, summary = m2.train_clip(TINY, train, seed=0, progress=False, impl=trained, log_every=10)
        metrics, _, emb = m2.evaluate_world(model, tok, test, heldout)
        out[name] = dict(metrics=metrics, emb=emb, model=model, tok=tok, summary=summary)
    return out


@pytest.mark.integration
@pytest.mark.parametrize("bug", ["labels_off_diagonal", "temperature_inverted"])
def test_planted_bug_fails_both_gates(short_runs, bug):
    good, bad = short_runs["correct"]["metrics"], short_runs[bug]["metrics"]
    assert not any(gates(bad).values()), bad
    # the same recipe without the bug learns clearly more
    assert good["t2i_R@10"] > bad["t2i_R@10"] + 0.15
    assert good["zeroshot_top5"] > bad["zeroshot_top5"] + 0.2


def test_gate_direction_and_thresholds_raised():
    for g in m2.MILESTONE.gates:
        assert g.direction == ">" and not g.passes(None, 0.5) and not g.passes(float("nan"), 0.5)
    assert m2.THRESHOLDS["quick"]["zeroshot_top5"] > 0.60 and m2.THRESHOLDS["quick"]["t2i_R@10"] > 0.50
    full = m2.THRESHOLDS["full"]  # the spec's numbers, and a top-1 gate well above CIFAR-10's chance (0.10)
    assert (full["zeroshot_top5"], full["t2i_R@10"]) == (0.60, 0.50) and full["zeroshot_top1"] >= 0.2
    assert m2.THRESHOLDS["quick"]["zeroshot_top1"] > 10 / 80  # 10x chance over 80 compositions
    for thresholds in m2.THRESHOLDS.values():
        assert set(thresholds) == {g.key for g in m2.MILESTONE.gates}


def test_full_profile_names_missing_data(tmp_path):
    from milestones.base import RunContext
    with pytest.raises(DataMissingError, match="COCO 2017 captions.*CIFAR-10"):
        m2.MILESTONE.run(RunContext(profile="full", out_dir=tmp_path, data_root=tmp_path / "nowhere"))
    with pytest.raises(DataMissingError, match="no --data-root"):
        m2.MILESTONE.run(RunContext(profile="full", out_dir=tmp_path))


# ------------------------------------------------------------------ controls (issue 23)
@pytest.mark.integration
def test_controls_fail_every_gate(data, short_runs):
    """The three controls, measured as run() measures them on the honest short run, fail every
    gate on both profiles' thresholds, while that run itself clears the untrained control by far."""
    _, test, heldout = data
    run = short_runs["correct"]
    config = m2.clip_model_config(TINY, run["tok"])
    fresh = untrained_clip(config, seed=0)
    untrained = m2.gate_embeddings(fresh, run["tok"], heldout.images, run["emb"].labels, m2.composition_names(),
                                   test.images, test.captions)
    controls = measure_controls(run["emb"], untrained, seed=0)
    assert set(controls) == {c.name for c in m2.CONTROLS}
    for profile in ("quick", "full"):
        rows = m2.MILESTONE.control_rows(RunResult(metrics=run["metrics"], controls=controls), profile)
        assert len(rows) == 3 * len(m2.MILESTONE.gates)
        assert all(r["passed"] and not r["cleared"] for r in rows), rows
    assert controls["constant embedding"]["t2i_R@10"] == 0.0  # all ties, ranked against the query
    assert controls["shuffled captions"]["t2i_R@10"] < 0.1 and controls["untrained model"]["t2i_R@10"] < 0.1
    assert run["metrics"]["t2i_R@10"] > controls["untrained model"]["t2i_R@10"] + 0.3


def test_constant_embedding_sits_at_the_full_profiles_chance():
    """CIFAR-10's 10 balanced classes: a constant image embedding scores top-5 exactly 0.50 and
    top-1 0.10 whatever the text tower does -- below the spec's 0.60 and the top-1 gate."""
    from eval.clip_controls import GateEmbeddings, constant_embedding, gate_metrics, shuffled_captions
    g = torch.Generator().manual_seed(0)
    classes = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=-1)
    labels = torch.arange(200) % 10
    perfect = GateEmbeddings(classes[labels], classes, labels, classes[labels], classes[labels], torch.arange(200))
    assert gate_metrics(perfect)["zeroshot_top1"] == 1.0
    const = constant_embedding(perfect)
    assert const == {"zeroshot_top1": 0.1, "zeroshot_top5": 0.5, "t2i_R@10": 0.0}
    shuffled = shuffled_captions(perfect, seed=0)
    assert shuffled["zeroshot_top1"] == 0.0  # every class scored with another class's prompt
    full = m2.THRESHOLDS["full"]
    for values in (const, shuffled):
        assert values["zeroshot_top5"] <= full["zeroshot_top5"] and values["zeroshot_top1"] < full["zeroshot_top1"]


# ------------------------------------------------------------------ pitfalls, planted (issue 23)
# about 1.5 s a run: long enough for the honest loss to fall ~15 % after warm-up
PLANT = replace(TINY, n_train=2000, steps=40, batch_size=64, warmup_steps=3, lr=1e-3,
                model=dict(TINY.model, vision_depth=1))


class TemperatureAboveClamp(type(impl)):
    """Planted: the log logit scale initialised at log(1000), above the clamp at 100 (no gradient there)."""

    def clip_build(self, config):
        return super().clip_build({**config, "init_temperature": 0.001})


class TemperatureFrozen(type(impl)):
    """Planted: the logit scale is not trained (requires_grad off: the optimiser never sees it)."""

    def clip_build(self, config):
        model = super().clip_build(config)
        model.logit_scale.requires_grad_(False)
        return model


class TemperatureOne(TemperatureFrozen):
    """Planted: the temperature fixed at 1 (logit scale 1, not trained)."""

    def clip_build(self, config):
        return super().clip_build({**config, "init_temperature": 1.0})


class LossWithoutTemperature(type(impl)):
    """Planted: the loss ignores the learned scale (logits = plain cosines)."""

    def clip_loss(self, image_emb, text_emb, scale, mask=None):
        return super().clip_loss(image_emb, text_emb, torch.ones_like(scale), mask)


class ImageToTextOnly(type(impl)):
    """Planted: only the image->text cross-entropy (half of the symmetric InfoNCE)."""

    def clip_loss(self, image_emb, text_emb, scale, mask=None):
        logits = scale * image_emb @ text_emb.T
        return torch.nn.functional.cross_entropy(logits, torch.arange(len(logits), device=logits.device)), {}


def diagnosed(symptoms) -> set[str]:
    """The pitfalls the grader names beside a failing gate, through Milestone.diagnose."""
    rows = [{"gate": g.key, "status": "fail"} for g in m2.MILESTONE.gates]
    m2.MILESTONE.diagnose(rows, RunResult(metrics={}, symptoms=symptoms))
    names = [{d["pitfall"] for d in r.get("likely_pitfalls", ())} for r in rows]
    assert all(n == names[0] for n in names)  # every pitfall concerns every gate
    return names[0]


@pytest.fixture(scope="module")
def plant_train():
    return make_split("train", PLANT.n_train)


def planted_symptoms(train, planted, recipe=PLANT):
    """Train ``recipe`` with the implementation ``planted`` and measure the symptoms as run() does."""
    model, tok, summary = m2.train_clip(recipe, train, seed=0, progress=False, impl=planted, log_every=4)
    config = m2.clip_model_config(recipe, tok)
    return measure_symptoms(model, untrained_clip(config, 0, impl=planted), config, summary, recipe.warmup_steps,
                            impl=planted)


@pytest.mark.integration
def test_honest_runs_show_no_pitfall(short_runs, plant_train):
    run = short_runs["correct"]
    config = m2.clip_model_config(TINY, run["tok"])
    symptoms = measure_symptoms(run["model"], untrained_clip(config, 0), config, run["summary"], TINY.warmup_steps)
    assert symptoms["loss_drop_after_warmup"] > 0.2 and symptoms["loss_swap_asymmetry"] < 1e-5
    assert diagnosed(symptoms) == set()
    assert diagnosed(planted_symptoms(plant_train, impl)) == set()  # the planting recipe without a bug


@pytest.mark.parametrize("planted, recipe, expected", [
    (TemperatureAboveClamp, PLANT, {"temperature at its clamp", "temperature stuck at its initial value"}),
    (TemperatureFrozen, PLANT, {"temperature stuck at its initial value"}),
    (TemperatureOne, PLANT, {"temperature at 1", "temperature stuck at its initial value"}),
    (LossWithoutTemperature, PLANT, {"loss ignores the temperature", "temperature stuck at its initial value"}),
    (ImageToTextOnly, PLANT, {"asymmetric loss (one direction only)"}),
    (type(impl), replace(PLANT, lr=0.0), {"loss flat after warm-up", "temperature stuck at its initial value"}),
], ids=["clamp", "frozen", "at_one", "loss_ignores_scale", "one_direction", "lr_zero"])
@pytest.mark.integration
def test_planted_pitfall_is_diagnosed(plant_train, planted, recipe, expected):
    assert expected <= diagnosed(planted_symptoms(plant_train, planted(impl.package), recipe))
