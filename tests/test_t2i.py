"""Tests for m5 text-to-image: cross-attention and padding masks, the frozen text encoder,
conditioning dropout, the guidance formula, negative prompts, sampler determinism, prompt parsing,
checkpoints, the generate CLI and the human-evaluation recorder."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eval.prompt_match import expected_table, match_rates, parse_prompt
from mmsys.clip import CLIP, CLIPConfig
from mmsys.data.world import make_split
from mmsys.diffusion.unet import AttentionBlock
from mmsys.text import Tokenizer
from mmsys.text2image import (CaptionedImages, T2IConfig, TextToImage, from_clip, load_text2image, snr_weight,
                              world_prompts)
from mmsys.text_conditioning import drop_conditioning, pooled_features, text_token_features

pytestmark = pytest.mark.m5
TINY_UNET = dict(base=8, channel_mults=(1, 2), n_res=1, attn_resolutions=(8,), dropout=0.0, groups=4, n_heads=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world():
    return make_split("train", 64, single=True)


@pytest.fixture(scope="module")
def tok(world):
    return Tokenizer.train([c for cs in world.captions for c in cs])


def tiny_model(tok, seed=0, T=1000, noisy=True, **over) -> TextToImage:
    """A tiny text-to-image model; ``noisy`` replaces the zero-initialised output layers by seeded
    noise so the untrained network's eps depends on x, t and the text."""
    torch.manual_seed(seed)
    clip = CLIP(CLIPConfig(vocab_size=len(tok), context_length=24, text_dim=16, text_depth=1, text_heads=2,
                           vision_dim=16, vision_depth=1, vision_heads=2, patch_size=8, embed_dim=16))
    model = from_clip(T2IConfig(**{"unet": TINY_UNET, "T": T, **over}), clip, tok)
    if noisy:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and p.abs().max() == 0:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval(), clip


# ------------------------------------------------------------------------ cross-attention
def test_cross_attention_shapes_and_padding_mask(tok):
    model, _ = tiny_model(tok)
    seen = []
    blocks = [m for m in model.unet.modules() if isinstance(m, AttentionBlock)]
    assert blocks and all(b.cross is not None for b in blocks)
    hooks = [b.register_forward_hook(lambda m, a, kw, out: seen.append(tuple(out.shape)), with_kwargs=True)
             for b in blocks]
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([1, 500, 999])
    ctx, mask = model.encode(["a small red circle on the left", "a big blue star", ""])
    assert ctx.shape == (3, mask.shape[1], 16) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [0, 3, 7]  # right padding; "" = <bos> <eos>
    with torch.no_grad():
        out = model(x, t, ctx, mask)
    for h in hooks:
        h.remove()
    assert out.shape == x.shape
    # cross-attention only at the low resolution: 16x16 U-Net input (patch 2), attention at 8x8
    assert seen and all(s[-1] == 8 for s in seen)
    # attention weights: (B, heads, HW, L), no weight on padding keys
    b = blocks[0]
    q = torch.randn(3, 64, b.cross.q.in_features)
    _, w = b.cross(q, ctx, key_padding_mask=mask, need_weights=True)
    assert w.shape == (3, 2, 64, mask.shape[1])
    assert w[mask[:, None, None, :].expand_as(w)].abs().max() == 0
    assert torch.allclose(w.sum(-1), torch.ones(3, 2, 64), atol=1e-5)
    # changing what sits at padded positions changes nothing; changing a real token does
    with torch.no_grad():
        ctx2 = ctx.clone()
        ctx2[mask] += 3.0
        assert torch.allclose(model(x, t, ctx2, mask), out, atol=1e-5)
        ctx2[1, 1] += 1.0
        out3 = model(x, t, ctx2, mask)
    assert not torch.allclose(out3[1], out[1], atol=1e-4) and torch.allclose(out3[[0, 2]], out[[0, 2]], atol=1e-5)


def test_text_encoder_frozen_and_token_features(tok):
    model, clip = tiny_model(tok)
    assert all(not p.requires_grad for p in model.text.parameters())
    assert model.n_params() == sum(p.numel() for m in (model.unet, model.pooled_proj, model.layout)
                                   for p in m.parameters())
    model.train()
    assert not model.text.training and model.unet.training
    prompts = ["a large green square at the top", "a small red ring"]
    ctx, mask = model.encode(prompts)
    ids, pad = tok.batch_encode(prompts, 24)
    assert torch.allclose(ctx, text_token_features(clip.text_tower, ids, pad), atol=1e-6)
    # the pooled CLIP text embedding is the <eos> token of the sequence, projected
    eos = (~pad).sum(1) - 1
    pooled = torch.nn.functional.normalize(clip.text_proj(ctx[torch.arange(2), eos]), dim=-1)
    assert torch.allclose(pooled, clip.encode_text(ids, pad), atol=1e-5)
    # a training step leaves the text tower untouched
    loss, _ = model.loss(torch.rand(2, 3, 32, 32) * 2 - 1, ids, pad)
    loss.backward()
    assert all(p.grad is None for p in model.text.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters())


