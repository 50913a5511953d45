"""m4 shape tests of diffusion, through the seam only: schedules (golden values), the U-Net,
the DDPM/DDIM step API (golden values) and the one reverse loop.

Internals of the bundled library (coefficient broadcasting, cross-attention context, guidance
batching) are tested in tests/test_diffusion_internals.py."""

from __future__ import annotations

import math

import pytest
import torch

from milestones.adapters import CANDIDATE as impl

pytestmark = [pytest.mark.m4, pytest.mark.usefixtures("one_thread")]


def tables(kind="linear", T=1000):
    schedule = impl.diffusion_schedule(kind, T)
    return schedule, impl.diffusion_schedule_tables(schedule)


# ---------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bar_monotone_in_unit_interval(kind):
    s, tab = tables(kind)
    ab = tab["alpha_bars"]
    assert s.T == 1000 and ab.shape == (1000,)
    assert (ab > 0).all() and (ab <= 1).all()
    assert (ab[1:] < ab[:-1]).all()
    assert torch.allclose(tab["alphas"], 1 - tab["betas"]) and torch.allclose(ab, torch.cumprod(tab["alphas"], 0))


def test_linear_schedule_golden_values():
    _, tab = tables()  # LIBRARY-NOTES reference values
    assert tab["betas"][0].item() == pytest.approx(1e-4) and tab["betas"][-1].item() == pytest.approx(0.02)
    assert tab["alpha_bars"][999].item() == pytest.approx(4.0358e-5, rel=1e-3)
    std = tab["posterior_variance"].sqrt()
    assert std[999].item() == pytest.approx(0.14142, abs=1e-5)
    assert std[500].item() == pytest.approx(0.10026, abs=1e-5)
    assert std[1].item() == pytest.approx(0.00738, abs=1e-5)
    assert tab["posterior_variance"][0].item() == 0.0
    assert tab["posterior_log_variance_clipped"][0] == tab["posterior_log_variance_clipped"][1]


def test_cosine_schedule_golden_values():
    _, tab = tables("cosine")
    # f(t) = cos(((t/T + s)/(1 + s)) pi/2)^2, alpha_bar[i] = f(i+1)/f(0) (Nichol & Dhariwal eq. 17)
    assert tab["alpha_bars"][0].item() == pytest.approx(0.999958715775178, abs=1e-12)
    assert tab["alpha_bars"][499].item() == pytest.approx(0.49384359044063775, abs=1e-12)
    hand = math.cos((0.508 / 1.008) * math.pi / 2) ** 2 / math.cos((0.008 / 1.008) * math.pi / 2) ** 2
    assert tab["alpha_bars"][499].item() == pytest.approx(hand, abs=1e-12)
    assert tab["betas"].max().item() == pytest.approx(0.999)  # clipped at the end
    with pytest.raises(ValueError):
        impl.diffusion_schedule("sigmoid", 10)


def test_q_sample_moments():
    s, tab = tables()
    g = torch.Generator().manual_seed(0)
    n = 20000
    t = torch.tensor([10, 500, 900]).repeat_interleave(n)
    x0 = torch.tensor([0.8, -0.5, 0.3]).repeat_interleave(n).view(-1, 1, 1, 1)
    xt = impl.diffusion_q_sample(s, x0, t, torch.randn(x0.shape, generator=g)).view(3, n)
    ab = tab["alpha_bars"][[10, 500, 900]].float()
    assert torch.allclose(xt.mean(1), ab.sqrt() * torch.tensor([0.8, -0.5, 0.3]), atol=0.02)
    assert torch.allclose(xt.var(1), 1 - ab, rtol=0.03)
    # with given noise it is exactly eq. 4 and predict_x0 / predict_eps invert it
    eps = torch.randn(3, 1, 2, 2, generator=g)
    x0 = torch.rand(3, 1, 2, 2, generator=g)
    tt = torch.tensor([3, 400, 999])
    xt = impl.diffusion_q_sample(s, x0, tt, eps)
    a = tab["alpha_bars"][tt].float().view(-1, 1, 1, 1)
    assert torch.allclose(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-6)
    assert torch.allclose(impl.diffusion_predict_x0(s, xt, tt, eps), x0, atol=1e-3)
    assert torch.allclose(impl.diffusion_predict_eps(s, xt, tt, x0), eps, atol=1e-4)


