"""The attribute judge (eval/attributes.py, a grading instrument built on eval.reference): scene
targets in reading order, its API, its cache keyed by a hash of its recipe and code, and its
accuracies measured on every load (never read from the cache file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eval import attributes as attr
from eval.reference.data.split import to_float

pytestmark = [pytest.mark.m4, pytest.mark.usefixtures("one_thread")]  # graded with m4 (its criteria cite it)


def test_scene_targets_reading_order():
    scenes = {"n_objects": torch.tensor([1, 2, 2]),
              "shape": torch.tensor([[3, 0], [1, 2], [4, 5]]), "colour": torch.tensor([[1, 0], [2, 3], [4, 5]]),
              "size": torch.tensor([[0, 0], [1, 0], [0, 1]]),
              "col": torch.tensor([[2, 0], [2, 0], [1, 1]]), "row": torch.tensor([[1, 0], [1, 1], [2, 0]])}
    y = attr.scene_targets(scenes)
    assert y["n_objects"].tolist() == [0, 1, 1]
    # scene 1: B (col 0) is left of A (col 2) -> B first; scene 2: B (row 0) above A -> B first
    assert y["shape"].tolist() == [3, 2, 5] and y["second_shape"].tolist() == [-1, 1, 4]
    assert y["col"].tolist() == [2, 0, 1] and y["second_col"].tolist() == [-1, 2, 1]
    assert y["row"].tolist() == [1, 1, 0] and y["second_row"].tolist() == [-1, 1, 2]


@pytest.mark.integration
def test_attribute_net_api_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSYS_CACHE", str(tmp_path))
    cfg = attr.AttributeConfig(n_train=256, n_test=64, steps=3, batch_size=64, warmup_steps=1)
    model, info = attr.load_or_train(cfg, progress=False)
    assert info["trained_now"] and Path(info["path"]).parent == tmp_path / "judges"
    assert Path(info["path"]).name == f"attributes-{attr.recipe_hash(cfg)}.pt" and len(info["sha256"]) == 64
    assert set(info["test_accuracies"]) >= {"single/shape", "single/colour", "mixed/n_objects", "two/second_shape"}
    again, info2 = attr.load_or_train(cfg, progress=False)
    assert not info2["trained_now"] and info2["sha256"] == info["sha256"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert attr.recipe_hash(cfg) != attr.recipe_hash(attr.AttributeConfig())
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    feats = attr.AttributeFeatures(model)(to_float(images))
    assert feats.shape == (5, cfg.feature_dim) and (feats >= 0).all()
    pred = attr.predict_attributes(model, images)
    assert set(pred) == {"n_objects"} | set(attr.HEADS) | {f"second_{k}" for k in attr.HEADS}
    assert all(v.shape == (5,) and v.dtype == torch.long for v in pred.values())
    assert set(pred["n_objects"].tolist()) <= {1, 2} and (pred["shape"] < 10).all() and (pred["colour"] < 8).all()


@pytest.mark.integration
def test_accuracies_are_measured_not_read_from_the_cache(tmp_path, monkeypatch):
    """Replace the cached weights by an untrained network (same file, same recipe hash): the
    reported accuracies follow the weights actually loaded, i.e. they were measured."""
    monkeypatch.setenv("MMSYS_CACHE", str(tmp_path))
    cfg = attr.AttributeConfig(n_train=512, n_test=64, steps=40, batch_size=64, warmup_steps=2)
    model, info = attr.load_or_train(cfg, progress=False)
    payload = torch.load(info["path"], weights_only=True)
    assert "test_accuracies" not in payload  # nothing the loader could read back as a measurement
    torch.manual_seed(123)
    payload["model"] = attr.AttributeNet(cfg).state_dict()
    torch.save(payload, info["path"])
    fresh, info2 = attr.load_or_train(cfg, progress=False)
    assert not info2["trained_now"] and info2["recipe_hash"] == info["recipe_hash"]
    assert info2["test_accuracies"] != info["test_accuracies"]
    from eval.reference.data.world import WorldConfig
    assert info2["test_accuracies"] == attr.test_accuracies(fresh, cfg.n_test, WorldConfig(seed=cfg.world_seed))
    assert info["test_accuracies"]["single/colour"] > info2["test_accuracies"]["single/colour"]


def test_cache_key_follows_the_code(tmp_path, monkeypatch):
    """The cache key is a hash of the judge's source files and recipe: editing a file changes it."""
    src = tmp_path / "judge_src.py"
    src.write_text("x = 1\n")
    monkeypatch.setattr(attr, "code_files", lambda: [src])
    attr.code_hash.cache_clear()
    try:
        before = attr.recipe_hash(attr.AttributeConfig())
        src.write_text("x = 2\n")
        attr.code_hash.cache_clear()
        assert attr.recipe_hash(attr.AttributeConfig()) != before
    finally:
        monkeypatch.undo()
        attr.code_hash.cache_clear()
    files = attr.code_files()
    assert files[0].name == "attributes.py" and all(f.is_file() for f in files)
