"""Gate honesty for m1: the accuracy gate fails, at the real thresholds, for an untrained model
and for a planted bug (labels shuffled during training: the model can only learn the label
prior, so it stays at chance); every control run() measures fails it; each pitfall is planted
(zeroed query/key projections, learning rate 0, positions not added, positions frozen) and
diagnosed by the symptom run() measures, and the honest tiny model is not. That a correct model
clears the gate is the quick-profile run itself (README: measured figures)."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from eval.classification_controls import constant_predictions, permuted_labels
from eval.reference.data.split import DataSplit
from eval.reference.data.world import make_split
from eval.validation import hold_out
from eval.vit_symptoms import shuffle_patches
from milestones import m1_vit as m1
from milestones.adapters import CANDIDATE as impl
from milestones.adapters import Implementation
from milestones.base import RunContext, RunResult
from milestones.common import CheckpointError

pytestmark = pytest.mark.m1
TINY = replace(m1.RECIPES["quick"], n_train=2000, steps=30, batch_size=64, warmup_steps=5, lr=3e-3,
               model=dict(image_size=32, patch_size=8, dim=48, depth=2, n_heads=4, mlp_ratio=2.0, n_classes=10),
               max_minutes=None, control_steps=10)
# an easy task (class = colour) on which 24 steps visibly lower the loss: the loss-curve plants
EASY = replace(TINY, n_train=None, steps=24, batch_size=32, warmup_steps=4, log_every=2, pad=0, flip=False,
               model=dict(image_size=32, patch_size=8, dim=32, depth=1, n_heads=2, mlp_ratio=2.0, n_classes=10))


@pytest.fixture(scope="module")
def data():
    return make_split("train", 2000, single=True, captions=False), make_split("test", 500, single=True, captions=False)


@pytest.fixture(scope="module")
def honest(data, tmp_path_factory):
    """TINY trained on the world's true labels: (model, engine summary)."""
    return m1.train(TINY, data[0], RunContext(out_dir=tmp_path_factory.mktemp("honest"), progress=False))


