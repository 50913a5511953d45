"""m2 shape and formula tests, through the seam (the implementation under test is reached only
via :mod:`milestones.adapters`): tokenizer, towers, projection, InfoNCE (golden 4x4), symmetry,
temperature clamp, duplicate mask, GradCache, metrics on constructed embeddings, probes and
figures. Internals of the bundled CLIP (tower features, dropout replay): test_clip_internals.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from eval.reference.checkpoint import load_checkpoint, save_checkpoint
from milestones.adapters import CANDIDATE as impl

pytestmark = pytest.mark.m2
CAPTIONS = [["a small red circle on the left", "a red circle on the left"],
            ["a large blue square above a green star", "there is a blue square"],
            ["two cyan hearts side by side"], ["a white ring at the top right", "one white ring"]]


def tiny_cfg(**kw) -> dict:
    base = dict(vocab_size=40, context_length=16, patch_size=8, vision_dim=32, vision_depth=2, vision_heads=2,
                text_dim=32, text_depth=2, text_heads=2, embed_dim=24, cnn_width=8)
    return {**base, **kw}


def tiny_clip(**kw):
    return impl.clip_build(tiny_cfg(**kw))


def scale_parameter(model):
    """The one parameter the logit scale depends on (the spec: a log logit-scale)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(impl.clip_logit_scale(model), params, allow_unused=True)
    (p,) = [p for p, g in zip(params, grads) if g is not None and g.abs().sum() > 0]
    return p


def train_tokenizer():
    return impl.tokenizer_train([c for cs in CAPTIONS for c in cs])


def tiny_batch(B=12, L=9, seed=0, keys=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 40, (B, L), generator=g)
    lengths = torch.randint(3, L + 1, (B,), generator=g)
    pad = torch.arange(L)[None] >= lengths[:, None]
    ids[pad] = 0
    batch = {"images": torch.rand(B, 3, 32, 32, generator=g) * 2 - 1, "ids": ids, "pad_mask": pad}
    if keys:
        batch["image_key"] = torch.tensor([0, 1, 2, 0, 3, 4, 5, 6, 7, 8, 9, 10][:B])
        batch["text_key"] = torch.arange(B).masked_fill(torch.arange(B) == 5, 2)
    return batch


def reference_loss(img, txt, scale, mask=None):
    """The definition, one row at a time: mean over i of -log softmax_j (s <I_i, T_j>)[i],
    same over columns, averaged; masked pairs absent from the sums."""
    B, total = len(img), 0.0
    for rows, cols in ((img, txt), (txt, img)):
        for i in range(B):
            num = math.exp(scale * float(rows[i] @ cols[i]))
            den = sum(math.exp(scale * float(rows[i] @ cols[j])) for j in range(B)
                      if mask is None or not bool(mask[i, j]))
            total += -math.log(num / den) / B
    return total / 2


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_shapes_and_roundtrip(tmp_path):
    tok = train_tokenizer()
    sp = impl.tokenizer_special_ids(tok)
    ids, pad = impl.clip_tokenize(tok, ["a red circle", "a purple dragon on the left"], 16)
    assert ids.shape == pad.shape == (2, 8) and pad.dtype == torch.bool
    assert ids[0, 0] == sp["bos"] and ids[0, 4] == sp["eos"] and pad[0, 5:].all() and not pad[1].any()
    assert (ids[0, 5:] == sp["pad"]).all()
    assert ids[1, 2] == sp["unk"] and ids[1, 3] == sp["unk"]  # "purple", "dragon" never seen
    assert impl.clip_tokenize(tok, ["a red circle " * 20], 10)[0].shape == (1, 10)
    save_checkpoint(tmp_path / "c.pt", {"kind": "clip", "model": {}, "extra": {"tokenizer": impl.tokenizer_state(tok)}})
    tok2 = impl.tokenizer_load(load_checkpoint(tmp_path / "c.pt", "clip")["extra"]["tokenizer"])
    assert torch.equal(impl.clip_tokenize(tok2, ["a red circle"], 16)[0],
                       impl.clip_tokenize(tok, ["a red circle"], 16)[0])
    assert impl.tokenizer_decode(tok2, ids[0]) == "a red circle"


