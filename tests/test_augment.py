"""The batched, seeded augmentations of mmsys.augment (used by m1 and m4)."""

import torch

from mmsys.augment import cutout, random_crop_flip


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