def colours(n: int) -> DataSplit:
    """n noisy single-colour images, class = colour (10 classes)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 10
    palette = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                            [128, 128, 128], [255, 128, 0], [128, 0, 255], [0, 128, 64]]).float()
    x = palette[y][:, :, None, None].expand(n, 3, 32, 32) + 20 * torch.randn(n, 3, 32, 32, generator=g)
    return DataSplit("colours/train", x.clamp(0, 255).to(torch.uint8), y, [str(c) for c in range(10)])


def gate_passes(metrics, profile="quick"):
    (gate,) = m1.MILESTONE.gates
    return gate.passes(metrics[gate.key], m1.THRESHOLDS[profile][gate.key])


@pytest.mark.integration
def test_untrained_model_fails_gate(data):
    torch.manual_seed(0)
    metrics = m1.evaluate(impl.vit_build(m1.RECIPES["quick"].model), data[1])
    assert metrics["test_accuracy"] < 0.25
    assert not gate_passes(metrics) and not gate_passes(metrics, "full")


@pytest.mark.integration
def test_shuffled_labels_fail_gate(data, tmp_path: Path):
    train, test = data
    g = torch.Generator().manual_seed(1)
    shuffled = train.labels[torch.randperm(len(train), generator=g)]
    bug_model, _ = m1.train(TINY, train, RunContext(out_dir=tmp_path, progress=False), labels=shuffled)
    bug = m1.evaluate(bug_model, test)
    assert bug["test_accuracy"] < 0.2  # chance is 0.1
    assert not gate_passes(bug) and not gate_passes(bug, "full")


def test_gate_direction_and_nan():
    (gate,) = m1.MILESTONE.gates
    assert gate.passes(0.99, 0.95) and not gate.passes(0.95, 0.95) and not gate.passes(None, 0.95)
    assert not gate.passes(float("nan"), 0.95)


@pytest.mark.integration
def test_resume_refuses_a_changed_augmentation(data, tmp_path: Path):
    """--resume continues only a run whose batches this recipe reproduces: a checkpoint records its
    recipe, and a changed augmentation is refused with one clear error (the schedule may grow)."""
    recipe = replace(TINY, steps=4, ckpt_every=2)
    m1.train(recipe, data[0], RunContext(out_dir=tmp_path, progress=False))
    ctx = RunContext(out_dir=tmp_path, progress=False, resume=True)
    with pytest.raises(CheckpointError, match="another recipe .*cutout: 0 -> 8"):
        m1.train(replace(recipe, steps=6, cutout=8), data[0], ctx)
    _, summary = m1.train(replace(recipe, steps=6, restarts=((4, 0.5),)), data[0], ctx)  # only extended
    assert summary["start_step"] == 4 and summary["steps"] == 6


@pytest.mark.integration
def test_train_accuracy_reads_a_subset_across_the_split_unaugmented(data):
    """The report's training accuracy (the overfitting gap beside the gate) is plain top-1 accuracy
    on n training images drawn across the whole split (not its first n: a class-sorted tree
    would give one class), the same subset every time, and clips n to the split."""
    torch.manual_seed(0)
    model, train = impl.vit_build(TINY.model), data[0]
    preds = m1.predict(model, train.images).argmax(-1)
    got = m1.train_accuracy(model, train, n=300)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:300]
    assert got["images"] == 300 and got == m1.train_accuracy(model, train, n=300)
    assert got["accuracy"] == pytest.approx((preds[idx] == train.labels[idx]).double().mean().item())
    assert idx.max() >= 300  # not the first 300
    whole = m1.train_accuracy(model, train, n=10**6)
    assert whole["images"] == len(train) and whole["accuracy"] == pytest.approx((preds == train.labels).double().mean().item())


# ------------------------------------------------------------------ controls (run() measures them)
@pytest.mark.integration
def test_every_control_fails_the_gate(data, honest, tmp_path: Path):
    """measure_controls (what run() stores) for a trained tiny model: each control is measured and
    fails the gate at both profiles' thresholds, and the grade would not call the gate unfailable."""
    train, test = data
    model, _ = honest
    preds = m1.predict(model, test.images).argmax(-1)
    controls = m1.measure_controls(TINY, RunContext(out_dir=tmp_path, progress=False), train, test, preds)
    assert set(controls) == {c.name for c in m1.MILESTONE.controls}
    for name, values in controls.items():
        assert values["test_accuracy"] < 0.25, name  # chance is 0.1
    result = RunResult(metrics={}, controls=controls)
    for profile in ("quick", "full"):
        rows = m1.MILESTONE.control_rows(result, profile)
        assert len(rows) == len(m1.MILESTONE.controls) and all(r["passed"] and not r["cleared"] for r in rows)
    assert not (tmp_path / "checkpoint.pt").exists()  # the shuffled-label control trains in a temp folder


def test_every_gate_has_a_control():
    covered = {g for c in m1.MILESTONE.controls for g in c.gates}
    assert covered == {g.key for g in m1.MILESTONE.all_gates()}
    assert all(r.control_steps for r in m1.RECIPES.values()) and all(r.control_steps for r in m1.SMOKE_RECIPES.values())


def test_constant_and_permuted_controls_are_the_graders():
    train_labels = torch.tensor([3, 3, 1, 3, 2])
    test_labels = torch.tensor([3, 1, 2, 3, 0, 3])
    const = constant_predictions(train_labels, len(test_labels), 10)
    assert const.tolist() == [3] * 6
    assert m1.gate_metrics(const, test_labels)["test_accuracy"] == pytest.approx(0.5)
    perm = permuted_labels(test_labels, 7)
    assert sorted(perm.tolist()) == sorted(test_labels.tolist()) and torch.equal(perm, permuted_labels(test_labels, 7))


