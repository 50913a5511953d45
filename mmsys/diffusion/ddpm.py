"""The unconditional DDPM of m4: the eps model, its config, its training loss, seeded sampling.

- :class:`EpsModel`: ``eps_theta(x_t, t)``, a :class:`~mmsys.diffusion.unet.UNet` run on
  space-to-depth patches (:func:`space_to_depth`).
- :func:`model_config` / :func:`build_model`: the checkpoint's ``model_config`` dict and the
  model built from it; the schedule is ``NoiseSchedule.make(**model_config["schedule"])``.
- :func:`eps_loss`: the DDPM objective (Ho et al. 2020, alg. 1 / eq. 14) with optional
  Min-SNR-gamma weights (Hang et al. 2023).
- :func:`sample_images`: ``n`` seeded images (uint8) through the one reverse loop
  (:func:`mmsys.diffusion.samplers.sample`).
- :func:`load_ddpm`: an m4 checkpoint -> (model, schedule, info), for the sampling CLI
  (``python -m apps.sample``).

Library use::

    model, schedule, info = load_ddpm("runs/m4/checkpoint.pt")
    images = sample_images(model, schedule, n=64, sampler="ddim", steps=50, seed=0)  # uint8 (64, 3, 32, 32)
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.split import to_uint8
from .samplers import make_sampler, sample, sample_generators
from .schedule import NoiseSchedule
from .unet import UNet, UNetConfig

KIND = "ddpm"  # checkpoint kind written by the m4 trainer


# ----------------------------------------------------------------------------- space-to-depth

def space_to_depth(x: torch.Tensor, p: int) -> torch.Tensor:
    """Fold ``p x p`` pixel blocks into channels: ``(B, C, H, W) -> (B, C p^2, H/p, W/p)``
    (``F.pixel_unshuffle``), keeping a channels_last input channels_last; ``p = 1``: ``x``."""
    if p == 1:
        return x
    fmt = torch.channels_last if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    return F.pixel_unshuffle(x, p).contiguous(memory_format=fmt)


def depth_to_space(h: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of :func:`space_to_depth`: ``(B, C p^2, H/p, W/p) -> (B, C, H, W)``."""
    return h if p == 1 else F.pixel_shuffle(h, p)


class EpsModel(nn.Module):
    """The noise predictor of an unconditional DDPM: a :class:`UNet`, optionally run on
    space-to-depth patches.

    ``patch = p > 1``: ``x (B, C, H, W)`` is folded into ``(B, C p^2, H/p, W/p)``, the U-Net
    predicts the folded noise and it is unfolded. The same receptive field for ~p^2 less
    convolution work (Hoogeboom et al. 2023, "simple diffusion"); the loss and samplers are
    unchanged (a bijective re-arrangement of pixels). ``patch = 1`` is the plain pixel-space U-Net.

    forward(x ``(B, C, H, W)``, t ``(B,)``) -> eps ``(B, C, H, W)``.
    Attributes: ``in_ch``, ``image_size`` (of the images, not of the folded U-Net input).
    """

    def __init__(self, unet: UNetConfig, patch: int = 1, in_ch: int = 3, image_size: int = 32):
        super().__init__()
        if image_size % patch or unet.in_ch != in_ch * patch * patch or unet.image_size != image_size // patch:
            raise ValueError(f"U-Net in_ch/image_size must be {in_ch * patch * patch}/{image_size // patch} "
                             f"for patch {patch} on {in_ch}x{image_size}x{image_size} images")
        self.patch, self.in_ch, self.image_size = patch, in_ch, image_size
        self.unet = UNet(unet)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return depth_to_space(self.unet(space_to_depth(x, self.patch), t), self.patch)

    def n_params(self) -> int:
        return self.unet.n_params()


def model_config(unet: UNetConfig | dict, schedule: dict, patch: int = 1, image_size: int = 32,
                 in_ch: int = 3) -> dict:
    """The checkpoint's ``model_config`` (plain dicts, tuples as lists): U-Net, patch, image
    geometry and schedule (``{"kind": "linear" | "cosine", "T": int}``, defaults linear / 1000).
    The U-Net's ``in_ch`` and ``image_size`` are derived from the patch."""
    u = asdict(unet) if isinstance(unet, UNetConfig) else dict(unet)
    u.update(in_ch=in_ch * patch * patch, image_size=image_size // patch)
    return {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in u.items()},
            "patch": int(patch), "image_size": int(image_size), "in_ch": int(in_ch),
            "schedule": {"kind": schedule.get("kind", "linear"), "T": int(schedule.get("T", 1000))}}


def build_model(mc: dict) -> EpsModel:
    """:class:`EpsModel` from a :func:`model_config` dict (lists back to tuples). Raises
    ValueError for keys :func:`model_config` does not write."""
    unknown = sorted(set(mc) - {"unet", "patch", "image_size", "in_ch", "schedule"})
    if unknown:
        raise ValueError(f"unknown model_config keys {unknown}: expected unet, patch, image_size, in_ch, schedule")
    u = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in mc["unet"].items()})
    return EpsModel(u, mc.get("patch", 1), mc.get("in_ch", 3), mc.get("image_size", u.image_size))


