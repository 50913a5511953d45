"""Gate honesty for m1: the accuracy gate fails, at the real thresholds, for an untrained model
and for a planted bug (labels shuffled during training: the model can only learn the label
prior, so it stays at chance). That a correct model clears the gate is the quick-profile run
itself (README: measured figures)."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from eval.reference.data.world import make_split
from milestones import m1_vit as m1
from milestones.adapters import CANDIDATE as impl
from milestones.base import RunContext
from milestones.common import CheckpointError

pytestmark = pytest.mark.m1
TINY = replace(m1.RECIPES["quick"], n_train=2000, steps=30, batch_size=64, warmup_steps=5, lr=3e-3,
               model=dict(image_size=32, patch_size=8, dim=48, depth=2, n_heads=4, mlp_ratio=2.0, n_classes=10),
               max_minutes=None)


@pytest.fixture(scope="module")
def data():
    return make_split("train", 2000, single=True, captions=False), make_split("test", 500, single=True, captions=False)


def gate_passes(metrics, profile="quick"):
    (gate,) = m1.MILESTONE.gates
    return gate.passes(metrics[gate.key], m1.THRESHOLDS[profile][gate.key])


def test_untrained_model_fails_gate(data):
    torch.manual_seed(0)
    metrics = m1.evaluate(impl.vit_build(m1.RECIPES["quick"].model), data[1])
    assert metrics["test_accuracy"] < 0.25
    assert not gate_passes(metrics) and not gate_passes(metrics, "full")


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


def test_train_accuracy_reads_the_first_images_unaugmented(data):
    """The report's training accuracy (the overfitting gap beside the gate) is plain top-1 accuracy
    on the first n training images, and clips n to the split."""
    torch.manual_seed(0)
    model, train = impl.vit_build(TINY.model), data[0]
    preds = m1.predict(model, train.images[:300]).argmax(-1)
    got = m1.train_accuracy(model, train, n=300)
    assert got == {"accuracy": (preds == train.labels[:300]).double().mean().item(), "images": 300}
    assert m1.train_accuracy(model, train, n=10**6)["images"] == len(train)
