"""m5 shape tests, through the seam only (``milestones.adapters``): cross-attention and padding
masks, the frozen text encoder, conditioning dropout, the guidance formula, negative prompts,
sampler determinism, prompt parsing and the checkpoint round trip. Internals of the bundled
library are tested in tests/test_text2image_internals.py."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from eval.prompt_match import expected_table, match_rates, parse_prompt, world_prompts
from eval.reference.data.world import make_split
from milestones.adapters import CANDIDATE as impl

pytestmark = [pytest.mark.m5, pytest.mark.usefixtures("one_thread")]
TINY_UNET = dict(base=8, channel_mults=(1, 2), n_res=1, attn_resolutions=(8,), dropout=0.0, groups=4, n_heads=2)
TINY_CLIP = dict(image_tower="vit", image_size=32, patch_size=8, vision_dim=16, vision_depth=1, vision_heads=2,
                 context_length=24, text_dim=16, text_depth=1, text_heads=2, mlp_ratio=2.0, embed_dim=16)
SAMPLING = dict(guidance=3.0, sampler="ddim", steps=4, eta=0.0)


@pytest.fixture(scope="module")
def world():
    return make_split("train", 64, single=True)


def tiny_clip(split, seed: int = 0, steps: int = 1, **recipe):
    """A tiny CLIP of the implementation and the tokenizer learnt from ``split``'s captions."""
    from milestones.m2_clip import RECIPES, train_clip
    r = replace(RECIPES["quick"], n_train=None, model=dict(TINY_CLIP), steps=steps, batch_size=16, warmup_steps=1,
                max_minutes=None, **recipe)
    model, tok, _ = train_clip(r, split, seed, None, False, impl=impl)
    return model, tok


@pytest.fixture(scope="module")
def clip_tok(world):
    return tiny_clip(world)


def tiny_model(clip_tok, seed=0, T=1000, noisy=True, **over):
    """A tiny text-to-image model; ``noisy`` replaces the zero-initialised output layers by seeded
    noise so the untrained network's eps depends on x, t and the text."""
    clip, tok = clip_tok
    torch.manual_seed(seed)
    model = impl.text2image_build({"unet": TINY_UNET, "T": T, **over}, clip, tok)
    if noisy:
        noisy_zero_layers(model, seed + 1)
    return model.eval()


