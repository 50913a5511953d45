"""Internals of the bundled text-to-image code (not part of the seam, so unmarked: it tests the
bundled ``mmsys`` directly): the token features and CLIP's pooled embedding, exact conditioning
dropout, pooled / position / layout channels, feature standardisation, the Min-SNR weight,
v-prediction, and the command lines (``apps.generate``, ``apps.human_eval``) with the grader's
reading of a person's answers."""

from __future__ import annotations

import json

import pytest
import torch

from mmsys.clip import CLIP, CLIPConfig
from mmsys.data.world import make_split
from mmsys.text import Tokenizer
from mmsys.text2image import TextToImage, TextToImageConfig, coord_grid, from_clip, snr_weight
from mmsys.text_conditioning import drop_conditioning, pooled_features, text_token_features
from test_text2image import TINY_UNET, noisy_zero_layers  # the shape tests' helpers (tests/ is on sys.path)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world():
    return make_split("train", 64, single=True)


@pytest.fixture(scope="module")
def tok(world):
    return Tokenizer.train([c for cs in world.captions for c in cs])


def tiny_model(tok, seed=0, T=1000, noisy=True, **over) -> tuple[TextToImage, CLIP]:
    """A tiny model; ``noisy`` replaces the zero-initialised output layers by seeded noise."""
    torch.manual_seed(seed)
    clip = CLIP(CLIPConfig(vocab_size=len(tok), context_length=24, text_dim=16, text_depth=1, text_heads=2,
                           vision_dim=16, vision_depth=1, vision_heads=2, patch_size=8, embed_dim=16))
    model = from_clip(TextToImageConfig(**{"unet": TINY_UNET, "T": T, **over}), clip, tok)
    if noisy:
        noisy_zero_layers(model, seed + 1)
    return model.eval(), clip


def test_token_features_are_the_clip_text_towers(tok):
    model, clip = tiny_model(tok)
    assert model.n_params() == sum(p.numel() for m in (model.unet, model.pooled_proj, model.layout)
                                   for p in m.parameters())
    prompts = ["a large green square at the top", "a small red ring"]
    ctx, mask = model.encode(prompts)
    ids, pad = tok.batch_encode(prompts, 24)
    assert torch.allclose(ctx, text_token_features(clip.text_tower, ids, pad), atol=1e-6)
    # the pooled CLIP text embedding is the <eos> token of the sequence, projected
    eos = (~pad).sum(1) - 1
    pooled = torch.nn.functional.normalize(clip.text_proj(ctx[torch.arange(2), eos]), dim=-1)
    assert torch.allclose(pooled, clip.encode_text(ids, pad), atol=1e-5)


def test_drop_conditioning_exact(tok):
    empty = torch.tensor(tok.encode(""))
    g = torch.Generator().manual_seed(0)
    ids, pad = tok.batch_encode(["a red circle"] * 100, 24)
    assert not drop_conditioning(ids, pad, empty, 0.0, g)[2].any()
    ids1, pad1, d1 = drop_conditioning(ids, pad, empty, 1.0, g)
    assert d1.all() and (ids1[:, :2] == empty).all() and (ids1[:, 2:] == 0).all()


def test_pooled_embedding_and_position_channels(tok):
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


def test_sampling_defaults_defined_once():
    """guidance, sampler, steps and eta have one default: SamplingConfig (the recipe's too)."""
    import inspect
    from dataclasses import asdict

    from milestones import m5_text_to_image as m5
    from mmsys.text2image import SAMPLING, SamplingConfig, checkpoint_sampling
    sig = inspect.signature(TextToImage.sample_images).parameters
    assert {k: sig[k].default for k in ("guidance", "sampler", "steps", "eta")} == \
        {"guidance": SAMPLING.guidance, "sampler": SAMPLING.sampler, "steps": SAMPLING.steps, "eta": SAMPLING.eta}
    assert (SAMPLING.guidance, SAMPLING.eta) == (2.0, 1.0)
    assert asdict(m5.RECIPES["quick"].sampling) == asdict(SamplingConfig())  # the grader's copy of the class
    assert checkpoint_sampling({"extra": {"sampling": {"guidance": 5.0}}}, steps=3, eta=None) == \
        {"guidance": 5.0, "sampler": "ddim", "steps": 3, "eta": 1.0}