def test_posterior_hand_checked():
    s, tab = tables()
    # t = 1: beta_1 = 1e-4 + 0.0199/999, alpha_bar_0 = 1 - 1e-4, alpha_bar_1 = alpha_bar_0 (1 - beta_1)
    b1 = 1e-4 + 0.0199 / 999
    ab0, ab1 = 1 - 1e-4, (1 - 1e-4) * (1 - b1)
    c1 = math.sqrt(ab0) * b1 / (1 - ab1)  # 0.54529...
    c2 = math.sqrt(1 - b1) * (1 - ab0) / (1 - ab1)  # 0.45470...
    var = b1 * (1 - ab0) / (1 - ab1)  # 5.4532e-5
    assert c1 == pytest.approx(0.5452914995, abs=1e-9) and var == pytest.approx(5.45318766e-5, rel=1e-7)
    x0 = torch.full((1, 1, 1, 1), 1.0, dtype=torch.float64)
    xt = torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64)
    mean, v, logv = impl.diffusion_posterior(s, x0, xt, torch.tensor([1]))
    assert mean.item() == pytest.approx(c1 * 1.0 + c2 * 2.0, abs=1e-12)
    assert v.item() == pytest.approx(var, rel=1e-12) and logv.item() == pytest.approx(math.log(var), rel=1e-12)
    # posterior mean at x0_hat equals DDPM eq. 11's mean
    g = torch.Generator().manual_seed(1)
    xt, eps = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, 1, 3, 3, generator=g)
    t = torch.tensor([1, 50, 500, 999])
    m = impl.diffusion_posterior(s, impl.diffusion_predict_x0(s, xt, t, eps), xt, t)[0]
    beta, alpha, ab = (tab[k][t].float().view(-1, 1, 1, 1) for k in ("betas", "alphas", "alpha_bars"))
    eq11 = (xt - beta / (1 - ab).sqrt() * eps) / alpha.sqrt()
    assert torch.allclose(m, eq11, atol=1e-4)


def test_snr_golden():
    s, _ = tables()
    # SNR at t = 999 is alpha_bar / (1 - alpha_bar) = 4.0358e-5 / (1 - 4.0358e-5)
    assert impl.diffusion_snr(s, torch.tensor([999])).item() == pytest.approx(4.0360e-5, rel=1e-3)
    assert impl.diffusion_snr(s, torch.tensor([0])).item() == pytest.approx(0.9999 / 1e-4, rel=1e-6)


# ---------------------------------------------------------------------------------- U-Net
def noisy_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace every parameter (the zero-initialised ones included) by seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


TINY_UNET = dict(base=8, channel_mults=(1, 2), n_res=1, attn_resolutions=(8,), groups=4, dropout=0.0, n_heads=2,
                 image_size=16)


def _tiny_unet(seed=0):
    """A tiny U-Net whose parameters (including the zero-initialised ones) are seeded noise."""
    return noisy_init(impl.unet_build(TINY_UNET).eval(), seed)


def test_unet_starts_at_zero_and_keeps_shape():
    model = impl.unet_build(dict(base=8, channel_mults=(1, 2, 2), n_res=1, groups=4)).eval()
    for size in (16, 28, 32, 64):
        x = torch.randn(2, 3, size, size)
        out = impl.ddpm_eps(model, x, torch.tensor([0, 999]))
        assert out.shape == x.shape
        assert out.abs().max() == 0  # zero-initialised output conv
    grey = impl.unet_build(dict(in_ch=1, base=8, channel_mults=(1, 2), n_res=1, groups=4))
    assert impl.ddpm_eps(grey, torch.randn(2, 1, 28, 28), torch.tensor([1.5, 3.0])).shape == (2, 1, 28, 28)


def test_unet_time_embedding_changes_output():
    model = _tiny_unet()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = impl.ddpm_eps(model, x, torch.tensor([10, 10])), impl.ddpm_eps(model, x, torch.tensor([700, 700]))
    assert a.abs().mean() > 1e-3
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()


