"""Noise schedules of the diffusion forward process and their closed forms.

Notation follows Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", DDPM) with
0-based timesteps ``t = 0 .. T-1`` (index ``t`` here is the paper's ``t + 1``):

- ``beta_t``: variance of step ``q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)`` (eq. 2)
- ``alpha_t = 1 - beta_t`` and ``alpha_bar_t = prod_{s <= t} alpha_s``
- ``q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)`` (eq. 4)
- ``q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I)`` (eq. 6-7), with ``alpha_bar_{-1} = 1``.

All tables are computed and stored in float64 (so golden values are exact to print precision);
:meth:`NoiseSchedule.extract` casts the gathered coefficients to the dtype of the tensor they
multiply.
"""

from __future__ import annotations

import math

import torch


class NoiseSchedule:
    """Precomputed tables of a variance schedule ``beta_0 .. beta_{T-1}``.

    Build it with :meth:`linear` (DDPM) or :meth:`cosine` (improved DDPM), by name with
    :meth:`make`, or from any betas.

    Attributes (all ``(T,)`` float64):
        betas, alphas, alpha_bars, alpha_bars_prev (``alpha_bar_{t-1}``, 1 at t = 0),
        posterior_variance (``beta_tilde_t``, eq. 7), posterior_log_variance_clipped
        (log of beta_tilde with its t = 0 value, which is 0, replaced by the t = 1 value),
        posterior_mean_coef1 / posterior_mean_coef2 (the x_0 and x_t coefficients of eq. 7).
    """

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must lie in (0, 1)")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bars = torch.cumprod(self.alphas, dim=0)
        self.alpha_bars_prev = torch.cat([betas.new_ones(1), self.alpha_bars[:-1]])
        self.sqrt_alpha_bars = self.alpha_bars.sqrt()
        self.sqrt_one_minus_alpha_bars = (1.0 - self.alpha_bars).sqrt()
        # eq. 7: beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t
        self.posterior_variance = betas * (1.0 - self.alpha_bars_prev) / (1.0 - self.alpha_bars)
        # beta_tilde_0 = 0; clip the log like Ho et al.'s reference code does
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]))
        # eq. 7: mu_tilde = coef1 * x_0 + coef2 * x_t
        self.posterior_mean_coef1 = betas * self.alpha_bars_prev.sqrt() / (1.0 - self.alpha_bars)
        self.posterior_mean_coef2 = (1.0 - self.alpha_bars_prev) * self.alphas.sqrt() / (1.0 - self.alpha_bars)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """DDPM's linear schedule (Ho et al. 2020, sec. 4): betas evenly spaced in [start, end]."""
        return cls(torch.linspace(beta_start, beta_end, T, dtype=torch.float64))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17).

        ``alpha_bar(t) = f(t) / f(0)``, ``f(t) = cos(((t / T + s) / (1 + s)) * pi / 2)^2`` and
        ``beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1)`` clipped at ``max_beta`` (their sec. 3.2).
        With 0-based indices, ``alpha_bars[i] = f(i + 1) / f(0)`` until the clipping kicks in.
        """
        steps = torch.arange(T + 1, dtype=torch.float64)
        f = torch.cos(((steps / T + s) / (1 + s)) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        betas = (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
        return cls(betas)

    @classmethod
    def make(cls, kind: str = "linear", T: int = 1000) -> "NoiseSchedule":
        """The schedule factory: ``kind`` "linear" (:meth:`linear`) or "cosine" (:meth:`cosine`)
        with ``T`` steps; a checkpoint's ``{"kind": ..., "T": ...}`` is ``make(**spec)``."""
        if kind == "linear":
            return cls.linear(int(T))
        if kind == "cosine":
            return cls.cosine(int(T))
        raise ValueError(f"unknown schedule kind {kind!r}: 'linear' or 'cosine'")

    # ------------------------------------------------------------------ helpers
    @property
    def T(self) -> int:
        """Number of diffusion steps."""
        return len(self.betas)

    def to(self, device) -> "NoiseSchedule":
        """Move every table to ``device`` (stays float64; cast happens in :meth:`extract`)."""
        for k, v in vars(self).items():
            if torch.is_tensor(v):
                setattr(self, k, v.to(device))
        return self

    @staticmethod
    def extract(table: torch.Tensor, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        """Gather ``table[t]`` and shape it to broadcast against ``x``.

        Args:
            table: ``(T,)`` per-step coefficients.
            t: ``(B,)`` long timesteps, or an int used for every sample.
            x: ``(B, C, H, W)`` (any rank >= 1) tensor the result will multiply.

        Returns:
            ``(B, 1, 1, 1)`` (one trailing 1 per extra dim of ``x``) in ``x``'s dtype and device.
        """
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), int(t), dtype=torch.long)
        out = table.to(x.device)[t.to(x.device).long()]
        return out.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def coef(self, name: str, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        """``extract(getattr(self, name), t, x)``: e.g. ``coef("alpha_bars", t, x)``."""
        return self.extract(getattr(self, name), t, x)

    # ------------------------------------------------------------------ closed forms
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``x_t ~ q(x_t | x_0)`` in closed form (eq. 4, reparameterised as in eq. 14).

        ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``.

        Args:
            x0: ``(B, C, H, W)`` clean data (in [-1, 1] for images).
            t: ``(B,)`` long timesteps in ``[0, T)``.
            noise: ``(B, C, H, W)`` standard normal ``eps``; drawn from ``generator`` when None.
        """
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.coef("sqrt_alpha_bars", t, x0) * x0 + self.coef("sqrt_one_minus_alpha_bars", t, x0) * noise

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int):
        """Mean and variance of ``q(x_{t-1} | x_t, x_0)`` (eq. 6-7).

        Args:
            x0, x_t: ``(B, C, H, W)``; t: ``(B,)`` long (or int).

        Returns:
            ``(mean (B, C, H, W), variance (B, 1, 1, 1), log_variance_clipped (B, 1, 1, 1))``.
        """
        mean = self.coef("posterior_mean_coef1", t, x_t) * x0 + self.coef("posterior_mean_coef2", t, x_t) * x_t
        return (mean, self.coef("posterior_variance", t, x_t),
                self.coef("posterior_log_variance_clipped", t, x_t))

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """Invert eq. 4 for ``x_0`` given the noise: ``(x_t - sqrt(1 - a_bar) eps) / sqrt(a_bar)``.

        This is also DDIM's "predicted x_0" (Song et al. 2021, the first term of eq. 12).
        Shapes: ``x_t, eps (B, C, H, W)``, ``t (B,)``.
        """
        return (x_t - self.coef("sqrt_one_minus_alpha_bars", t, x_t) * eps) / self.coef("sqrt_alpha_bars", t, x_t)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor) -> torch.Tensor:
        """Invert eq. 4 for the noise: ``(x_t - sqrt(a_bar) x_0) / sqrt(1 - a_bar)``."""
        return (x_t - self.coef("sqrt_alpha_bars", t, x_t) * x0) / self.coef("sqrt_one_minus_alpha_bars", t, x_t)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``alpha_bar_t / (1 - alpha_bar_t)`` at ``(B,)`` timesteps -> ``(B,)``."""
        ab = self.alpha_bars.to(t.device)[t.long()]
        return ab / (1.0 - ab)

    def __repr__(self) -> str:
        return (f"NoiseSchedule(T={self.T}, beta[0]={self.betas[0].item():.3g}, "
                f"beta[-1]={self.betas[-1].item():.3g}, alpha_bar[-1]={self.alpha_bars[-1].item():.3g})")