# ----------------------------------------------------------------------------- towers

@pytest.mark.parametrize("tower,pool", [("vit", "eot"), ("cnn", "cls")])
def test_towers_shapes_and_no_shared_weights(tower, pool):
    torch.manual_seed(0)
    model = tiny_clip(image_tower=tower, text_pool=pool)
    b = tiny_batch(6)
    img, txt = impl.clip_encode_images(model, b["images"]), impl.clip_encode_texts(model, b["ids"], b["pad_mask"])
    assert img.shape == txt.shape == (6, 24)
    assert torch.allclose(img.norm(dim=-1), torch.ones(6)) and torch.allclose(txt.norm(dim=-1), torch.ones(6))
    assert impl.clip_context_length(model) == 16
    # no shared weights: the parameters each embedding depends on are disjoint, and the image
    # embedding depends on no text parameter (tower feature shapes: test_clip_internals.py)
    img.sum().backward(retain_graph=True)
    image_side = {p.data_ptr() for p in model.parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    txt.sum().backward()
    text_side = {p.data_ptr() for p in model.parameters() if p.grad is not None}
    assert image_side and text_side and not image_side & text_side


def test_text_embedding_ignores_padding():
    torch.manual_seed(0)
    model = tiny_clip().eval()
    tok = train_tokenizer()
    ids, pad = impl.clip_tokenize(tok, ["a red circle", "a large blue square above a green star"], 16)
    alone = impl.clip_encode_texts(model, *impl.clip_tokenize(tok, ["a red circle"], 16))
    assert pad[0].any() and torch.allclose(impl.clip_encode_texts(model, ids, pad)[0], alone[0], atol=1e-5)


# ----------------------------------------------------------------------------- loss

def test_loss_hand_computed_4x4():
    """I = the 4 basis vectors, T = e0, e1, e2 and (0.6, 0, 0, 0.8): S = I T^T = T^T."""
    img = torch.eye(4)
    txt = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0.6, 0, 0, 0.8]])
    e = math.e
    i2t = [-1 + math.log(e + 2 + math.exp(0.6)), -1 + math.log(e + 3), -1 + math.log(e + 3),
           -0.8 + math.log(3 + math.exp(0.8))]
    t2i = [-1 + math.log(e + 3)] * 3 + [-0.8 + math.log(math.exp(0.6) + 2 + math.exp(0.8))]
    expected = (sum(i2t) / 4 + sum(t2i) / 4) / 2
    loss, m = impl.clip_loss(img, txt, torch.tensor(1.0))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.806196, abs=1e-5)  # golden value
    assert m["acc_i2t"] == 1 and m["acc_t2i"] == 1
    # scale ln 3 on matching basis vectors: every row is -log(3 / (3 + 3)) = ln 2
    assert impl.clip_loss(img, img, torch.tensor(math.log(3.0)))[0].item() == pytest.approx(math.log(2), abs=1e-6)
    # with pair (0, 3) and (3, 0) masked as duplicates, the 0.6 logit leaves both denominators
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 3] = mask[3, 0] = True
    i2t_m = [-1 + math.log(e + 2), -1 + math.log(e + 3), -1 + math.log(e + 3), -0.8 + math.log(2 + math.exp(0.8))]
    t2i_m = [-1 + math.log(e + 2)] + [-1 + math.log(e + 3)] * 2 + [-0.8 + math.log(2 + math.exp(0.8))]
    assert impl.clip_loss(img, txt, torch.tensor(1.0), mask)[0].item() == pytest.approx(
        (sum(i2t_m) + sum(t2i_m)) / 8, abs=1e-6)


def test_loss_matches_definition_random_with_mask():
    g = torch.Generator().manual_seed(3)
    img, txt = F.normalize(torch.randn(6, 5, generator=g), dim=-1), F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    mask = impl.clip_duplicate_mask(torch.tensor([0, 1, 0, 2, 3, 1]), torch.tensor([0, 1, 2, 3, 3, 4]))
    for m in (None, mask):
        assert impl.clip_loss(img, txt, torch.tensor(7.0), m)[0].item() == pytest.approx(
            reference_loss(img, txt, 7.0, m), abs=1e-5)
    with pytest.raises(ValueError):
        impl.clip_loss(img, txt, torch.tensor(1.0), torch.eye(6, dtype=torch.bool))


