"""Internals of the bundled CLIP (``mmsys.clip``) that are not part of the seam: the towers'
feature shapes and module split, the similarity/logits helpers, the temperature accessor and
GradCache's dropout replay. The m2 shape tests (through the seam) are in test_clip.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmsys.clip import CLIP, CLIPConfig, _embed, _split, clip_loss, gradcache_step, similarity
from test_clip import grads, tiny_batch, tiny_cfg


def tiny(**kw) -> CLIP:
    return CLIP(CLIPConfig(**tiny_cfg(**kw)))


@pytest.mark.parametrize("tower,pool", [("vit", "eot"), ("cnn", "cls")])
def test_tower_features_and_module_split(tower, pool):
    torch.manual_seed(0)
    model = tiny(image_tower=tower, text_pool=pool)
    b = tiny_batch(6)
    assert model.image_tower(b["images"]).shape == (6, model.image_tower.out_dim)
    assert model.text_tower(b["ids"], b["pad_mask"]).shape == (6, 32)
    image_side = {p.data_ptr() for m in (model.image_tower, model.image_proj) for p in m.parameters()}
    text_side = {p.data_ptr() for m in (model.text_tower, model.text_proj) for p in m.parameters()}
    assert not image_side & text_side


def test_similarity_logits_and_temperature():
    torch.manual_seed(0)
    model = tiny()
    img, txt = F.normalize(torch.randn(5, 24), dim=-1), F.normalize(torch.randn(7, 24), dim=-1)
    sim = similarity(img, txt)
    assert sim.shape == (5, 7) and torch.allclose(sim[2, 3], F.cosine_similarity(img[2], txt[3], dim=0))
    assert torch.allclose(model.logits(img, txt), sim / 0.07, atol=1e-4)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.temperature() == pytest.approx(0.07)


@pytest.mark.integration
def test_gradcache_replays_dropout():
    """With dropout, the re-run must see the same masks as the cached pass: the gradient equals
    that of the same micro-batch forwards kept in one autograd graph."""
    model = tiny(dropout=0.3).train()
    batch = tiny_batch(8, keys=False)
    torch.manual_seed(5)
    gradcache_step(model, batch, n_micro=2)
    acc = grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    parts = [_embed(model, mb) for mb in _split(batch, 2)]
    img, txt = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    clip_loss(img, txt, model.scale())[0].backward()
    ref = grads(model)
    for n in ref:
        assert torch.allclose(ref[n], acc[n], atol=1e-6, rtol=1e-4), n
