"""Tests for mmsys.diffusion: schedules (golden values), U-Net, DDPM/DDIM samplers, guidance."""

from __future__ import annotations

import math

import pytest
import torch

from mmsys.diffusion.samplers import (DDIMSampler, DDPMSampler, guided_eps, guided_model_fn, randn,
                                      sample)
from mmsys.diffusion.schedule import NoiseSchedule
from mmsys.diffusion.unet import UNet, UNetConfig

pytestmark = [pytest.mark.m4, pytest.mark.usefixtures("one_thread")]


# ---------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("make", [NoiseSchedule.linear, NoiseSchedule.cosine])
def test_alpha_bar_monotone_in_unit_interval(make):
    s = make()
    ab = s.alpha_bars
    assert s.T == 1000 and ab.shape == (1000,)
    assert (ab > 0).all() and (ab <= 1).all()
    assert (ab[1:] < ab[:-1]).all()
    assert torch.allclose(s.alphas, 1 - s.betas) and torch.allclose(ab, torch.cumprod(s.alphas, 0))


def test_linear_schedule_golden_values():
    s = NoiseSchedule.linear()  # LIBRARY-NOTES reference values
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alpha_bars[999].item() == pytest.approx(4.0358e-5, rel=1e-3)
    std = s.posterior_variance.sqrt()
    assert std[999].item() == pytest.approx(0.14142, abs=1e-5)
    assert std[500].item() == pytest.approx(0.10026, abs=1e-5)
    assert std[1].item() == pytest.approx(0.00738, abs=1e-5)
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]


def test_cosine_schedule_golden_values():
    s = NoiseSchedule.cosine()
    # f(t) = cos(((t/T + s)/(1 + s)) pi/2)^2, alpha_bar[i] = f(i+1)/f(0) (Nichol & Dhariwal eq. 17)
    assert s.alpha_bars[0].item() == pytest.approx(0.999958715775178, abs=1e-12)
    assert s.alpha_bars[499].item() == pytest.approx(0.49384359044063775, abs=1e-12)
    hand = math.cos((0.508 / 1.008) * math.pi / 2) ** 2 / math.cos((0.008 / 1.008) * math.pi / 2) ** 2
    assert s.alpha_bars[499].item() == pytest.approx(hand, abs=1e-12)
    assert s.betas.max().item() == pytest.approx(0.999)  # clipped at the end


def test_extract_broadcasts_per_sample():
    s = NoiseSchedule.linear()
    x = torch.zeros(3, 2, 4, 4, dtype=torch.bfloat16)
    c = s.coef("betas", torch.tensor([0, 1, 999]), x)
    assert c.shape == (3, 1, 1, 1) and c.dtype == torch.bfloat16
    assert s.coef("betas", 999, x).shape == (3, 1, 1, 1)


def test_q_sample_moments():
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    n = 20000
    t = torch.tensor([10, 500, 900]).repeat_interleave(n)
    x0 = torch.tensor([0.8, -0.5, 0.3]).repeat_interleave(n).view(-1, 1, 1, 1)
    xt = s.q_sample(x0, t, generator=g).view(3, n)
    ab = s.alpha_bars[[10, 500, 900]].float()
    assert torch.allclose(xt.mean(1), ab.sqrt() * torch.tensor([0.8, -0.5, 0.3]), atol=0.02)
    assert torch.allclose(xt.var(1), 1 - ab, rtol=0.03)
    # with given noise it is exactly eq. 4 and predict_x0 / predict_eps invert it
    eps = torch.randn(3, 1, 2, 2, generator=g)
    x0 = torch.rand(3, 1, 2, 2, generator=g)
    tt = torch.tensor([3, 400, 999])
    xt = s.q_sample(x0, tt, eps)
    a = s.alpha_bars[tt].float().view(-1, 1, 1, 1)
    assert torch.allclose(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-6)
    assert torch.allclose(s.predict_x0(xt, tt, eps), x0, atol=1e-3)
    assert torch.allclose(s.predict_eps(xt, tt, x0), eps, atol=1e-4)


