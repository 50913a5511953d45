"""Sample images from a trained unconditional DDPM: ``python -m mmsys.sample``.

    python -m mmsys.sample --sampler ddim --steps 50 -n 64 -o grid.png
    python -m mmsys.sample --checkpoint runs/m4/checkpoint.pt --sampler ddpm -n 16 --seed 3 -o ddpm.png
    python -m mmsys.sample --sampler ddim --steps 20 --eta 0.5 -n 64 -o grid.png --force

The checkpoint defaults to ``runs/m4/checkpoint.pt`` (written by ``python grader.py m4``); the
EMA weights are used when the checkpoint has them. ``--sampler ddpm`` runs ancestral sampling
over all T steps (``--steps`` must be omitted or equal T); ``--sampler ddim`` uses ``--steps``
(default 50) evenly spaced steps and stochasticity ``--eta`` (0 = deterministic). The output is
one PNG grid (``--nrow`` images per row). An existing output file is never overwritten unless
``--force`` is given (exit code 2 otherwise); ``--save-tensor PATH`` also writes the uint8
images ``(n, 3, H, W)`` with ``torch.save``.

Seeding: sample ``i`` of a run with ``--seed s`` is drawn from its own generator seeded by
``(s, i)``, so it is the same image whatever ``-n`` or ``--batch-size`` (up to kernel round-off):
``-n 8`` gives the first 8 images of ``-n 64``.

Library use (the milestone and tests call these)::

    model, schedule, info = load_ddpm("runs/m4/checkpoint.pt")
    images = generate(model, schedule, n=64, sampler="ddim", steps=50, seed=0)  # uint8 (64, 3, 32, 32)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from apps.cli import fail, missing_checkpoint, would_overwrite
from .diffusion.samplers import DDIMSampler, DDPMSampler, sample
from .diffusion.schedule import NoiseSchedule
from .diffusion.unet import UNet, UNetConfig

DEFAULT_CHECKPOINT = Path("runs/m4/checkpoint.pt")
KIND = "ddpm"  # checkpoint kind written by the m4 trainer


# ----------------------------------------------------------------------------- model and schedule

def build_schedule(spec: dict) -> NoiseSchedule:
    """``{"kind": "linear" | "cosine", "T": int}`` -> :class:`NoiseSchedule`."""
    kind, T = spec.get("kind", "linear"), int(spec.get("T", 1000))
    if kind == "linear":
        return NoiseSchedule.linear(T)
    if kind == "cosine":
        return NoiseSchedule.cosine(T)
    raise ValueError(f"unknown schedule kind {kind!r}: 'linear' or 'cosine'")


class EpsModel(nn.Module):
    """The noise predictor of an unconditional DDPM: a :class:`UNet`, optionally run on
    space-to-depth patches.

    ``patch = p > 1``: ``x (B, C, H, W)`` is folded into ``(B, C p^2, H/p, W/p)``
    (``F.pixel_unshuffle``), the U-Net predicts the folded noise and ``F.pixel_shuffle``
    unfolds it. The same receptive field for ~p^2 less convolution work (Hoogeboom et al. 2023,
    "simple diffusion"); the loss and samplers are unchanged (a bijective re-arrangement of
    pixels). ``patch = 1`` is the plain pixel-space U-Net.

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
        if self.patch == 1:
            return self.unet(x, t)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.ndim == 4 \
            else torch.contiguous_format
        h = F.pixel_unshuffle(x, self.patch).contiguous(memory_format=fmt)
        return F.pixel_shuffle(self.unet(h, t), self.patch)

    def n_params(self) -> int:
        return self.unet.n_params()