@torch.no_grad()
def noisy_zero_layers(model, seed: int) -> None:
    """Replace the all-zero trainable tensors (zero-initialised output layers) by seeded noise."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad and p.abs().max() == 0:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def sample(model, prompts, negative=None, seed=0, **sampling):
    return impl.text2image_sample(model, prompts, {**SAMPLING, **sampling}, negative=negative, seed=seed, bf16=False)


# ------------------------------------------------------------------------ cross-attention
def test_cross_attention_shapes_and_padding_mask(clip_tok):
    model = tiny_model(clip_tok)
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([1, 500, 999])
    ctx, mask = impl.text2image_encode(model, ["a small red circle on the left", "a big blue star", ""])
    assert ctx.shape == (3, mask.shape[1], 16) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [0, 3, 7]  # right padding; "" = <bos> <eos>
    with torch.no_grad():
        out = impl.text2image_eps(model, x, t, ctx, mask)
    assert out.shape == x.shape
    # cross-attention only at the low resolution: 16x16 U-Net input (patch 2), attention at 8x8;
    # attention weights (B, heads, HW, L), no weight on padding keys, rows summing to 1
    maps = impl.text2image_cross_attention(model, x, t, ctx, mask)
    assert maps and all(w.shape == (3, 2, 64, mask.shape[1]) for w in maps)
    for w in maps:
        assert w[mask[:, None, None, :].expand_as(w)].abs().max() == 0
        real = ~mask.all(1)  # the empty prompt has real tokens too ("<bos> <eos>")
        assert torch.allclose(w[real].sum(-1), torch.ones_like(w[real].sum(-1)), atol=1e-5)
    # changing what sits at padded positions changes nothing; changing a real token does
    with torch.no_grad():
        ctx2 = ctx.clone()
        ctx2[mask] += 3.0
        assert torch.allclose(impl.text2image_eps(model, x, t, ctx2, mask), out, atol=1e-5)
        ctx2[1, 1] += 1.0
        out3 = impl.text2image_eps(model, x, t, ctx2, mask)
    assert not torch.allclose(out3[1], out[1], atol=1e-4) and torch.allclose(out3[[0, 2]], out[[0, 2]], atol=1e-5)


def test_text_encoder_frozen_and_token_features(world, clip_tok):
    model = tiny_model(clip_tok)
    tower = impl.text2image_text_tower(model)
    assert all(not p.requires_grad for p in tower.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert impl.text2image_n_params(model) == trainable == \
        sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in tower.parameters())
    model.train()
    assert not tower.training and any(m.training for m in model.modules())
    # the token features come from the text tower: one feature per token, the width of the tower
    prompts = ["a large green square at the top", "a small red ring"]
    ctx, mask = impl.text2image_encode(model, prompts)
    _, tok = clip_tok
    ids, pad = tok.batch_encode(prompts, 24)
    assert torch.equal(mask, pad) and ctx.shape == (2, ids.shape[1], 16)
    # standardisation fitted on training captions: unit-scale features over the real tokens
    all_ids, all_pad = tok.batch_encode([c for cs in world.captions for c in cs], 24)
    stats = impl.text2image_fit_text_standardisation(model, all_ids, all_pad)
    assert stats["tokens"] == int((~all_pad).sum())
    z = impl.text2image_encode(model, [c for cs in world.captions for c in cs])
    z = z[0][~z[1]]
    assert torch.allclose(z.mean(0), torch.zeros(z.shape[1]), atol=1e-4)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(z.shape[1]), atol=1e-3)
    # a training step leaves the text tower untouched
    loss, _ = impl.text2image_loss(model, torch.rand(2, 3, 32, 32) * 2 - 1, ids, pad)
    loss.backward()
    assert all(p.grad is None for p in tower.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.integration
def test_conditioning_dropout_rate(world, clip_tok):
    _, tok = clip_tok
    data = impl.text2image_captioned_data(world.images, world.captions, tok, 24, 0.1)
    assert len(data) == len(world)
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(len(world)).repeat(200)  # 12,800 draws
    b = data.get_batch(idx, g)
    rate = b["dropped"].float().mean().item()
    assert abs(rate - 0.1) < 0.01  # binomial std 0.0027
    empty = torch.tensor(tok.encode(""))
    d = b["dropped"]
    assert (b["ids"][d, :2] == empty).all() and b["pad_mask"][d, 2:].all() and not b["pad_mask"][d, :2].any()
    kept = ~d
    assert (b["ids"][kept, 0] == tok.bos_id).all() and ((~b["pad_mask"][kept]).sum(1) > 2).all()
    # deterministic given the generator; p = 0 and p = 1 are exact
    b2 = data.get_batch(idx, torch.Generator().manual_seed(0))
    assert torch.equal(b["ids"], b2["ids"]) and torch.equal(b["dropped"], b2["dropped"])
    never = impl.text2image_captioned_data(world.images, world.captions, tok, 24, 0.0).get_batch(idx, g)
    assert not never["dropped"].any()
    always = impl.text2image_captioned_data(world.images, world.captions, tok, 24, 1.0).get_batch(idx, g)
    assert always["dropped"].all() and (always["ids"][:, :2] == empty).all() and not always["pad_mask"][:, :2].any()
    assert always["pad_mask"][:, 2:].all()


# ------------------------------------------------------------------------ guidance
class ConstEps(torch.nn.Module):
    """Stand-in eps model: eps = (first feature of the first text token) everywhere; records calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, context, mask):
        self.calls.append((x.shape[0], context.clone(), mask.clone()))
        return context[:, 0, 0].view(-1, 1, 1, 1).expand_as(x).clone()


def _stub(model):
    stub = ConstEps()
    model.forward = stub.forward  # the seam's eps is model(x_t, t, context, pad_mask)
    return stub