def test_posterior_hand_checked():
    s = NoiseSchedule.linear()
    # t = 1: beta_1 = 1e-4 + 0.0199/999, alpha_bar_0 = 1 - 1e-4, alpha_bar_1 = alpha_bar_0 (1 - beta_1)
    b1 = 1e-4 + 0.0199 / 999
    ab0, ab1 = 1 - 1e-4, (1 - 1e-4) * (1 - b1)
    c1 = math.sqrt(ab0) * b1 / (1 - ab1)  # 0.54529...
    c2 = math.sqrt(1 - b1) * (1 - ab0) / (1 - ab1)  # 0.45470...
    var = b1 * (1 - ab0) / (1 - ab1)  # 5.4532e-5
    assert c1 == pytest.approx(0.5452914995, abs=1e-9) and var == pytest.approx(5.45318766e-5, rel=1e-7)
    x0 = torch.full((1, 1, 1, 1), 1.0, dtype=torch.float64)
    xt = torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64)
    mean, v, logv = s.posterior(x0, xt, torch.tensor([1]))
    assert mean.item() == pytest.approx(c1 * 1.0 + c2 * 2.0, abs=1e-12)
    assert v.item() == pytest.approx(var, rel=1e-12) and logv.item() == pytest.approx(math.log(var), rel=1e-12)
    # posterior mean at x0_hat equals DDPM eq. 11's mean
    g = torch.Generator().manual_seed(1)
    xt, eps = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, 1, 3, 3, generator=g)
    t = torch.tensor([1, 50, 500, 999])
    m = s.posterior(s.predict_x0(xt, t, eps), xt, t)[0]
    eq11 = (xt - s.coef("betas", t, xt) / s.coef("sqrt_one_minus_alpha_bars", t, xt) * eps) / s.coef("alphas", t, xt).sqrt()
    assert torch.allclose(m, eq11, atol=1e-4)


# ---------------------------------------------------------------------------------- U-Net
def _tiny_unet(context_dim=None, seed=0) -> UNet:
    """A tiny U-Net whose parameters (including the zero-initialised ones) are seeded noise."""
    cfg = UNetConfig(base=8, channel_mults=(1, 2), n_res=1, attn_resolutions=(8,), groups=4, dropout=0.0,
                     n_heads=2, context_dim=context_dim, image_size=16)
    model = UNet(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def test_unet_starts_at_zero_and_keeps_shape():
    model = UNet(UNetConfig(base=8, channel_mults=(1, 2, 2), n_res=1, groups=4)).eval()
    for size in (16, 28, 32, 64):
        x = torch.randn(2, 3, size, size)
        out = model(x, torch.tensor([0, 999]))
        assert out.shape == x.shape
        assert out.abs().max() == 0  # zero-initialised output conv
    grey = UNet(UNetConfig(in_ch=1, base=8, channel_mults=(1, 2), n_res=1, groups=4))
    assert grey(torch.randn(2, 1, 28, 28), torch.tensor([1.5, 3.0])).shape == (2, 1, 28, 28)


def test_unet_with_context_shape_and_padding_mask():
    model = _tiny_unet(context_dim=12)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([5, 500, 900])
    ctx = torch.randn(3, 6, 12, generator=g)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 4:] = True  # sample 0 has 4 real tokens
    mask[2] = True  # sample 2: empty caption (all padding) -> no NaN
    with torch.no_grad():
        out = model(x, t, ctx, mask)
        assert out.shape == x.shape and torch.isfinite(out).all()
        ctx2 = ctx.clone()
        ctx2[0, 4:] += 5.0  # changing padded tokens changes nothing
        ctx2[2] += 5.0
        out2 = model(x, t, ctx2, mask)
        assert torch.allclose(out, out2, atol=1e-5)
        ctx2[0, 0] += 1.0  # changing a real token changes sample 0 only
        out3 = model(x, t, ctx2, mask)
        assert not torch.allclose(out3[0], out[0], atol=1e-4) and torch.allclose(out3[1:], out[1:], atol=1e-5)
    with pytest.raises(ValueError):
        model(x, t)


def test_unet_time_embedding_changes_output():
    model = _tiny_unet()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(x, torch.tensor([10, 10])), model(x, torch.tensor([700, 700]))
    assert a.abs().mean() > 1e-3
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()