def test_loss_symmetry():
    g = torch.Generator().manual_seed(1)
    img, txt = F.normalize(torch.randn(8, 6, generator=g), dim=-1), F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    s = torch.tensor(10.0)
    assert torch.allclose(impl.clip_loss(img, txt, s)[0], impl.clip_loss(txt, img, s)[0])
    perm = torch.randperm(8, generator=g)
    assert torch.allclose(impl.clip_loss(img[perm], txt[perm], s)[0], impl.clip_loss(img, txt, s)[0], atol=1e-6)
    assert impl.clip_loss(img, img, s)[0] < impl.clip_loss(img, txt, s)[0]  # matching pairs -> lower loss


def test_temperature_init_and_clamp():
    model = tiny_clip()
    t = scale_parameter(model)  # the learnable temperature, stored as a log logit-scale
    assert t.ndim == 0 and t.item() == pytest.approx(math.log(1 / 0.07))
    scale = impl.clip_logit_scale(model)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5) and 1 / scale.item() == pytest.approx(0.07)
    img, txt = F.normalize(torch.randn(4, 24), dim=-1), F.normalize(torch.randn(4, 24), dim=-1)
    impl.clip_loss(img, txt, scale)[0].backward()
    assert t.grad.abs() > 0  # learnable below the clamp
    with torch.no_grad():
        t.fill_(math.log(1000.0))
    t.grad = None
    assert impl.clip_logit_scale(model).item() == pytest.approx(100.0)
    impl.clip_loss(img, txt, impl.clip_logit_scale(model))[0].backward()
    assert t.grad.item() == 0.0  # clamped: no push past 100


def test_duplicate_mask_removes_false_negatives():
    mask = impl.clip_duplicate_mask(torch.tensor([5, 6, 5, 7]), torch.tensor([0, 1, 2, 1]))
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 2] = expected[2, 0] = expected[1, 3] = expected[3, 1] = True
    assert torch.equal(mask, expected)
    # an exact duplicate pair: unmasked it is a hard false negative; masked, its loss is that of a
    # batch where each duplicate is alone
    img = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    img = torch.cat([img[:3], img[:1]])  # item 3 = item 0
    dup = impl.clip_duplicate_mask(torch.tensor([0, 1, 2, 0]))
    s = torch.tensor(20.0)
    assert impl.clip_loss(img, img, s, dup)[0] < 0.05 < impl.clip_loss(img, img, s)[0]


# ----------------------------------------------------------------------------- accumulation

def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tower", ["vit", "cnn"])
def test_gradcache_equals_full_batch_gradient(tower):
    torch.manual_seed(0)
    model = tiny_clip(image_tower=tower)
    batch = tiny_batch(12)
    full_m = impl.clip_train_step(model, batch, 1)  # one pass over the whole batch
    full = grads(model)
    model.zero_grad(set_to_none=True)
    acc_m = impl.clip_train_step(model, batch, 3)
    acc = grads(model)
    scale_name = next(n for n, p in model.named_parameters() if p is scale_parameter(model))
    assert full.keys() == acc.keys() and scale_name in acc and len(acc) == len(list(model.parameters()))
    for n in full:
        assert torch.allclose(full[n], acc[n], atol=1e-6, rtol=1e-4), n
    assert acc_m["loss"].item() == pytest.approx(full_m["loss"].item(), abs=1e-6)
    assert 0 < acc_m["masked_frac"] < 0.1


def test_trainer_with_gradcache_matches_no_accumulation():
    tok = train_tokenizer()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    caps = [CAPTIONS[i % 4] for i in range(16)]
    pairs = impl.clip_pairs(images, caps, tok, 16, image_keys=torch.arange(16) % 4)
    params = []
    for accum in (1, 4):
        torch.manual_seed(0)
        model = tiny_clip(vocab_size=len(tok))
        cfg = dict(steps=2, batch_size=8, lr=1e-3, grad_accum=accum, progress=False)
        impl.trainer(model, cfg, step_fn=impl.clip_train_step, data_size=16, get_batch=pairs.get_batch,
                     kind="clip").fit()
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # Adam turns float noise in the (theoretically zero) key-bias gradients into ~1e-5 steps;
    # real updates are ~lr = 1e-3
    assert torch.allclose(params[0], params[1], atol=5e-5)


