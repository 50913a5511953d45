"""Internals of the bundled diffusion code (not part of the seam; unmarked, imports mmsys):
coefficient broadcasting, the U-Net's cross-attention context and bf16 path, the per-sample noise
streams, the loop's trajectory, the step API's types, and classifier-free guidance batching."""

from __future__ import annotations

import pytest
import torch
from test_diffusion import TINY_UNET, noisy_init

from mmsys.diffusion.samplers import (DDIMSampler, DDPMSampler, StepOutput, guided_eps, guided_model_fn, randn,
                                      sample)
from mmsys.diffusion.schedule import NoiseSchedule
from mmsys.diffusion.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_unet(context_dim=None, seed=0) -> UNet:
    return noisy_init(UNet(UNetConfig(**TINY_UNET, context_dim=context_dim)).eval(), seed)


def test_extract_broadcasts_per_sample():
    s = NoiseSchedule.linear()
    x = torch.zeros(3, 2, 4, 4, dtype=torch.bfloat16)
    c = s.coef("betas", torch.tensor([0, 1, 999]), x)
    assert c.shape == (3, 1, 1, 1) and c.dtype == torch.bfloat16
    assert s.coef("betas", 999, x).shape == (3, 1, 1, 1)



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
    smp = DDIMSampler(NoiseSchedule.linear())
    smp.set_timesteps(1)
    eps = sample(guided_model_fn(model, cond, negative, 2.0, uncond_mask=neg_mask), smp, x.shape)
    assert eps.shape == x.shape
    n, tt, ctx, mask = model.calls[0]
    assert n == 4 and tt.tolist() == [0, 0, 0, 0]
    assert torch.equal(ctx[:2, :3], cond) and (ctx[:2, 3:] == 0).all()  # cond right-padded to 5
    assert mask[:2].tolist() == [[False] * 3 + [True] * 2] * 2
    assert (ctx[2:] == -1.0).all() and mask[2:].tolist() == neg_mask.expand(2, -1).tolist()
    # eps = eps_neg + 2 (eps_cond - eps_neg) = -1 + 2 * 3 = 5
    assert torch.allclose(guided_eps(model, x, t, cond, negative, 2.0, uncond_mask=neg_mask), torch.full_like(x, 5.0))


def test_randn_per_sample_streams():
    gens = [torch.Generator().manual_seed(k) for k in (5, 6)]
    assert randn((2, 3), gens)[1].tolist() == torch.randn(3, generator=torch.Generator().manual_seed(6)).tolist()
    with pytest.raises(ValueError):
        randn((3, 2), gens)


def test_step_api_types_and_trajectory():
    s = NoiseSchedule.linear(T=20)
    for smp in (DDPMSampler(s), DDIMSampler(s, eta=0.5)):
        x = torch.randn(2, 1, 2, 2)
        out = smp.step(torch.zeros_like(x), int(smp.timesteps[0]), x, generator=torch.Generator().manual_seed(0))
        assert isinstance(out, StepOutput) and out.prev_sample.shape == out.pred_x0.shape == x.shape
    smp = DDIMSampler(s)
    smp.set_timesteps(5)
    assert [smp.prev_timestep(t) for t in smp.timesteps] == [12, 8, 4, 0, -1]
    x0, traj = sample(lambda x, t: torch.zeros_like(x), smp, (2, 1, 2, 2), torch.Generator().manual_seed(0),
                      return_trajectory=True)
    assert len(traj) == 6 and torch.equal(traj[-1], x0)
    with pytest.raises(ValueError):
        DDIMSampler(s, eta=-1.0)
