"""Reverse-process samplers (DDPM, DDIM) with one scheduler API, one reverse loop, and guidance.

API (diffusers' schedulers are the model)::

    sampler = make_sampler(schedule, "ddim", steps=50, eta=0.0)   # or DDIMSampler(schedule, eta=0.0)
    sampler.set_timesteps(50)                       # visits 980, 960, ..., 20, 0
    x = randn(shape, g)
    for t in sampler.timesteps:
        out = sampler.step(eps_fn(x, torch.full((B,), t)), t, x, generator=g)   # StepOutput
        x = out.prev_sample                         # out.pred_x0: the model's x_0 estimate

or simply ``x0 = sample(eps_fn, sampler, shape, generator=g)`` (the one reverse loop, used by
the unconditional model, the text-to-image model and the trajectory figures).

Both samplers have the same ``set_timesteps(num_inference_steps)`` and ``step(model_output, t,
sample, generator=None) -> StepOutput``; what differs (DDPM's variance, DDIM's eta) is fixed when
the sampler is built.

Generators: ``generator`` may be one ``torch.Generator`` or a list with one generator per
sample. With a list, every sample's noise comes from its own stream, so a sample depends only on
its own seed, whatever the batch it is drawn in (up to kernel round-off of the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..diffusion.schedule import NoiseSchedule
from ..optim import native_bf16

Generator = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class StepOutput:
    """What one reverse step returns (diffusers' ``DDPMSchedulerOutput`` / ``DDIMSchedulerOutput``).

    prev_sample: ``(B, C, H, W)`` the next state ``x_{t_prev}`` (``x_0`` after the last step).
    pred_x0: ``(B, C, H, W)`` the model's estimate of ``x_0`` at this step (clipped to [-1, 1]
        when the sampler clips).
    """

    prev_sample: torch.Tensor
    pred_x0: torch.Tensor


def randn(shape: Sequence[int], generator: Generator = None, device=None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal ``(B, ...)``; with a list of generators, row i is drawn from generator i."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype)
                            for g in generator])
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def sample_generators(seed: int, start: int, n: int) -> list[torch.Generator]:
    """One generator per sample: sample ``i`` (``start <= i < start + n``) is seeded by ``(seed, i)`` only."""
    return [torch.Generator().manual_seed((seed & 0xFFFFFFFF) * 1_000_003 + i) for i in range(start, start + n)]


def _as_int(t) -> int:
    return int(t.flatten()[0]) if torch.is_tensor(t) else int(t)


class DDPMSampler:
    """Ancestral sampling of Ho et al. 2020, Algorithm 2 / eq. 11.

    ``x_{t-1} = mu_theta(x_t, t) + sigma_t z``, ``z ~ N(0, I)`` (no noise at the last step).

    Args:
        schedule: the noise schedule the model was trained with.
        variance: ``"small"``: ``sigma_t^2 = beta_tilde_t``, the posterior variance (eq. 7);
            ``"large"``: ``sigma_t^2 = beta_t`` (the two choices of sec. 3.2).
        clip_x0: when True the mean is computed as the posterior mean (eq. 7) of the predicted
            ``x_0`` clipped to [-1, 1] (as in Ho et al.'s code); when False it is exactly eq. 11,
            ``mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)`` (the two agree
            when no clipping happens).
    """

    def __init__(self, schedule: NoiseSchedule, variance: str = "small", clip_x0: bool = True):
        if variance not in ("small", "large"):
            raise ValueError("variance must be 'small' or 'large'")
        self.schedule, self.variance, self.clip_x0 = schedule, variance, clip_x0
        self.set_timesteps()

    def set_timesteps(self, num_inference_steps: int | None = None) -> None:
        """DDPM visits every step: ``timesteps = [T-1, ..., 0]``; ``num_inference_steps`` must be
        None or T."""
        T = self.schedule.T
        if num_inference_steps not in (None, T):
            raise ValueError(f"DDPM samples with all T={T} steps; use DDIM for {num_inference_steps} steps")
        self.timesteps = torch.arange(T - 1, -1, -1)

    def prev_timestep(self, t: int | torch.Tensor) -> int:
        """The step after ``t``: ``t - 1`` (-1 after the last step)."""
        return _as_int(t) - 1

    def step(self, model_output: torch.Tensor, t: int | torch.Tensor, sample: torch.Tensor,
             generator: Generator = None) -> StepOutput:
        """One reverse step ``x_t -> x_{t-1}``.

        Args:
            model_output: ``(B, C, H, W)`` the model's noise prediction ``eps_theta(x_t, t)``.
            t: the current timestep (int, or ``(B,)`` long all equal to it).
            sample: ``x_t (B, C, H, W)``.
            generator: noise source (see module docstring).
        """
        s, eps, x_t = self.schedule, model_output, sample
        x0 = s.predict_x0(x_t, t, eps)  # eq. 4 inverted (Ho et al. eq. 15)
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
            mean = s.posterior(x0, x_t, t)[0]  # eq. 7 at the clipped x0
        else:  # eq. 11
            mean = (x_t - s.coef("betas", t, x_t) / s.coef("sqrt_one_minus_alpha_bars", t, x_t) * eps) \
                / s.coef("alphas", t, x_t).sqrt()
        if _as_int(t) == 0:
            return StepOutput(mean, x0)
        var = s.coef("posterior_variance" if self.variance == "small" else "betas", t, x_t)
        z = randn(x_t.shape, generator, x_t.device, x_t.dtype)
        return StepOutput(mean + var.sqrt() * z, x0)


class DDIMSampler:
    """Denoising diffusion implicit models, Song et al. 2021.

    Args:
        schedule: the noise schedule the model was trained with.
        clip_x0: clip the predicted ``x_0`` to [-1, 1] (and re-derive eps from it) before the
            update; off by default, as in the DDIM paper.
        eta: stochasticity in [0, 1] (eq. 16): 0 is the deterministic DDIM, 1 is DDPM with the
            small variance.
    """

    def __init__(self, schedule: NoiseSchedule, clip_x0: bool = False, eta: float = 0.0):
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.schedule, self.clip_x0, self.eta = schedule, clip_x0, float(eta)
        self.set_timesteps(schedule.T)

    def set_timesteps(self, num_inference_steps: int = 50) -> None:
        """The DDIM paper's uniform sub-sequence ``tau = [0, c, 2c, ...]``, ``c = T // n``,
        visited in reverse: for 50 steps over T = 1000, ``980, 960, ..., 20, 0``."""
        T = self.schedule.T
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}]")
        self.step_ratio = T // num_inference_steps
        self.timesteps = (torch.arange(num_inference_steps) * self.step_ratio).flip(0)

    def prev_timestep(self, t: int | torch.Tensor) -> int:
        """The step after ``t``: ``t - c``; -1 (``alpha_bar = 1``, the clean data) after ``t = 0``."""
        return max(_as_int(t) - self.step_ratio, -1)

    def _alpha_bar(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t as a ``(1, 1, 1, 1)`` tensor; ``alpha_bar_{-1} = 1`` (the clean data)."""
        ab = self.schedule.alpha_bars[t] if t >= 0 else torch.ones((), dtype=torch.float64)
        return ab.to(device=x.device, dtype=x.dtype).view(*([1] * x.ndim))

    def step(self, model_output: torch.Tensor, t: int | torch.Tensor, sample: torch.Tensor,
             generator: Generator = None) -> StepOutput:
        """One generalised reverse step ``x_t -> x_{t_prev}`` (Song et al. 2021, eq. 12), with
        ``t_prev = prev_timestep(t)``.

        ``x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps + sigma z`` with
        ``x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)`` and (eq. 16)
        ``sigma = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)``.

        Args:
            model_output: ``(B, C, H, W)`` noise prediction at ``(x_t, t)``.
            t: current timestep (int, or ``(B,)`` long all equal to it).
            sample: ``x_t (B, C, H, W)``.
            generator: noise source (used only when ``eta > 0``).
        """
        eps, x_t = model_output, sample
        t, t_prev = _as_int(t), self.prev_timestep(t)
        a_t, a_prev = self._alpha_bar(t, x_t), self._alpha_bar(t_prev, x_t)
        x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if self.eta > 0 and t_prev >= 0:
            x_prev = x_prev + sigma * randn(x_t.shape, generator, x_t.device, x_t.dtype)
        return StepOutput(x_prev, x0)