# ------------------------------------------------------------------ pitfalls, planted
def diagnosed(symptoms: dict) -> set[str]:
    """The pitfalls the report would name beside a failed accuracy gate with these symptoms."""
    rows = [{"gate": "test_accuracy", "status": "fail"}]
    m1.MILESTONE.diagnose(rows, RunResult(metrics={}, symptoms=symptoms))
    return {d["pitfall"] for d in rows[0].get("likely_pitfalls", [])}


def init_pos(recipe):
    return impl.vit_embeddings(m1.build(recipe, 0))["pos_embed"].detach()


class ZeroQK(Implementation):
    """Plant: every block's query and key projections zeroed (a fixed point: their gradients are 0)."""

    def vit_build(self, config):
        model = super().vit_build(config)
        with torch.no_grad():
            for block in model.encoder.blocks:
                d = block.attn.q.weight.shape[0]
                for t in (block.attn.q.weight, block.attn.q.bias, block.attn.kv.weight[:d], block.attn.kv.bias[:d]):
                    t.zero_()
        return model


class NoPositions(Implementation):
    """Plant: positional embeddings never added (zeros in their place)."""

    def vit_build(self, config):
        model = super().vit_build(config)
        model.positions = lambda n: torch.zeros(1, 1 + n, model.cfg.dim)
        return model


class FrozenPositions(Implementation):
    """Plant: positional embeddings left out of training (requires_grad off)."""

    def vit_build(self, config):
        model = super().vit_build(config)
        model.pos_embed.requires_grad_(False)
        return model


@pytest.mark.integration
def test_honest_tiny_model_shows_no_pitfall(data, honest, tmp_path: Path):
    """The honest tiny world model (and, for the loss curve, the easy task at the same learning
    rate as the lr-0 plant) shows none of the symptoms."""
    model, summary = honest
    symptoms, _ = m1.measure_symptoms(model, TINY, data[1].images[:64], summary, init_pos(TINY))
    easy_model, easy_summary = m1.train(EASY, colours(512), RunContext(out_dir=tmp_path, progress=False))
    symptoms["loss_drop_after_warmup"] = m1.measure_symptoms(easy_model, EASY, data[1].images[:8], easy_summary)[0][
        "loss_drop_after_warmup"]
    assert set(symptoms) == {"cls_attention_entropy", "patch_shuffle_change", "loss_drop_after_warmup", "pos_embed_change"}
    assert diagnosed(symptoms) == set(), symptoms


@pytest.mark.integration
def test_zeroed_query_key_is_diagnosed(data, tmp_path: Path):
    plant = ZeroQK("mmsys")
    model, summary = m1.train(replace(TINY, steps=10), data[0], RunContext(out_dir=tmp_path, progress=False), impl=plant)
    symptoms, _ = m1.measure_symptoms(model, TINY, data[1].images[:64], summary, init_pos(TINY), impl=plant)
    assert symptoms["cls_attention_entropy"] > 0.9999  # uniform: training cannot leave q = k = 0
    assert "attention near uniform" in diagnosed(symptoms)


@pytest.mark.integration
def test_learning_rate_zero_is_diagnosed(data, tmp_path: Path):
    model, summary = m1.train(replace(EASY, lr=0.0), colours(512), RunContext(out_dir=tmp_path, progress=False))
    symptoms, _ = m1.measure_symptoms(model, EASY, data[1].images[:8], summary, init_pos(EASY))
    assert abs(symptoms["loss_drop_after_warmup"]) < m1.LOSS_FLAT and symptoms["pos_embed_change"] == 0.0
    assert {"loss flat after warm-up", "positional embeddings never trained"} <= diagnosed(symptoms)


def test_positions_not_added_are_diagnosed(data, tmp_path: Path):
    plant = NoPositions("mmsys")
    model, summary = m1.train(replace(TINY, steps=10), data[0], RunContext(out_dir=tmp_path, progress=False), impl=plant)
    symptoms, _ = m1.measure_symptoms(model, TINY, data[1].images[:64], summary, impl=plant)
    assert symptoms["patch_shuffle_change"] < m1.POSITIONS_IGNORED
    assert "positional embeddings ignored" in diagnosed(symptoms)