def test_unet_channels_last_bf16_autocast_and_backward():
    model = _tiny_unet(context_dim=12)
    g = torch.Generator().manual_seed(4)
    x, t, ctx = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([3, 300]), torch.randn(2, 5, 12, generator=g)
    with torch.no_grad():
        ref = model(x, t, ctx)
    model = model.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.contiguous(memory_format=torch.channels_last), t, ctx)
    assert out.shape == x.shape
    assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean()
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------------------- samplers
def test_ddim_timesteps_golden():
    d = DDIMSampler(NoiseSchedule.linear())
    d.set_timesteps(50)
    assert d.timesteps.tolist() == list(range(980, -1, -20))
    assert d.pairs()[0] == (980, 960) and d.pairs()[-1] == (0, -1)
    d.set_timesteps(10)
    assert d.timesteps.tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    p = DDPMSampler(NoiseSchedule.linear())
    assert p.timesteps[0] == 999 and p.timesteps[-1] == 0 and len(p.timesteps) == 1000


MU, SD = 0.3, 0.5


def _gaussian_eps(schedule):
    """Exact eps predictor E[eps | x_t] for data ~ N(MU, SD^2) (every pixel independent)."""
    def eps_fn(x, t):
        ab = schedule.coef("alpha_bars", t, x)
        return (1 - ab).sqrt() / (ab * SD ** 2 + 1 - ab) * (x - ab.sqrt() * MU)
    return eps_fn


def test_ddim_eta1_single_step_equals_ddpm_step():
    s = NoiseSchedule.linear()
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    for t in (999, 500, 1):
        eps = _gaussian_eps(s)(x, torch.full((4,), t))
        a = DDPMSampler(s, clip_x0=False).step(eps, t, x, torch.Generator().manual_seed(t))
        b = DDIMSampler(s).step(eps, t, t - 1, x, eta=1.0, generator=torch.Generator().manual_seed(t))
        assert torch.allclose(a, b, atol=1e-5)


def test_samplers_recover_gaussian_data_moments():
    """DDPM (T steps) and DDIM (T steps, eta = 1) with the exact eps model sample N(MU, SD^2)."""
    s = NoiseSchedule.linear()
    shape = (2000, 1, 2, 2)  # 8000 values: standard error of the mean ~0.006
    for sampler, eta in [(DDPMSampler(s, clip_x0=False), 0.0), (DDIMSampler(s), 1.0)]:
        out = sample(_gaussian_eps(s), shape, sampler, steps=1000, eta=eta,
                     generator=torch.Generator().manual_seed(0), progress=False)
        assert out.mean().item() == pytest.approx(MU, abs=0.02)
        assert out.std().item() == pytest.approx(SD, abs=0.02)
    # the deterministic DDIM ODE with 50 steps: close, within discretisation error
    out = sample(_gaussian_eps(s), shape, DDIMSampler(s), steps=50, eta=0.0,
                 generator=torch.Generator().manual_seed(0), progress=False)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(SD, abs=0.05)