Sampler = DDPMSampler | DDIMSampler
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_sampler(schedule: NoiseSchedule, name: str, steps: int | None = None, eta: float = 0.0,
                 clip_x0: bool = True) -> Sampler:
    """The sampler by name, its timesteps set.

    ``"ddpm"``: all T steps (``steps`` None or T), small posterior variance; ``eta`` does not
    apply (ancestral sampling is DDIM's eta = 1). ``"ddim"``: ``steps`` (default 50) evenly spaced
    steps, stochasticity ``eta``. ``clip_x0``: both clip the predicted x_0 to [-1, 1] at every
    step (Ho et al.'s code; diffusers' default), which keeps an imperfect model's early, highly
    amplified x_0 estimates (1 / sqrt(alpha_bar_t) ~ 150 at t = T-1) from saturating images."""
    if name == "ddpm":
        if steps not in (None, schedule.T):
            raise ValueError(f"DDPM samples with all T={schedule.T} steps (got --steps {steps}); "
                             f"use --sampler ddim for fewer steps")
        return DDPMSampler(schedule, clip_x0=clip_x0)
    if name == "ddim":
        smp = DDIMSampler(schedule, clip_x0=clip_x0, eta=eta)
        smp.set_timesteps(50 if steps is None else steps)
        return smp
    raise ValueError(f"unknown sampler {name!r}: 'ddpm' or 'ddim'")