def test_guidance_formula_constructed_eps(clip_tok):
    model = tiny_model(clip_tok)
    stub = _stub(model)
    prompt = "a large red circle on the left"
    a = impl.text2image_encode(model, [prompt])[0][0, 0, 0].item()
    b = impl.text2image_encode(model, [""])[0][0, 0, 0].item()
    assert abs(a - b) > 1e-3
    ab = impl.text2image_alpha_bars(model)[0].item()
    x_t, t = torch.randn(1, 3, 32, 32), torch.tensor([10])
    for s in (0.0, 1.0, 3.0, -2.0):
        stub.calls.clear()
        x = sample(model, [prompt], guidance=s, steps=1, seed=5)  # one DDIM step t = 0 -> x_0
        eps = b + s * (a - b)  # eps_u + s (eps_c - eps_u)
        xT = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(5 * 1_000_003))
        x0 = ((xT - math.sqrt(1 - ab) * eps) / math.sqrt(ab)).clamp(-1, 1).add(1).mul(127.5).round()
        assert (x[0].float() - x0).abs().max() <= 1
        # s = 1: the plain conditional model, one pass of batch B; otherwise one pass of 2B
        assert [c[0] for c in stub.calls] == ([1] if s == 1.0 else [2])
        guided = impl.text2image_guided_eps(model, x_t, t, [prompt], s)
        assert guided.shape == x_t.shape and torch.allclose(guided, torch.full_like(x_t, eps), atol=1e-5)
    golden = b + 3.0 * (a - b)
    assert golden == pytest.approx(3 * a - 2 * b)


def test_negative_prompt_replaces_unconditional_branch(clip_tok):
    model = tiny_model(clip_tok)
    stub = _stub(model)
    prompts = ["a small blue star at the top", "a large red ring"]
    sample(model, prompts, negative="blue", guidance=2.0, steps=1)
    (B, ctx, mask), = stub.calls
    assert B == 4
    cond, cmask = impl.text2image_encode(model, prompts)
    neg, nmask = impl.text2image_encode(model, ["blue", "blue"])
    L = ctx.shape[1]
    assert torch.allclose(ctx[:2, :cond.shape[1]], cond) and torch.equal(mask[:2, :cmask.shape[1]], cmask)
    assert torch.allclose(ctx[2:, :neg.shape[1]], neg) and mask[2:, neg.shape[1]:L].all()
    stub.calls.clear()
    sample(model, prompts, guidance=2.0, steps=1)  # default: the empty prompt
    empty, _ = impl.text2image_encode(model, ["", ""])
    assert torch.allclose(stub.calls[0][1][2:, :2], empty)
    stub.calls.clear()
    sample(model, prompts, negative=["red", "green"], guidance=2.0, steps=1)  # one per prompt
    assert torch.allclose(stub.calls[0][1][2:, :3], impl.text2image_encode(model, ["red", "green"])[0])
    # the guided eps at the prompt level: eps_neg + s (eps_c - eps_neg)
    x_t, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 5])
    c, n = cond[:, 0, 0], impl.text2image_encode(model, ["red", "green"])[0][:, 0, 0]
    guided = impl.text2image_guided_eps(model, x_t, t, prompts, 2.0, negative=["red", "green"])
    assert torch.allclose(guided[:, 0, 0, 0], n + 2.0 * (c - n), atol=1e-5)