def model_config(unet: UNetConfig | dict, schedule: dict, patch: int = 1, image_size: int = 32,
                 in_ch: int = 3) -> dict:
    """The checkpoint's ``model_config`` (plain dicts, tuples as lists): U-Net, patch, image
    geometry and schedule. The U-Net's ``in_ch`` and ``image_size`` are derived from the patch."""
    from dataclasses import asdict
    u = asdict(unet) if isinstance(unet, UNetConfig) else dict(unet)
    u.update(in_ch=in_ch * patch * patch, image_size=image_size // patch)
    return {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in u.items()},
            "patch": int(patch), "image_size": int(image_size), "in_ch": int(in_ch),
            "schedule": {"kind": schedule.get("kind", "linear"), "T": int(schedule.get("T", 1000))}}


def build_model(mc: dict) -> EpsModel:
    """:class:`EpsModel` from a :func:`model_config` dict (lists back to tuples)."""
    u = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in mc["unet"].items()})
    return EpsModel(u, mc.get("patch", 1), mc.get("in_ch", 3), mc.get("image_size", u.image_size))


def load_ddpm(path: str | Path = DEFAULT_CHECKPOINT, device: str = "cpu", use_ema: bool = True):
    """Load an m4 checkpoint.

    Returns:
        ``(model (eval, no grad), schedule, info)``; info = ``{"step", "ema", "model_config"}``.
    Raises:
        mmsys.checkpoint.CheckpointError: missing, corrupt or not a DDPM checkpoint.
    """
    from .checkpoint import CheckpointError, load_checkpoint
    ck = load_checkpoint(path, expect_kind=KIND, required=("model_config",))
    mc = ck["model_config"]
    if "unet" not in mc or "schedule" not in mc:
        raise CheckpointError(f"checkpoint {path} has no unet/schedule in model_config: train it with "
                              f"`python grader.py m4`")
    model = build_model(mc)
    ema = use_ema and bool(ck.get("ema"))
    model.load_state_dict(ck["ema"]["module"] if ema else ck["model"])
    model = model.to(device).eval().requires_grad_(False)
    return model, build_schedule(mc["schedule"]), {"step": ck.get("step"), "ema": ema, "model_config": mc}


# ----------------------------------------------------------------------------- sampling

def make_sampler(schedule: NoiseSchedule, name: str, steps: int | None = None, clip_x0: bool = True):
    """``"ddpm"`` (all T steps; ``steps`` None or T, small posterior variance) or ``"ddim"``
    (``steps``, default 50). ``clip_x0``: both samplers clip the predicted x_0 to [-1, 1] at every
    step (Ho et al.'s code; diffusers' default), which keeps an imperfect model's early, highly
    amplified x_0 estimates (1 / sqrt(alpha_bar_t) ~ 150 at t = T-1) from saturating images."""
    if name == "ddpm":
        if steps not in (None, schedule.T):
            raise ValueError(f"DDPM samples with all T={schedule.T} steps (got --steps {steps}); "
                             f"use --sampler ddim for fewer steps")
        return DDPMSampler(schedule, clip_x0=clip_x0)
    if name == "ddim":
        s = DDIMSampler(schedule, clip_x0=clip_x0)
        s.set_timesteps(50 if steps is None else steps)
        return s
    raise ValueError(f"unknown sampler {name!r}: 'ddpm' or 'ddim'")