def test_conditioning_dropout_rate(world, tok):
    data = CaptionedImages(world.images, world.captions, tok, 24, p_uncond=0.1)
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
    ids, pad = tok.batch_encode(["a red circle"] * 100, 24)
    assert not drop_conditioning(ids, pad, empty, 0.0, g)[2].any()
    ids1, pad1, d1 = drop_conditioning(ids, pad, empty, 1.0, g)
    assert d1.all() and (ids1[:, :2] == empty).all() and (ids1[:, 2:] == 0).all()


def test_pooled_embedding_and_position_channels(tok):
    from mmsys.text2image import coord_grid
    ctx = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[False, False, True, True], [False, False, False, False]])
    want = torch.stack([torch.cat([ctx[0, 1], ctx[0, :2].mean(0)]), torch.cat([ctx[1, 3], ctx[1].mean(0)])])
    assert torch.allclose(pooled_features(ctx, mask), want)  # [<eos> token, mean of real tokens]
    g = coord_grid(2, 4, ctx)
    assert g.shape == (1, 2, 2, 4)
    assert torch.allclose(g[0, 0, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75])) and torch.allclose(g[0, 1, :, 0], torch.tensor([-0.5, 0.5]))
    model, _ = tiny_model(tok)
    k = model.cfg.layout_channels
    assert k == 4 and model.layout.out_features == k * 16 * 16  # k maps at the U-Net's 16x16 input
    # input = 2x2 space-to-depth pixels (12) + x/y coordinates (2) + layout maps (k)
    assert model.unet.conv_in.in_channels == 3 * 4 + 2 + k and model.unet.conv_out.out_channels == 3 * 4 + 2 + k
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([100, 100])
    c, m = model.encode(["a red circle", "a blue star"])
    with torch.no_grad():
        a = model(x, t, c, m)
        model.pooled_proj[2].weight.zero_()
        model.pooled_proj[2].bias.zero_()
        b = model(x, t, c, m)
        model.layout.weight.zero_()
        model.layout.bias.zero_()
        d = model(x, t, c, m)
    assert model._pooled is None and not torch.allclose(a, b, atol=1e-5)  # the pooled path is used
    assert not torch.allclose(b, d, atol=1e-5)  # and the layout maps are


def test_text_feature_standardisation(world, tok):
    model, clip = tiny_model(tok)
    ids, pad = tok.batch_encode([c for cs in world.captions for c in cs], 24)
    raw = text_token_features(clip.text_tower, ids, pad)[~pad]  # (tokens, D)
    stats = model.text.fit_standardisation(ids, pad, batch_size=50)  # batching must not matter
    assert stats["tokens"] == len(raw)
    z = model.text.encode_ids(ids, pad)[~pad]
    assert torch.allclose(z.mean(0), torch.zeros(z.shape[1]), atol=1e-4)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(z.shape[1]), atol=1e-3)
    assert torch.allclose(z, (raw - raw.mean(0)) / raw.std(0, unbiased=False), atol=1e-4)
    # the statistics are buffers: saved and loaded with the model's state
    sd = model.state_dict()
    assert torch.equal(sd["text.feat_mean"], model.text.feat_mean) and "text.feat_std" in sd


def test_min_snr_weight_golden():
    snr = torch.tensor([0.5, 5.0, 50.0])
    assert torch.allclose(snr_weight(snr, 5.0), torch.tensor([1.0, 1.0, 0.1]))
    assert torch.equal(snr_weight(snr, None), torch.ones(3))


