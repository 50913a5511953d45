"""Reverse-process samplers (DDPM, DDIM) with a small scheduler API, and classifier-free guidance.

API (in the style of diffusers schedulers)::

    sampler = DDIMSampler(NoiseSchedule.linear())
    sampler.set_timesteps(50)                      # visits 980, 960, ..., 20, 0
    x = torch.randn(shape, generator=g)
    for t, t_prev in sampler.pairs():
        eps = model(x, torch.full((B,), t))
        x = sampler.step(eps, t, t_prev, x, eta=0.0, generator=g)

or simply ``x0 = sample(model_fn, shape, sampler, steps=50, generator=g)``.

Generators: ``generator`` may be one ``torch.Generator`` or a list with one generator per
sample. With a list, every sample's noise comes from its own stream, so a sample depends only on
its own seed, whatever the batch it is drawn in (up to kernel round-off of the model).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..diffusion.schedule import NoiseSchedule

Generator = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generator = None, device=None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal ``(B, ...)``; with a list of generators, row i is drawn from generator i."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype)
                            for g in generator])
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


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

    def set_timesteps(self, n_steps: int | None = None) -> None:
        """DDPM visits every step: ``timesteps = [T-1, ..., 0]``. ``n_steps`` must be None or T."""
        T = self.schedule.T
        if n_steps not in (None, T):
            raise ValueError(f"DDPM samples with all T={T} steps; use DDIMSampler for {n_steps}")
        self.timesteps = torch.arange(T - 1, -1, -1)

    def pairs(self) -> list[tuple[int, int]]:
        """``[(t, t_prev), ...]`` in sampling order (``t_prev = t - 1``; -1 after the last step)."""
        return [(int(t), int(t) - 1) for t in self.timesteps]

    def step(self, eps: torch.Tensor, t: int | torch.Tensor, x_t: torch.Tensor,
             generator: Generator = None) -> torch.Tensor:
        """One reverse step ``x_t -> x_{t-1}``.

        Args:
            eps: ``(B, C, H, W)`` the model's noise prediction ``eps_theta(x_t, t)``.
            t: the current timestep (int, or ``(B,)`` long all equal to it).
            x_t: ``(B, C, H, W)``.
            generator: noise source (see module docstring).
        """
        s = self.schedule
        if self.clip_x0:
            x0 = s.predict_x0(x_t, t, eps).clamp(-1, 1)
            mean = s.posterior(x0, x_t, t)[0]
        else:  # eq. 11
            mean = (x_t - s.coef("betas", t, x_t) / s.coef("sqrt_one_minus_alpha_bars", t, x_t) * eps) \
                / s.coef("alphas", t, x_t).sqrt()
        if _as_int(t) == 0:
            return mean
        var = s.coef("posterior_variance" if self.variance == "small" else "betas", t, x_t)
        z = randn(x_t.shape, generator, x_t.device, x_t.dtype)
        return mean + var.sqrt() * z


class DDIMSampler:
    """Denoising diffusion implicit models, Song et al. 2021.

    Args:
        schedule: the noise schedule the model was trained with.
        clip_x0: clip the predicted ``x_0`` to [-1, 1] (and re-derive eps from it) before the
            update; off by default, as in the DDIM paper.
    """

    def __init__(self, schedule: NoiseSchedule, clip_x0: bool = False):
        self.schedule, self.clip_x0 = schedule, clip_x0
        self.set_timesteps(schedule.T)

    def set_timesteps(self, n_steps: int = 50) -> None:
        """The DDIM paper's uniform sub-sequence ``tau = [0, c, 2c, ...]``, ``c = T // n_steps``,
        visited in reverse: for 50 steps over T = 1000, ``980, 960, ..., 20, 0``."""
        T = self.schedule.T
        if not 1 <= n_steps <= T:
            raise ValueError(f"n_steps must be in [1, {T}]")
        self.step_ratio = T // n_steps
        self.timesteps = (torch.arange(n_steps) * self.step_ratio).flip(0)

    def pairs(self) -> list[tuple[int, int]]:
        """``[(t, t_prev), ...]`` in sampling order; the last pair is ``(0, -1)`` (alpha_bar = 1)."""
        ts = [int(t) for t in self.timesteps]
        return list(zip(ts, ts[1:] + [-1]))

    def _alpha_bar(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t as a ``(1, 1, 1, 1)`` tensor; ``alpha_bar_{-1} = 1`` (the clean data)."""
        ab = self.schedule.alpha_bars[t] if t >= 0 else torch.ones((), dtype=torch.float64)
        return ab.to(device=x.device, dtype=x.dtype).view(*([1] * x.ndim))

    def step(self, eps: torch.Tensor, t: int | torch.Tensor, t_prev: int | torch.Tensor, x_t: torch.Tensor,
             eta: float = 0.0, generator: Generator = None) -> torch.Tensor:
        """One generalised reverse step ``x_t -> x_{t_prev}`` (Song et al. 2021, eq. 12).

        ``x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps + sigma z`` with
        ``x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)`` and (eq. 16)
        ``sigma = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)``;
        ``eta = 0`` is the deterministic DDIM, ``eta = 1`` is DDPM with the small variance.

        Args:
            eps: ``(B, C, H, W)`` noise prediction at ``(x_t, t)``.
            t, t_prev: current and next timestep (``t_prev = -1`` means "to x_0").
            x_t: ``(B, C, H, W)``.
            eta: stochasticity in [0, 1].
            generator: noise source (used only when ``eta > 0``).
        """
        t, t_prev = _as_int(t), _as_int(t_prev)
        a_t, a_prev = self._alpha_bar(t, x_t), self._alpha_bar(t_prev, x_t)
        x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0 and t_prev >= 0:
            x_prev = x_prev + sigma * randn(x_t.shape, generator, x_t.device, x_t.dtype)
        return x_prev