def test_paired_captions_batch():
    tok = train_tokenizer()
    images = torch.arange(4).view(4, 1, 1, 1).expand(4, 3, 8, 8).to(torch.uint8)
    pairs = impl.clip_pairs(images, CAPTIONS, tok, 16)
    assert len(pairs) == 4
    b = pairs.get_batch(torch.tensor([3, 0, 2]), torch.Generator().manual_seed(0))
    assert b["images"].shape == (3, 3, 8, 8) and b["images"].min() >= -1 and b["images"].max() <= 1
    assert b["ids"].shape == b["pad_mask"].shape and b["ids"].shape[0] == 3
    assert torch.equal(b["image_key"], torch.tensor([3, 0, 2]))
    for row, i in zip(b["ids"], (3, 0, 2)):
        assert impl.tokenizer_decode(tok, row) in [" ".join(c.split()) for c in CAPTIONS[i]]
    b2 = pairs.get_batch(torch.tensor([3, 0, 2]), torch.Generator().manual_seed(0))
    assert torch.equal(b["ids"], b2["ids"])


# ----------------------------------------------------------------------------- metrics

def test_retrieval_and_zero_shot_metrics_known_answers():
    from eval.retrieval import image_to_text_recall, text_to_image_recall, zero_shot_topk
    img = torch.eye(4)
    # 8 captions, 2 per image; caption 7 (of image 3) ranks image 0 first, image 3 second;
    # caption 5 (of image 2) ranks image 3 first, image 2 second
    txt = torch.eye(4).repeat_interleave(2, dim=0)
    txt[7] = torch.tensor([1.0, 0, 0, 0.2])
    txt[5] = torch.tensor([0.0, 0, 0.9, 1.0])
    t2i = torch.arange(4).repeat_interleave(2)
    r = text_to_image_recall(txt, img, t2i, ks=(1, 2))
    assert r["R@1"] == pytest.approx(6 / 8) and r["R@2"] == pytest.approx(1.0)
    r = image_to_text_recall(img, txt, t2i, ks=(1,))
    assert r["R@1"] == pytest.approx(1.0)  # image 3 still has caption 6
    labels = torch.tensor([0, 1, 2, 3])
    classes = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 1, 0], [0, 1, 0.5, 0], [0, 0, 0, 1]])  # 1, 2 confused
    z = zero_shot_topk(img, classes, labels, ks=(1, 2))
    assert z["top1"] == pytest.approx(0.5) and z["top2"] == pytest.approx(1.0)


def test_probes_perturbations_and_rate():
    from eval.probes import perturb, preference_rate
    row = {"n_objects": 2, "shape": [0, 1], "colour": [0, 2], "size": [0, 1], "col": [0, 2], "row": [1, 1],
           "relation": 1}
    assert perturb(row, "relation") == "a small red circle to the right of a large blue square"
    assert perturb(row, "binding") == "a small blue circle to the left of a large red square"
    assert perturb(row, "count") is None
    single = {**row, "n_objects": 1, "relation": 0}
    assert perturb(single, "count") == "two small red circles side by side" and perturb(single, "relation") is None
    img = torch.eye(3)
    assert preference_rate(img, img, torch.roll(img, 1, 0)) == 1.0
    assert preference_rate(img, img, img) == 0.0  # ties are failures


def test_figures_written(tmp_path):
    from eval.clip_figures import embedding_scatter, retrieval_grid, similarity_heatmap
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)
    e = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    paths = [similarity_heatmap(e @ e.T, imgs, ["a", "b", "c", "d"], tmp_path / "h.png"),
             retrieval_grid(["q1", "q2"], imgs[:4].view(2, 2, 3, 16, 16), tmp_path / "g.png",
                            correct=torch.tensor([[True, False], [False, True]]), scores=torch.rand(2, 2)),
             embedding_scatter({"before": (e, e), "after": (e, e)}, tmp_path / "s.png", colours=torch.arange(4))]
    for p in paths:
        assert p.is_file() and p.read_bytes()[:4] == b"\x89PNG"
