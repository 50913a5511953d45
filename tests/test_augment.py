"""The batched, seeded augmentations of mmsys.augment (used by m1 and m4)."""

import torch

import pytest

from mmsys.augment import cutout, mix_batch, random_crop_flip


def _images(n=8, size=16):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_crop_flip_is_seeded_and_keeps_pixels():
    imgs = _images()
    a = random_crop_flip(imgs, torch.Generator().manual_seed(1), pad=2)
    b = random_crop_flip(imgs, torch.Generator().manual_seed(1), pad=2)
    assert a.shape == (8, 3, 16, 16) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    # without translation every output is the image or its mirror
    plain = random_crop_flip(imgs, torch.Generator().manual_seed(2), pad=0, flip=True)
    ref = random_crop_flip(imgs, torch.Generator().manual_seed(2), pad=0, flip=False)
    for o, r in zip(plain, ref):
        assert torch.equal(o, r) or torch.equal(o, r.flip(2))
    assert not torch.equal(plain, ref)  # 8 coin flips: some image was mirrored


def test_cutout_masks_one_clipped_square_per_image():
    x = torch.ones(64, 3, 16, 16)
    out = cutout(x, torch.Generator().manual_seed(0), size=6)
    assert torch.equal(x, torch.ones_like(x))  # input untouched
    zeroed = out == 0
    assert torch.equal(zeroed[:, :1].expand_as(zeroed), zeroed)  # the same pixels in every channel
    counts = zeroed[:, 0].sum(dim=(1, 2))
    assert counts.max() == 36 and counts.min() >= 9  # full square inside, at least a quarter at a corner
    for m in zeroed[:, 0]:  # each mask is one axis-aligned rectangle
        r, c = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert m.sum() == len(r) * len(c) and m[r.min():r.max() + 1, c.min():c.max() + 1].all()
    assert torch.equal(out, cutout(x, torch.Generator().manual_seed(0), size=6))
    assert cutout(x, torch.Generator().manual_seed(0), size=0) is x


@pytest.mark.integration
def test_m1_recipe_cutout_reaches_the_training_batches(monkeypatch, tmp_path):
    """M1Recipe.cutout is wired: every training batch goes through cutout with the recipe's size."""
    from dataclasses import replace

    import mmsys.augment
    from milestones import m1_vit as m1
    from milestones.base import RunContext
    from mmsys.data.world import make_split

    calls = []

    def spy(x, g, size):
        calls.append((x.shape, size))
        return x

    monkeypatch.setattr(mmsys.augment, "cutout", spy)
    recipe = replace(m1.RECIPES["quick"], n_train=64, steps=2, batch_size=16, warmup_steps=1, cutout=8)
    m1.train(recipe, make_split("train", 64, single=True, captions=False), RunContext(out_dir=tmp_path, progress=False))
    assert calls and all(size == 8 and shape[0] == 16 for shape, size in calls)
    calls.clear()
    m1.train(replace(recipe, cutout=0), make_split("train", 64, single=True, captions=False),
             RunContext(out_dir=tmp_path / "off", progress=False))
    assert calls == []


def _batch(n=6):
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, torch.tensor([0, 1, 2, 3, 4, 5])[:n]


def test_mix_batch_off_gives_smoothed_one_hot():
    x, y = _batch()
    out, t = mix_batch(x, y, torch.Generator().manual_seed(0), 10, smoothing=0.1)
    assert out is x and t.shape == (6, 10)
    assert torch.allclose(t[torch.arange(6), y], torch.full((6,), 0.91)) and torch.allclose(t.sum(1), torch.ones(6))


def test_mixup_blends_each_image_with_its_mirror_in_the_batch():
    x, y = _batch()
    out, t = mix_batch(x, y, torch.Generator().manual_seed(0), 6, mixup_alpha=0.8)
    again = mix_batch(x, y, torch.Generator().manual_seed(0), 6, mixup_alpha=0.8)
    assert torch.equal(out, again[0]) and torch.equal(t, again[1])  # seeded
    lam = t[0, 0].item()  # labels are distinct: image 0 keeps weight lam of its own class
    assert 0 < lam < 1 and t[0, 5].item() == pytest.approx(1 - lam) and torch.allclose(t.sum(1), torch.ones(6))
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert torch.allclose(t, lam * torch.eye(6) + (1 - lam) * torch.eye(6).flip(0))


def test_cutmix_pastes_one_box_and_weights_targets_by_its_area():
    x, y = _batch()
    for seed in range(5):
        out, t = mix_batch(x, y, torch.Generator().manual_seed(seed), 6, cutmix_alpha=1.0)
        from_rev = (out == x.flip(0)).all(1)  # (B, H, W) pixels taken from the partner image
        assert ((out == x).all(1) | from_rev).all()  # every pixel is one image's or the other's
        assert torch.equal(from_rev, from_rev[:1].expand_as(from_rev))  # the same box in every image
        area = from_rev[0].float().mean().item()
        assert t[0, 5].item() == pytest.approx(area) and t[0, 0].item() == pytest.approx(1 - area)
    # with both methods on, a coin per batch picks one: both show up over a few seeds
    kinds = set()
    for seed in range(12):
        out, _ = mix_batch(x, y, torch.Generator().manual_seed(seed), 6, mixup_alpha=0.8, cutmix_alpha=1.0)
        kinds.add("cutmix" if ((out == x).all(1) | (out == x.flip(0)).all(1)).all() else "mixup")
    assert kinds == {"cutmix", "mixup"}


@pytest.mark.integration
def test_m1_recipe_mixing_reaches_the_training_batches(monkeypatch, tmp_path):
    """M1Recipe.mixup/cutmix are wired: batches go through mix_batch and train on soft targets."""
    from dataclasses import replace

    import mmsys.augment
    from milestones import m1_vit as m1
    from milestones.base import RunContext
    from mmsys.data.world import make_split

    calls = []

    def spy(x, labels, g, n_classes, mixup_alpha, cutmix_alpha, smoothing):
        calls.append((n_classes, mixup_alpha, cutmix_alpha, smoothing))
        return mix_batch(x, labels, g, n_classes, mixup_alpha, cutmix_alpha, smoothing)

    monkeypatch.setattr(mmsys.augment, "mix_batch", spy)
    recipe = replace(m1.RECIPES["quick"], n_train=64, steps=2, batch_size=16, warmup_steps=1, mixup=0.8,
                     cutmix=1.0, label_smoothing=0.1)
    split = make_split("train", 64, single=True, captions=False)
    _, summary = m1.train(recipe, split, RunContext(out_dir=tmp_path, progress=False))
    assert calls == [(10, 0.8, 1.0, 0.1)] * 2
    assert 0 < summary["final_metrics"]["loss"] < 10 and 0 <= summary["final_metrics"]["acc"] <= 1
    calls.clear()
    m1.train(replace(recipe, mixup=0.0, cutmix=0.0), split, RunContext(out_dir=tmp_path / "off", progress=False))
    assert calls == []