# ---------------------------------------------------------------------------------- samplers
def test_timesteps_golden_and_last_step_lands_on_x0():
    s, _ = tables()
    d = impl.diffusion_sampler(s, "ddim", 50)
    assert d.timesteps.tolist() == list(range(980, -1, -20))
    d.set_timesteps(10)
    assert d.timesteps.tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    p = impl.diffusion_sampler(s, "ddpm")
    assert p.timesteps[0] == 999 and p.timesteps[-1] == 0 and len(p.timesteps) == 1000
    with pytest.raises(ValueError):
        impl.diffusion_sampler(s, "ddpm", 50)
    # the step after t = 0 is x_0 itself (alpha_bar_{-1} = 1), noise-free for both samplers
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1)) * 0.01
    for smp in (impl.diffusion_sampler(s, "ddim", 10, eta=1.0), p):
        out = impl.diffusion_step(smp, eps, 0, x, generator=torch.Generator().manual_seed(2))
        assert out.prev_sample.shape == x.shape and out.pred_x0.shape == x.shape
        assert torch.allclose(out.prev_sample, out.pred_x0, atol=1e-6)


MU, SD = 0.3, 0.5


def _gaussian_eps(schedule):
    """Exact eps predictor E[eps | x_t] for data ~ N(MU, SD^2) (every pixel independent)."""
    alpha_bars = impl.diffusion_schedule_tables(schedule)["alpha_bars"]

    def eps_fn(x, t):
        ab = alpha_bars[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return (1 - ab).sqrt() / (ab * SD ** 2 + 1 - ab) * (x - ab.sqrt() * MU)
    return eps_fn


def test_step_golden_values():
    """One step of each sampler against the equations by hand: DDPM eq. 11 + sigma_t z (sigma_t^2
    = beta_tilde_t, eq. 7) and DDIM eq. 12 with sigma of eq. 16; pred_x0 = eq. 4 solved for x_0."""
    s, tab = tables()
    g = torch.Generator().manual_seed(5)
    x, eps = torch.randn(3, 1, 2, 2, generator=g), torch.randn(3, 1, 2, 2, generator=g)
    t, t_prev = 500, 480
    ab, ab_prev = tab["alpha_bars"][t].item(), tab["alpha_bars"][t_prev].item()
    beta, beta_tilde = tab["betas"][t].item(), tab["posterior_variance"][t].item()
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    ddpm = impl.diffusion_step(impl.diffusion_sampler(s, "ddpm", clip_x0=False), eps, t, x,
                               generator=torch.Generator().manual_seed(9))
    mean = (x - beta / math.sqrt(1 - ab) * eps) / math.sqrt(1 - beta)  # eq. 11
    assert torch.allclose(ddpm.prev_sample, mean + math.sqrt(beta_tilde) * z, atol=1e-5)
    assert torch.allclose(ddpm.pred_x0, x0, atol=1e-4)
    for eta in (0.0, 0.7):
        ddim = impl.diffusion_step(impl.diffusion_sampler(s, "ddim", 50, eta=eta, clip_x0=False), eps, t, x,
                                   generator=torch.Generator().manual_seed(9))
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))  # eq. 16
        want = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma ** 2) * eps + sigma * z  # eq. 12
        assert torch.allclose(ddim.prev_sample, want, atol=1e-5) and torch.allclose(ddim.pred_x0, x0, atol=1e-4)
    clipped = impl.diffusion_step(impl.diffusion_sampler(s, "ddim", 50), eps * 30, t, x)
    assert clipped.pred_x0.abs().max() <= 1.0  # clip_x0 (the default) clips the x_0 estimate