@pytest.mark.integration
def test_sampler_determinism(clip_tok):
    model = tiny_model(clip_tok, T=40)
    prompts = ["a small red circle on the left", "a large blue square at the top"]
    a = sample(model, prompts, seed=0)
    b = sample(model, prompts, seed=0)
    c = sample(model, prompts, seed=1)
    assert a.dtype == torch.uint8 and a.shape == (2, 3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = [torch.Generator().manual_seed(7) for _ in range(2)]
    d = impl.text2image_sample(model, prompts, SAMPLING, generator=g, bf16=False)
    e = impl.text2image_sample(model, prompts[::-1], SAMPLING, generator=[torch.Generator().manual_seed(7)
                                                                         for _ in range(2)], bf16=False)
    assert (d.int() - e.flip(0).int()).abs().max() <= 1  # same per-image seed -> same image, any order
    ddpm = sample(model, prompts, sampler="ddpm", seed=0)  # all 40 steps
    assert ddpm.shape == a.shape and torch.equal(ddpm, sample(model, prompts, sampler="ddpm", seed=0))
    eta = sample(model, prompts, seed=0, eta=1.0)
    assert torch.equal(eta, sample(model, prompts, seed=0, eta=1.0)) and not torch.equal(eta, a)
    n2 = impl.text2image_sample(model, prompts[:1], SAMPLING, seed=0, n=2, bf16=False)
    assert n2.shape == (2, 3, 32, 32)  # n samples per prompt, prompt-major
    with pytest.raises(ValueError):
        sample(model, prompts, sampler="euler")


# ------------------------------------------------------------------------ prompts
def test_prompt_parsing_world():
    for split, n in (("test", 400), ("heldout", 200)):
        prompts, scenes = world_prompts(split, n)
        e = expected_table(prompts)
        for k in ("shape", "colour", "size", "col", "row"):
            assert torch.equal(e[k], scenes[k][:, 0]), (split, k)
    assert parse_prompt("in the top left corner there is a tiny red circle") == \
        {"shape": 0, "colour": 0, "size": 0, "col": 0, "row": 0}
    assert parse_prompt("a big cyan heart in the middle") == {"shape": 9, "colour": 6, "size": 1, "col": 1, "row": 1}
    assert parse_prompt("a yellow cross at the bottom")["col"] == 1 and parse_prompt("red")["shape"] is None
    prompts = ["a small red circle on the left", "a large blue star at the top right"]
    truth = {"shape": torch.tensor([0, 6]), "colour": torch.tensor([0, 2]), "size": torch.tensor([0, 1]),
             "col": torch.tensor([0, 2]), "row": torch.tensor([1, 0])}
    assert match_rates(prompts, truth)["prompt_match"] == 1.0
    wrong = {**truth, "colour": torch.tensor([0, 3]), "size": torch.tensor([1, 0])}
    r = match_rates(prompts, wrong)
    assert r["prompt_match"] == 0.5 and r["colour_match"] == 0.5 and r["size_match"] == 0.0
    r = match_rates(prompts, {**truth, "row": torch.tensor([2, 0])})
    assert r["prompt_match"] == 0.5 and r["position_match"] == 0.5 and r["shape_match"] == 1.0


def test_sign_test_golden():
    from eval.text2image_eval import sign_test
    t, f = True, False
    assert sign_test(torch.tensor([t, t, t, f]), torch.tensor([f, f, f, f])) == 1 / 8  # 3 wins of 3 discordant
    assert sign_test(torch.tensor([t, f, t]), torch.tensor([t, f, t])) == 1.0  # no discordant pair
    a, b = torch.tensor([t] * 9 + [f] * 3), torch.tensor([f] * 9 + [t] * 3)  # 9 wins, 3 losses
    assert sign_test(a, b) == pytest.approx((220 + 66 + 12 + 1) / 4096)
    assert sign_test(b, a) > 0.9


# ------------------------------------------------------------------------ checkpoint
def test_checkpoint_round_trip(world, clip_tok, tmp_path):
    """The grader trains through the seam, reads the checkpoint itself and has the
    implementation rebuild the model from it: the same eps."""
    from milestones import m5_text_to_image as m5
    from milestones.base import RunContext
    recipe = replace(m5.RECIPES["quick"], text2image={"unet": TINY_UNET, "patch": 2}, steps=2, batch_size=8,
                     warmup_steps=1, max_minutes=None, ema_decay=0.9, bf16=False)
    clip, tok = clip_tok
    ctx = RunContext(out_dir=tmp_path, progress=False)
    model, summary = m5.train_text2image(recipe, world, clip, tok, ctx)
    assert summary["steps"] == 2
    loaded, ck = m5.load_text2image(tmp_path / "checkpoint.pt", ctx)
    assert ck["kind"] == m5.CHECKPOINT_KIND and ck["extra"]["sampling"]["guidance"] == recipe.sampling.guidance
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    c, m = impl.text2image_encode(model, ["a red circle", "a blue star"])
    with torch.no_grad():
        assert torch.allclose(impl.text2image_eps(loaded, x, t, c, m), impl.text2image_eps(model, x, t, c, m),
                              atol=1e-6)