def test_frozen_positions_are_diagnosed(data, tmp_path: Path):
    plant = FrozenPositions("mmsys")
    model, summary = m1.train(replace(TINY, steps=10), data[0], RunContext(out_dir=tmp_path, progress=False), impl=plant)
    symptoms, _ = m1.measure_symptoms(model, TINY, data[1].images[:64], summary, init_pos(TINY), impl=plant)
    assert symptoms["pos_embed_change"] == 0.0 and symptoms["patch_shuffle_change"] > m1.POSITIONS_IGNORED
    assert "positional embeddings never trained" in diagnosed(symptoms)
    assert "positional embeddings ignored" not in diagnosed(symptoms)  # frozen random positions still break symmetry


def test_shuffle_patches_moves_whole_tiles():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    perm = torch.tensor([3, 0, 2, 1])  # position n gets tile perm[n] of the 2x2 grid of 4x4 tiles
    y = shuffle_patches(x, 4, perm)
    tile = lambda t, n: t[:, :, (n // 2) * 4:(n // 2) * 4 + 4, (n % 2) * 4:(n % 2) * 4 + 4]  # noqa: E731
    for n in range(4):
        assert torch.equal(tile(y, n), tile(x, int(perm[n])))
    assert torch.equal(shuffle_patches(x, 4, torch.arange(4)), x)


# ------------------------------------------------------------------ validation is not test
def test_hold_out_takes_the_last_images_of_each_class():
    """CIFAR-10's validation split: the last n_val/C training images of each class (a loader may
    list a split class by class), disjoint from what is left to train on, both in order."""
    labels = torch.tensor([0] * 6 + [1] * 6 + [2] * 6)  # class-sorted, as an ImageFolder tree lists it
    images = torch.arange(18, dtype=torch.uint8)[:, None, None, None].expand(18, 3, 2, 2).contiguous()
    split = DataSplit("toy/train", images, labels, ["a", "b", "c"], identity={"source": "toy"})
    train, val = hold_out(split, 6)
    assert val.name == "toy/val" and train.name == "toy/train"
    assert val.images[:, 0, 0, 0].tolist() == [4, 5, 10, 11, 16, 17]
    assert train.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15]
    assert torch.bincount(val.labels).tolist() == [2, 2, 2]
    assert val.identity["held_out"]["n_val"] == 6 and val.identity["source"] == "toy"
    for bad in (0, 5, 18):
        with pytest.raises(ValueError):
            hold_out(split, bad)


@pytest.mark.integration
def test_quick_validation_is_the_worlds_val_split():
    """The quick recipe's validation images are the world's own "val" split, drawn from --world-seed."""
    recipe = replace(m1.RECIPES["quick"], n_train=64, n_val=32, n_test=32)
    for world_seed in (0, 1):
        ctx = RunContext(world_seed=world_seed)
        train, val, test = m1.load_data(recipe, ctx)
        assert (len(train), len(val), len(test)) == (64, 32, 32)
        assert val.sha256() == m1.world_split(ctx, "val", 32, single=True, captions=False).sha256()
        assert len({train.sha256(), val.sha256(), test.sha256()}) == 3
    assert m1.load_data(replace(recipe, n_val=0), RunContext())[1] is None


@pytest.mark.integration
def test_resume_ignores_the_worlds_n_val(data, tmp_path: Path):
    """On the world n_val names another split, so a resumed run may change it; the loss curve's
    spacing and the control's length may change too (none changes a training batch)."""
    recipe = replace(TINY, steps=4, ckpt_every=2, n_val=0)
    m1.train(recipe, data[0], RunContext(out_dir=tmp_path, progress=False))
    ctx = RunContext(out_dir=tmp_path, progress=False, resume=True)
    _, summary = m1.train(replace(recipe, steps=6, n_val=2000, log_every=1, control_steps=3), data[0], ctx)
    assert summary["start_step"] == 4 and summary["steps"] == 6