# ----------------------------------------------------------------------------- training

def eps_loss(model, x0: torch.Tensor, schedule: NoiseSchedule, snr_gamma: float | None = None,
             target: str = "eps"):
    """DDPM training objective (Ho et al. 2020, alg. 1; eq. 14, the "simple" loss):
    ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``, ``x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) eps`` (eq. 4),
    loss ``= w_t || eps - eps_theta(x_t, t) ||^2`` (mean over pixels, then over the batch).

    ``w_t = 1`` is L_simple. ``snr_gamma = g`` gives Min-SNR-gamma weights (Hang et al. 2023,
    eq. 9 for eps-prediction): ``w_t = min(SNR_t, g) / SNR_t``, ``SNR_t = a_bar_t / (1 - a_bar_t)``.
    They shrink the low-noise steps, whose error is mostly irreducible (there the added noise is
    as small as the images' own pixel noise: the eps-MSE at t = 10 stays ~0.67 on the world),
    so that their large, noisy gradients do not drown the steps that shape the image.

    ``target``: what the network regresses, ``"eps"`` (the above) or ``"x0"`` (the clean image;
    the samplers read the output as eps, so an x0-trained model samples badly: the grader's
    planted-bug test).

    Randomness comes from the global torch RNG (t, then eps), which the engine reseeds every
    step. x0: ``(B, C, H, W)`` in [-1, 1]. Returns ``(loss, {"mse": ...})``.
    """
    if target not in ("eps", "x0"):
        raise ValueError(f"target must be 'eps' or 'x0', got {target!r}")
    B = x0.shape[0]
    t = torch.randint(0, schedule.T, (B,), device=x0.device)
    noise = torch.randn(x0.shape, device=x0.device)
    x_t = schedule.q_sample(x0, t, noise)
    if x0.is_contiguous(memory_format=torch.channels_last):
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    pred = model(x_t, t).float()
    goal = x0 if target == "x0" else noise
    per = (pred - goal).square().flatten(1).mean(1)  # (B,)
    if snr_gamma is not None:
        snr = schedule.snr(t).float()
        per = per * snr.clamp(max=snr_gamma) / snr  # Min-SNR-gamma, Hang et al. 2023 eq. 9
    return per.mean(), {"mse": F.mse_loss(pred, goal).detach()}


# ----------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample_images(model: nn.Module, schedule: NoiseSchedule, n: int, sampler: str = "ddim",
                  steps: int | None = None, eta: float = 0.0, seed: int = 0, batch_size: int = 250,
                  bf16: bool = True, channels_last: bool = True, progress: bool = False,
                  clip_x0: bool = True) -> torch.Tensor:
    """Draw ``n`` images, ``batch_size`` at a time, through :func:`~mmsys.diffusion.samplers.sample`.

    Args:
        model: the eps predictor (:class:`EpsModel`, or any module with ``in_ch`` and
            ``image_size`` attributes), in eval mode.
        schedule: the schedule it was trained with.
        sampler, steps, eta, clip_x0: see :func:`~mmsys.diffusion.samplers.make_sampler`.
        seed: sample ``i`` depends only on ``(seed, i)`` (see :func:`sample_generators`).
        bf16: run the U-Net under bf16 autocast (the sampler arithmetic stays float32).
        channels_last: feed the U-Net channels_last tensors (faster convolutions on CPU).
    Returns:
        uint8 ``(n, C, H, W)``.
    """
    smp = make_sampler(schedule, sampler, steps, eta, clip_x0)
    device = next(model.parameters()).device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)

    def eps_fn(x, t):
        return model(x.contiguous(memory_format=fmt), t)

    images = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        out = sample(eps_fn, smp, (b, model.in_ch, model.image_size, model.image_size),
                     sample_generators(seed, start, b), device=device, bf16=bf16, progress=progress)
        images.append(to_uint8(out.float().cpu()))
    return torch.cat(images)


def load_ddpm(path: str | Path, device: str = "cpu", use_ema: bool = True):
    """Load an m4 checkpoint (for the sampling CLI; the grader reads checkpoints itself).

    Returns:
        ``(model (eval, no grad), schedule, info)``; info = ``{"step", "ema", "model_config"}``.
    Raises:
        mmsys.checkpoint.CheckpointError: missing, corrupt or not a DDPM checkpoint.
    """
    from ..checkpoint import CheckpointError, config_errors, load_checkpoint, load_into
    ck = load_checkpoint(path, expect_kind=KIND, required=("model_config",))
    mc = ck["model_config"]
    if not isinstance(mc, dict) or "unet" not in mc or "schedule" not in mc:
        raise CheckpointError(f"checkpoint {path} has no unet/schedule in model_config: train it with "
                              f"`python grader.py m4`")
    ema = use_ema and bool(ck.get("ema"))
    model = load_into(path, ck, build_model, use_ema=use_ema).to(device).eval().requires_grad_(False)
    with config_errors(path, "model_config['schedule']"):
        schedule = NoiseSchedule.make(**mc["schedule"])
    return model, schedule, {"step": ck.get("step"), "ema": ema, "model_config": mc}