@torch.no_grad()
def sample(eps_fn: EpsFn, sampler: Sampler, shape: Sequence[int], generator: Generator = None, *,
           x_T: torch.Tensor | None = None, device=None, bf16: bool = False, progress: bool = False,
           return_trajectory: bool = False,
           on_step: Callable[[int, torch.Tensor, StepOutput], None] | None = None):
    """The reverse process from ``x_T ~ N(0, I)`` to ``x_0``: THE sampling loop.

    ``x_T`` is drawn first from ``generator``, then each step calls ``eps_fn`` once and
    ``sampler.step`` (which draws that step's noise from ``generator``) over ``sampler.timesteps``.

    Args:
        eps_fn: ``(x_t (B, C, H, W) float32, t (B,) long) -> eps (B, C, H, W)``; wrap the model
            to add a context, guidance (:func:`guided_model_fn`) or a memory format.
        sampler: a :class:`DDPMSampler` or :class:`DDIMSampler`, timesteps set.
        shape: ``(B, C, H, W)``.
        generator: seeds the initial noise and every step's noise (see module docstring).
        x_T: start from this noise instead of drawing it.
        bf16: run ``eps_fn`` under bf16 autocast where the device runs bf16 natively
            (:func:`mmsys.optim.native_bf16`; elsewhere float32). The sampler arithmetic stays float32.
        progress: show a tqdm bar.
        return_trajectory: also return ``[x_T, ..., x_0]`` (on the CPU).
        on_step: called after every step as ``on_step(t, x_t, StepOutput)`` (e.g. to record
            the model's x_0 estimates along the way).

    Returns:
        ``x_0 (B, C, H, W)`` float32 (not clipped), and the trajectory list when asked.
    """
    x = randn(shape, generator, device) if x_T is None else x_T.float().clone()
    traj = [x.cpu()] if return_trajectory else None
    name = "DDIM" if isinstance(sampler, DDIMSampler) else "DDPM"
    bf16 = bf16 and native_bf16(x.device.type)
    for t in tqdm([int(t) for t in sampler.timesteps], desc=name, disable=not progress, leave=False):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            eps = eps_fn(x, t_batch).float()
        out = sampler.step(eps, t, x, generator=generator)
        if on_step is not None:
            on_step(t, x, out)
        x = out.prev_sample
        if return_trajectory:
            traj.append(x.cpu())
    return (x, traj) if return_trajectory else x


def _pad_context(c: torch.Tensor, m: torch.Tensor | None, L: int):
    """Right-pad ``c (B, l, D)`` and its mask ``(B, l)`` (True = pad) to length ``L``."""
    B, l, _ = c.shape
    if m is None:
        m = torch.zeros(B, l, dtype=torch.bool, device=c.device)
    if l < L:
        c = torch.cat([c, c.new_zeros(B, L - l, c.shape[2])], dim=1)
        m = torch.cat([m, torch.ones(B, L - l, dtype=torch.bool, device=c.device)], dim=1)
    return c, m


def guided_eps(model: Callable, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
               uncond: torch.Tensor, scale: float, cond_mask: torch.Tensor | None = None,
               uncond_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6 in the eps form).

    ``eps = eps_uncond + s * (eps_cond - eps_uncond)``: ``s = 1`` is the plain conditional
    model, ``s = 0`` the unconditional one, ``s > 1`` pushes samples towards the condition.

    Both branches are computed in ONE forward pass on a batch of 2B (``[x; x]`` with contexts
    ``[cond; uncond]``; contexts of different lengths are right-padded and masked).

    Negative prompts: pass the negative prompt's tokens as ``uncond`` (instead of the empty /
    null caption); guidance then steers away from it: ``eps = eps_neg + s (eps_cond - eps_neg)``.

    Args:
        model: ``model(x (2B, C, H, W), t (2B,), context (2B, L, Dc), context_padding_mask (2B, L))``.
        x: ``(B, C, H, W)``; t: ``(B,)``.
        cond, uncond: ``(B, L1, Dc)`` and ``(B, L2, Dc)`` (``uncond`` may have batch 1: broadcast).
        scale: guidance scale ``s``.
        cond_mask, uncond_mask: ``(B, L)`` bool True = pad, or None (no padding).

    Returns:
        ``(B, C, H, W)`` guided noise prediction.
    """
    B = x.shape[0]
    if uncond.shape[0] == 1 and B > 1:
        uncond = uncond.expand(B, -1, -1)
        uncond_mask = None if uncond_mask is None else uncond_mask.expand(B, -1)
    L = max(cond.shape[1], uncond.shape[1])
    c, cm = _pad_context(cond, cond_mask, L)
    u, um = _pad_context(uncond, uncond_mask, L)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, u]), torch.cat([cm, um]))
    eps_c, eps_u = out.float().chunk(2)
    return eps_u + scale * (eps_c - eps_u)


def guided_model_fn(model: Callable, cond: torch.Tensor, uncond: torch.Tensor, scale: float,
                    cond_mask: torch.Tensor | None = None, uncond_mask: torch.Tensor | None = None) -> EpsFn:
    """``(x, t) -> guided eps`` closure for :func:`sample` (see :func:`guided_eps`)."""
    return lambda x, t: guided_eps(model, x, t, cond, uncond, scale, cond_mask, uncond_mask)