def test_ddim_eta1_single_step_equals_ddpm_step():
    s, _ = tables()
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    ddpm = impl.diffusion_sampler(s, "ddpm", clip_x0=False)
    ddim = impl.diffusion_sampler(s, "ddim", 1000, eta=1.0, clip_x0=False)
    for t in (999, 500, 1):
        eps = _gaussian_eps(s)(x, torch.full((4,), t))
        a = impl.diffusion_step(ddpm, eps, t, x, torch.Generator().manual_seed(t)).prev_sample
        b = impl.diffusion_step(ddim, eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        assert torch.allclose(a, b, atol=1e-5)


def test_samplers_recover_gaussian_data_moments():
    """DDPM (T steps) and DDIM (T steps, eta = 1) with the exact eps model sample N(MU, SD^2)."""
    s, _ = tables()
    shape = (2000, 1, 2, 2)  # 8000 values: standard error of the mean ~0.006
    for smp in (impl.diffusion_sampler(s, "ddpm", clip_x0=False),
                impl.diffusion_sampler(s, "ddim", 1000, eta=1.0, clip_x0=False)):
        out = impl.diffusion_sample(_gaussian_eps(s), smp, shape, torch.Generator().manual_seed(0))
        assert out.mean().item() == pytest.approx(MU, abs=0.02)
        assert out.std().item() == pytest.approx(SD, abs=0.02)
    # the deterministic DDIM ODE with 50 steps: close, within discretisation error
    out = impl.diffusion_sample(_gaussian_eps(s), impl.diffusion_sampler(s, "ddim", 50, clip_x0=False), shape,
                                torch.Generator().manual_seed(0))
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(SD, abs=0.05)


def test_ddim_eta0_deterministic():
    s, _ = tables()
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    smp = impl.diffusion_sampler(s, "ddim", 20, clip_x0=False)
    runs = [impl.diffusion_sample(_gaussian_eps(s), smp, x_T.shape, torch.Generator().manual_seed(seed), x_T=x_T)
            for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    # same seed -> identical samples, stochastic samplers included
    s50 = impl.diffusion_schedule("linear", 50)
    for sched, smp in [(s50, impl.diffusion_sampler(s50, "ddpm")),
                       (s, impl.diffusion_sampler(s, "ddim", 1000, eta=0.5, clip_x0=False))]:
        a, b = (impl.diffusion_sample(_gaussian_eps(sched), smp, (2, 1, 4, 4), torch.Generator().manual_seed(7))
                for _ in range(2))
        assert torch.equal(a, b)


def test_per_sample_generators_make_samples_batch_independent():
    s = impl.diffusion_schedule("linear", 100)
    smp = impl.diffusion_sampler(s, "ddpm")
    full = impl.diffusion_sample(_gaussian_eps(s), smp, (4, 1, 3, 3), impl.diffusion_generators(0, 0, 4))
    part = impl.diffusion_sample(_gaussian_eps(s), smp, (2, 1, 3, 3), impl.diffusion_generators(0, 2, 2))
    assert torch.allclose(full[2:], part, atol=1e-6)


def test_sample_loop_calls_each_step_once():
    s, _ = tables()
    seen = []
    x0 = impl.diffusion_sample(_gaussian_eps(s), impl.diffusion_sampler(s, "ddim", 5), (2, 1, 2, 2),
                               torch.Generator().manual_seed(0),
                               on_step=lambda t, x_t, out: seen.append((t, x_t.clone(), out.prev_sample)))
    assert [t for t, _, _ in seen] == [800, 600, 400, 200, 0] and torch.equal(seen[-1][2], x0)
    assert all(torch.equal(a[2], b[1]) for a, b in zip(seen, seen[1:]))  # each step starts where the last ended
    model = _tiny_unet()
    out = impl.diffusion_sample(lambda x, t: impl.ddpm_eps(model, x, t), impl.diffusion_sampler(s, "ddim", 3),
                                (2, 3, 16, 16), torch.Generator().manual_seed(0), bf16=True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_ddim_10_step_golden_regression():
    """A full 10-step DDIM loop with a fixed tiny seeded U-Net (added, scaled, to the exact
    Gaussian eps so samples stay in a sensible range): pins U-Net forward + sampler together."""
    model = _tiny_unet()
    s, _ = tables()
    exact = _gaussian_eps(s)
    with torch.no_grad():
        out = impl.diffusion_sample(lambda x, t: exact(x, t) + 0.2 * impl.ddpm_eps(model, x, t),
                                    impl.diffusion_sampler(s, "ddim", 10, clip_x0=False), (2, 3, 16, 16),
                                    torch.Generator().manual_seed(0))
    assert out.sum().item() == pytest.approx(521.06641, rel=1e-5)
    assert out.abs().sum().item() == pytest.approx(748.56628, rel=1e-5)
    assert out[0, 0, 0, :4].tolist() == pytest.approx([-0.130875, -0.135225, 0.197665, 0.276336], abs=1e-4)
    assert out[1, 2, -1, -4:].tolist() == pytest.approx([0.039182, 0.269881, 0.685976, 0.749186], abs=1e-4)