def test_v_prediction_returns_eps_and_trains_on_v(tok):
    """A v-model (the default) predicts v = a eps - s x_0 and hands the samplers eps = a v + s x_t."""
    model, _ = tiny_model(tok)
    assert model.cfg.prediction == "v"
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, torch.randn(4, 3, 32, 32, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    ab = model.schedule.alpha_bars[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    model.network_output = lambda x, tt, c, m=None: v  # a perfect v-predictor
    ctx, mask = model.encode(["a red circle"] * 4)
    assert torch.allclose(model(x_t, t, ctx, mask), noise, atol=1e-4)
    # the loss compares the network output with v (drawn with the same global RNG state)
    ids, pad = tok.batch_encode(["a red circle"] * 4, 24)
    torch.manual_seed(3)
    t2 = torch.randint(0, model.schedule.T, (4,))
    n2 = torch.randn(4, 3, 32, 32)
    a2 = model.schedule.alpha_bars[t2].view(-1, 1, 1, 1)
    model.network_output = lambda x, tt, c, m=None: a2.sqrt() * n2 - (1 - a2).sqrt() * x0
    torch.manual_seed(3)
    loss, metrics = model.loss(x0, ids, pad)
    assert loss.item() < 1e-10 and metrics["mse"].item() < 1e-10


# ------------------------------------------------------------------------ guidance
class ConstEps(torch.nn.Module):
    """Stub U-Net path: eps = (first feature of the first text token) everywhere; records calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, context, mask):
        self.calls.append((x.shape[0], context.clone(), mask.clone()))
        return context[:, 0, 0].view(-1, 1, 1, 1).expand_as(x).clone()


def _stub(model):
    stub = ConstEps()
    model.forward = stub.forward  # the guidance code calls the model itself
    return stub


def test_guidance_formula_constructed_eps(tok):
    model, _ = tiny_model(tok)
    stub = _stub(model)
    prompt = "a large red circle on the left"
    a = model.encode([prompt])[0][0, 0, 0].item()
    b = model.encode([""])[0][0, 0, 0].item()
    assert abs(a - b) > 1e-3
    ab = model.schedule.alpha_bars[0].item()
    for s in (0.0, 1.0, 3.0, -2.0):
        stub.calls.clear()
        x = model.generate([prompt], guidance=s, steps=1, seed=5, bf16=False)  # one DDIM step t = 0 -> x_0
        eps = b + s * (a - b)  # eps_u + s (eps_c - eps_u)
        xT = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(5 * 1_000_003))
        x0 = ((xT - math.sqrt(1 - ab) * eps) / math.sqrt(ab)).clamp(-1, 1).add(1).mul(127.5).round()
        assert (x[0].float() - x0).abs().max() <= 1
        # s = 1: the plain conditional model, one pass of batch B; otherwise one pass of 2B
        assert [c[0] for c in stub.calls] == ([1] if s == 1.0 else [2])
    golden = b + 3.0 * (a - b)
    assert golden == pytest.approx(3 * a - 2 * b)


def test_negative_prompt_replaces_unconditional_branch(tok):
    model, _ = tiny_model(tok)
    stub = _stub(model)
    prompts = ["a small blue star at the top", "a large red ring"]
    model.generate(prompts, negative="blue", guidance=2.0, steps=1, seed=0, bf16=False)
    (B, ctx, mask), = stub.calls
    assert B == 4
    cond, cmask = model.encode(prompts)
    neg, nmask = model.encode(["blue", "blue"])
    L = ctx.shape[1]
    assert torch.allclose(ctx[:2, :cond.shape[1]], cond) and torch.equal(mask[:2, :cmask.shape[1]], cmask)
    assert torch.allclose(ctx[2:, :neg.shape[1]], neg) and mask[2:, neg.shape[1]:L].all()
    stub.calls.clear()
    model.generate(prompts, guidance=2.0, steps=1, seed=0, bf16=False)  # default: the empty prompt
    empty, _ = model.encode(["", ""])
    assert torch.allclose(stub.calls[0][1][2:, :2], empty)
    stub.calls.clear()
    model.generate(prompts, negative=["red", "green"], guidance=2.0, steps=1, seed=0, bf16=False)  # one per prompt
    assert torch.allclose(stub.calls[0][1][2:, :3], model.encode(["red", "green"])[0])


def test_sampler_determinism(tok):
    model, _ = tiny_model(tok, T=40)
    prompts = ["a small red circle on the left", "a large blue square at the top"]
    kw = dict(guidance=3.0, steps=4, bf16=False)
    a = model.generate(prompts, seed=0, **kw)
    b = model.generate(prompts, seed=0, **kw)
    c = model.generate(prompts, seed=1, **kw)
    assert a.dtype == torch.uint8 and a.shape == (2, 3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = [torch.Generator().manual_seed(7) for _ in range(2)]
    d = model.generate(prompts, generator=g, **kw)
    e = model.generate(prompts[::-1], generator=[torch.Generator().manual_seed(7) for _ in range(2)], **kw)
    assert (d.int() - e.flip(0).int()).abs().max() <= 1  # same per-image seed -> same image, any order
    ddpm = model.generate(prompts, sampler="ddpm", seed=0, **kw)  # all 40 steps
    assert ddpm.shape == a.shape and torch.equal(ddpm, model.generate(prompts, sampler="ddpm", seed=0, **kw))
    eta = model.generate(prompts, seed=0, eta=1.0, **kw)
    assert torch.equal(eta, model.generate(prompts, seed=0, eta=1.0, **kw)) and not torch.equal(eta, a)
    with pytest.raises(ValueError):
        model.generate(prompts, sampler="euler")


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
    from eval.t2i_eval import sign_test
    t, f = True, False
    assert sign_test(torch.tensor([t, t, t, f]), torch.tensor([f, f, f, f])) == 1 / 8  # 3 wins of 3 discordant
    assert sign_test(torch.tensor([t, f, t]), torch.tensor([t, f, t])) == 1.0  # no discordant pair
    a, b = torch.tensor([t] * 9 + [f] * 3), torch.tensor([f] * 9 + [t] * 3)  # 9 wins, 3 losses
    assert sign_test(a, b) == pytest.approx((220 + 66 + 12 + 1) / 4096)
    assert sign_test(b, a) > 0.9


# ------------------------------------------------------------------------ checkpoint, CLI, human eval
def test_checkpoint_generate_cli_and_human_eval(world, tok, tmp_path, capsys):
    from dataclasses import replace

    from milestones import m5_text_to_image as m5
    from milestones.base import RunContext, RunResult
    from mmsys import generate, human_eval
    recipe = replace(m5.RECIPES["quick"], t2i={"unet": TINY_UNET, "patch": 2}, steps=2, batch_size=8,
                     warmup_steps=1, max_minutes=None, ema_decay=0.9, bf16=False)
    _, clip = tiny_model(tok)
    model, summary = m5.train_t2i(recipe, world, clip, tok, RunContext(out_dir=tmp_path, progress=False))
    assert summary["steps"] == 2
    loaded, ck = load_text2image(tmp_path / "checkpoint.pt")
    assert ck["kind"] == "t2i" and ck["extra"]["sampling"]["guidance"] == recipe.guidance
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    c, m = model.encode(["a red circle", "a blue star"])
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, c, m), model(x, t, c, m), atol=1e-6)
    out = tmp_path / "g.png"
    assert generate.main(["a large red circle on the left", "--negative", "blue", "--guidance", "3", "--steps", "2",
                          "-n", "4", "-o", str(out), "--checkpoint", str(tmp_path / "checkpoint.pt")]) == 0
    assert out.is_file() and out.stat().st_size > 100
    assert generate.main(["x", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "python grader.py m5" in capsys.readouterr().err
    # human evaluation: sheet, answers from a file, the grader's reading of it
    prompts = ["a small red circle on the left"] * 3
    imgs = loaded.generate(prompts, steps=2, seed=0)
    ctx = RunContext(out_dir=tmp_path / "run", progress=False)
    meta = human_eval.sheet_meta("abc", prompts, 0, 3.0, "ddim", 2, 1.0)
    info = m5.human_gate(ctx, imgs, prompts, meta)
    assert info["status"] == "not recorded" and (tmp_path / "run/human_eval/sheet.png").is_file()
    ans = tmp_path / "answers.txt"
    ans.write_text("y\nn\nyes\n")
    assert human_eval.main(["record", str(tmp_path / "run/human_eval"), "--answers", str(ans)]) == 0
    rec = json.loads((tmp_path / "run/human_eval.json").read_text())
    assert rec["human_prompt_match"] == pytest.approx(2 / 3) and rec["meta"] == meta
    info = m5.human_gate(ctx, imgs, prompts, meta)
    assert info["status"] == "recorded" and info["value"] == pytest.approx(2 / 3)
    assert m5.human_gate(ctx, imgs, prompts, {**meta, "seed": 1})["status"].startswith("stale")
    metrics = {"clip_score": 0.5, "clip_score_margin": 0.3, "prompt_match": 0.8, "guidance_gain": 0.1}
    rows = m5.MILESTONE.verdicts(RunResult(metrics=metrics), "quick")
    assert [r["gate"] for r in rows] == list(metrics) and all(r["passed"] for r in rows)
    rows = m5.MILESTONE.verdicts(RunResult(metrics={**metrics, "human_prompt_match": 2 / 3}), "quick")
    assert rows[-1]["gate"] == "human_prompt_match" and not rows[-1]["passed"]
    ans.write_text("y\nmaybe\n")
    assert human_eval.main(["record", str(tmp_path / "run/human_eval"), "--answers", str(ans)]) == 2