def test_ddim_eta0_deterministic():
    s = NoiseSchedule.linear()
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    runs = [sample(_gaussian_eps(s), x_T.shape, DDIMSampler(s), steps=20, eta=0.0, x_T=x_T,
                   generator=torch.Generator().manual_seed(seed), progress=False) for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    # same seed -> identical samples, stochastic samplers included
    for sampler, eta in [(DDPMSampler(NoiseSchedule.linear(T=50)), 0.0), (DDIMSampler(s), 0.5)]:
        a, b = (sample(_gaussian_eps(sampler.schedule), (2, 1, 4, 4), sampler, eta=eta,
                       generator=torch.Generator().manual_seed(7), progress=False) for _ in range(2))
        assert torch.equal(a, b)


def test_per_sample_generators_make_samples_batch_independent():
    s = NoiseSchedule.linear(T=100)
    gens = lambda seeds: [torch.Generator().manual_seed(k) for k in seeds]  # noqa: E731
    full = sample(_gaussian_eps(s), (4, 1, 3, 3), DDPMSampler(s), generator=gens([0, 1, 2, 3]), progress=False)
    part = sample(_gaussian_eps(s), (2, 1, 3, 3), DDPMSampler(s), generator=gens([2, 3]), progress=False)
    assert torch.allclose(full[2:], part, atol=1e-6)
    assert randn((2, 3), gens([5, 6]))[1].tolist() == torch.randn(3, generator=torch.Generator().manual_seed(6)).tolist()


def test_sample_trajectory():
    s = NoiseSchedule.linear()
    x0, traj = sample(_gaussian_eps(s), (2, 1, 2, 2), DDIMSampler(s), steps=5, progress=False,
                      generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert len(traj) == 6 and torch.equal(traj[-1], x0)
    model = _tiny_unet()
    out = sample(lambda x, t: model(x, t), (2, 3, 16, 16), DDIMSampler(s), steps=3, progress=False, bf16=True,
                 generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_ddim_10_step_golden_regression():
    """A full 10-step DDIM loop with a fixed tiny seeded U-Net (added, scaled, to the exact
    Gaussian eps so samples stay in a sensible range): pins U-Net forward + sampler together."""
    model = _tiny_unet()
    s = NoiseSchedule.linear()
    exact = _gaussian_eps(s)
    with torch.no_grad():
        out = sample(lambda x, t: exact(x, t) + 0.2 * model(x, t), (2, 3, 16, 16), DDIMSampler(s), steps=10,
                     eta=0.0, generator=torch.Generator().manual_seed(0), progress=False)
    assert out.sum().item() == pytest.approx(521.06641, rel=1e-5)
    assert out.abs().sum().item() == pytest.approx(748.56628, rel=1e-5)
    assert out[0, 0, 0, :4].tolist() == pytest.approx([-0.130875, -0.135225, 0.197665, 0.276336], abs=1e-4)
    assert out[1, 2, -1, -4:].tolist() == pytest.approx([0.039182, 0.269881, 0.685976, 0.749186], abs=1e-4)


# ---------------------------------------------------------------------------------- guidance
class _RecordingModel:
    """Fake eps model: eps = context[:, 0, 0] everywhere; records every call's contexts."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, mask):
        self.calls.append((x.shape[0], t.clone(), context.clone(), mask.clone()))
        return torch.zeros_like(x) + context[:, 0, 0].view(-1, 1, 1, 1)


def test_guidance_formula():
    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([5, 5])
    cond, uncond = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), 0.5)
    for scale, expected in [(1.0, 2.0), (0.0, 0.5), (3.0, 0.5 + 3 * 1.5)]:
        model = _RecordingModel()
        eps = guided_eps(model, x, t, cond, uncond, scale)
        assert torch.allclose(eps, torch.full_like(x, expected))
        assert len(model.calls) == 1 and model.calls[0][0] == 4  # one batched forward of 2B


def test_negative_prompt_replaces_unconditional_branch():
    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([7, 7])
    cond = torch.full((2, 3, 4), 2.0)
    negative = torch.full((1, 5, 4), -1.0)  # one negative prompt, longer, broadcast over the batch
    neg_mask = torch.tensor([[False, False, True, True, True]])
    model = _RecordingModel()
    eps = sample(guided_model_fn(model, cond, negative, 2.0, uncond_mask=neg_mask), x.shape,
                 DDIMSampler(NoiseSchedule.linear()), steps=1, progress=False)
    assert eps.shape == x.shape
    n, tt, ctx, mask = model.calls[0]
    assert n == 4 and tt.tolist() == [0, 0, 0, 0]
    assert torch.equal(ctx[:2, :3], cond) and (ctx[:2, 3:] == 0).all()  # cond right-padded to 5
    assert mask[:2].tolist() == [[False] * 3 + [True] * 2] * 2
    assert (ctx[2:] == -1.0).all() and mask[2:].tolist() == neg_mask.expand(2, -1).tolist()
    # eps = eps_neg + 2 (eps_cond - eps_neg) = -1 + 2 * 3 = 5
    assert torch.allclose(guided_eps(model, x, t, cond, negative, 2.0, uncond_mask=neg_mask), torch.full_like(x, 5.0))