def sample_generators(seed: int, start: int, n: int) -> list[torch.Generator]:
    """One generator per sample: sample ``i`` is seeded by ``(seed, i)`` only."""
    return [torch.Generator().manual_seed((seed & 0xFFFFFFFF) * 1_000_003 + i) for i in range(start, start + n)]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float ``(B, C, H, W)`` in [-1, 1] (clamped) -> uint8."""
    return x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


@torch.no_grad()
def generate(model: nn.Module, schedule: NoiseSchedule, n: int, sampler: str = "ddim", steps: int | None = None,
             eta: float = 0.0, seed: int = 0, batch_size: int = 250, bf16: bool = True,
             channels_last: bool = True, progress: bool = True, return_trajectory: bool = False,
             clip_x0: bool = True):
    """Draw ``n`` images, ``batch_size`` at a time.

    Args:
        model: the eps predictor (:class:`EpsModel`, or any module with ``in_ch`` and
            ``image_size`` attributes or a U-Net ``config``), in eval mode.
        schedule: the schedule it was trained with.
        sampler: ``"ddpm"`` (all T steps; ``steps`` must be None or T) or ``"ddim"``.
        steps: DDIM steps (default 50); DDPM: None or T. eta: DDIM stochasticity (0 = deterministic).
        seed: sample ``i`` depends only on ``(seed, i)`` (see :func:`sample_generators`).
        bf16: run the U-Net under bf16 autocast (the sampler arithmetic stays float32).
        channels_last: feed the U-Net channels_last tensors (faster convolutions on CPU).
        return_trajectory: also return ``[x_T, ..., x_0]``, each float ``(n, C, H, W)``.
        clip_x0: clip predicted x_0 to [-1, 1] at every step (see :func:`make_sampler`).
    Returns:
        uint8 ``(n, C, H, W)`` (and the trajectory list when asked).
    """
    smp = make_sampler(schedule, sampler, steps, clip_x0)
    cfg = getattr(model, "config", model)
    device = next(model.parameters()).device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)

    def eps_fn(x, t):
        return model(x.contiguous(memory_format=fmt), t)

    images, trajs = [], []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        gens = sample_generators(seed, start, b)
        out = sample(eps_fn, (b, cfg.in_ch, cfg.image_size, cfg.image_size), smp, eta=eta, generator=gens,
                     progress=progress, return_trajectory=return_trajectory, device=device, bf16=bf16)
        if return_trajectory:
            out, traj = out
            trajs.append(traj)
        images.append(to_uint8(out.float().cpu()))
    images = torch.cat(images)
    if return_trajectory:
        return images, [torch.cat([tr[k] for tr in trajs]) for k in range(len(trajs[0]))]
    return images


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, padding: int = 2) -> Path:
    """uint8 ``(n, 3, H, W)`` -> one PNG grid (``nrow`` per row) at ``path``."""
    from PIL import Image
    from torchvision.utils import make_grid
    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=255)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()).save(path, format="PNG")
    return path


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmsys.sample", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help=f"default {DEFAULT_CHECKPOINT}")
    ap.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50); DDPM always uses all T")
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 deterministic, 1 ~ DDPM)")
    ap.add_argument("-n", type=int, default=64, help="number of images (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", default="samples.png", help="PNG grid to write (default samples.png)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output file")
    ap.add_argument("--nrow", type=int, default=8, help="images per grid row")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--save-tensor", default=None, help="also torch.save the uint8 images here")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)

    ckpt, out = Path(a.checkpoint), Path(a.output)
    problem = (missing_checkpoint(ckpt, "DDPM", "m4") or ("-n must be at least 1" if a.n < 1 else None)
               or would_overwrite([out, a.save_tensor], a.force))
    if problem:
        return fail(problem)
    if a.eta < 0 or (a.sampler == "ddpm" and a.eta != 0):
        return fail("--eta must be >= 0, and only applies to --sampler ddim")
    from .checkpoint import CheckpointError
    try:
        model, schedule, info = load_ddpm(ckpt, a.device)
        make_sampler(schedule, a.sampler, a.steps)  # validate --steps before any work
    except (CheckpointError, ValueError) as e:
        return fail(str(e))
    t0 = time.perf_counter()
    images = generate(model, schedule, a.n, a.sampler, a.steps, a.eta, a.seed, a.batch_size, bf16=not a.fp32,
                      progress=not a.no_progress)
    dt = time.perf_counter() - t0
    save_grid(images, out, a.nrow)
    if a.save_tensor:
        torch.save(images, a.save_tensor)
    n_steps = schedule.T if a.sampler == "ddpm" else (a.steps or 50)
    print(f"wrote {out}: {a.n} images, {a.sampler} {n_steps} steps (T={schedule.T}), eta {a.eta}, seed {a.seed}, "
          f"EMA {'on' if info['ema'] else 'off'}, {dt:.1f} s ({dt / a.n:.3f} s/image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