Sampler = DDPMSampler | DDIMSampler
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample(model_fn: ModelFn, shape: Sequence[int], sampler: Sampler, steps: int | None = None,
           eta: float = 0.0, generator: Generator = None, progress: bool = True,
           return_trajectory: bool = False, device=None, x_T: torch.Tensor | None = None,
           bf16: bool = False):
    """Run the reverse process from ``x_T ~ N(0, I)`` to ``x_0``.

    Args:
        model_fn: ``(x_t (B, C, H, W) float32, t (B,) long) -> eps (B, C, H, W)``; wrap the
            model to add a context, guidance (:func:`guided_model_fn`) or autocast.
        shape: ``(B, C, H, W)``.
        sampler: a :class:`DDPMSampler` or :class:`DDIMSampler`.
        steps: DDIM steps (default: keep the sampler's current timesteps); DDPM: None or T.
        eta: DDIM stochasticity (ignored by DDPM).
        generator: seeds the initial noise and every step's noise (see module docstring).
        progress: show a tqdm bar.
        return_trajectory: also return ``[x_T, ..., x_0]`` (on the CPU).
        x_T: start from this noise instead of drawing it.
        bf16: run ``model_fn`` under bf16 autocast (the sampler arithmetic stays float32).

    Returns:
        ``x_0 (B, C, H, W)`` float32 (not clipped), and the trajectory list when asked.
    """
    if steps is not None:
        sampler.set_timesteps(steps)
    x = randn(shape, generator, device) if x_T is None else x_T.float().clone()
    traj = [x.cpu()] if return_trajectory else None
    ddim = isinstance(sampler, DDIMSampler)
    pairs = sampler.pairs()
    for t, t_prev in tqdm(pairs, desc="DDIM" if ddim else "DDPM", disable=not progress, leave=False):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            eps = model_fn(x, t_batch).float()
        if ddim:
            x = sampler.step(eps, t, t_prev, x, eta=eta, generator=generator)
        else:
            x = sampler.step(eps, t, x, generator=generator)
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
                    cond_mask: torch.Tensor | None = None, uncond_mask: torch.Tensor | None = None) -> ModelFn:
    """``(x, t) -> guided eps`` closure for :func:`sample` (see :func:`guided_eps`)."""
    return lambda x, t: guided_eps(model, x, t, cond, uncond, scale, cond_mask, uncond_mask)