# ------------------------------------------------------------------------ command lines, human eval
@pytest.mark.integration
def test_generate_cli_and_human_eval(world, tok, tmp_path, capsys):
    from dataclasses import replace

    from apps import generate, human_eval
    from eval.human_eval import sheet_meta
    from milestones import m5_text_to_image as m5
    from milestones.base import RunContext, RunResult
    from mmsys.text2image import load_text2image
    recipe = replace(m5.RECIPES["quick"], text2image={"unet": TINY_UNET, "patch": 2}, steps=2, batch_size=8,
                     warmup_steps=1, max_minutes=None, ema_decay=0.9, bf16=False)
    _, clip = tiny_model(tok)
    m5.train_text2image(recipe, world, clip, tok, RunContext(out_dir=tmp_path, progress=False))
    loaded, ck = load_text2image(tmp_path / "checkpoint.pt")
    out = tmp_path / "g.png"
    assert generate.main(["a large red circle on the left", "--negative", "blue", "--guidance", "3", "--steps", "2",
                          "-n", "4", "-o", str(out), "--checkpoint", str(tmp_path / "checkpoint.pt")]) == 0
    assert out.is_file() and out.stat().st_size > 100
    assert generate.main(["x", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "python grader.py m5" in capsys.readouterr().err
    # human evaluation: sheet, answers from a file, the grader's reading of it
    prompts = ["a small red circle on the left"] * 3
    imgs = loaded.sample_images(prompts, steps=2, seed=0)
    ctx = RunContext(out_dir=tmp_path / "run", progress=False)
    meta = sheet_meta("abc", prompts, 0, 3.0, "ddim", 2, 1.0)
    info = m5.human_gate(ctx, imgs, prompts, meta)
    assert info["status"] == "not recorded" and (tmp_path / "run/human_eval/sheet.png").is_file()
    ans = tmp_path / "answers.txt"
    ans.write_text("y\nn\nyes\n")
    assert human_eval.main(["record", str(tmp_path / "run/human_eval"), "--answers", str(ans)]) == 0
    rec = json.loads((tmp_path / "run/human_eval.json").read_text())["records"][0]  # one entry per annotator
    assert rec["human_prompt_match"] == pytest.approx(2 / 3) and rec["meta"] == meta
    info = m5.human_gate(ctx, imgs, prompts, meta)
    assert info["status"] == "recorded" and info["value"] == pytest.approx(2 / 3)
    assert m5.human_gate(ctx, imgs, prompts, {**meta, "seed": 1})["status"].startswith("stale")
    metrics = {"clip_score": 0.7, "clip_score_margin": 0.6, "clip_r_precision": 0.8, "prompt_match": 0.8,
               "guidance_gain_sign_p": 0.01}
    rows = m5.MILESTONE.verdicts(RunResult(metrics=metrics), "quick")
    assert [r["gate"] for r in rows] == list(metrics) + ["human_prompt_match"]
    assert all(r["passed"] for r in rows[:-1]) and rows[-1]["status"] == "pending"  # no answers yet: pending, shown
    assert rows[-1]["pending"].startswith("no answers recorded: python -m apps.human_eval record")
    rows = m5.MILESTONE.verdicts(RunResult(metrics={**metrics, "human_prompt_match": 2 / 3}), "quick")
    assert rows[-1]["gate"] == "human_prompt_match" and rows[-1]["status"] == "fail" and not rows[-1]["passed"]
    ans.write_text("y\nmaybe\n")
    assert human_eval.main(["record", str(tmp_path / "run/human_eval"), "--answers", str(ans)]) == 2
    # the write command samples the checkpoint's recorded protocol
    assert human_eval.main(["write", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--out",
                            str(tmp_path / "sheet2"), "-n", "2", "--steps", "2"]) == 0
    t = json.loads((tmp_path / "sheet2/template.json").read_text())
    assert t["meta"]["guidance"] == recipe.sampling.guidance and t["meta"]["eta"] == recipe.sampling.eta
