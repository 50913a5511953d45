"""The noise-prediction U-Net ``eps_theta(x_t, t[, text])`` of DDPM / text-to-image diffusion.

The architecture follows Ho et al. 2020 (appendix B, a PixelCNN++-style U-Net) with the
improvements of Nichol & Dhariwal 2021 / Dhariwal & Nichol 2021:

- sinusoidal timestep embedding (Vaswani et al. 2017 positional encoding of ``t``) -> MLP;
- residual blocks whose second GroupNorm is modulated by the time embedding, "adaptive group
  normalisation" ``AdaGN(h, e) = GN(h) * (1 + scale(e)) + shift(e)`` (Dhariwal & Nichol 2021,
  sec. 3); the output conv of every residual block is zero-initialised, so each block starts
  as the identity;
- self-attention at low resolutions and, when ``context_dim`` is set, cross-attention from
  pixels to text tokens (Rombach et al. 2022, eq. 3), both with :class:`mmsys.attention.MultiHeadAttention`;
- encoder feature maps are concatenated into the decoder (the U-Net skips).

Any input size works (16, 28, 32, 64 ...): downsampling is a stride-2 conv (ceil) and
upsampling interpolates to the exact size of the matching skip. channels_last and CPU bf16
autocast are supported (see ``benchmarks/bench_unet.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import MultiHeadAttention


@dataclass
class UNetConfig:
    """U-Net hyper-parameters. Defaults: a small CPU-trainable model for 32x32 images.

    Attributes:
        in_ch: image channels (3 RGB, 1 grey).
        base: channels of the first level; level i has ``base * channel_mults[i]``.
        channel_mults: one entry per resolution level (each level after the first halves H, W).
        n_res: residual blocks per level in the encoder (the decoder has ``n_res + 1``).
        attn_resolutions: feature-map sizes (relative to ``image_size``) that get attention.
        dropout: dropout inside residual blocks.
        groups: GroupNorm groups (must divide every channel count).
        time_dim: width of the time embedding (default ``4 * base``).
        context_dim: width of the text tokens; enables cross-attention at attention levels.
        n_heads: attention heads.
        image_size: the nominal training size, used only to place attention levels.
    """

    in_ch: int = 3
    base: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    n_res: int = 2
    attn_resolutions: tuple[int, ...] = (8,)
    dropout: float = 0.1
    groups: int = 8
    time_dim: int | None = None
    context_dim: int | None = None
    n_heads: int = 4
    image_size: int = 32


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    ``emb[:, i] = cos(t * w_i)`` for the first half and ``sin(t * w_i)`` for the second, with
    ``w_i = max_period^(-i / (dim / 2))``. t: ``(B,)`` long or float -> ``(B, dim)`` float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (used on output layers so blocks start as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """``x + conv(drop(SiLU(AdaGN(conv(SiLU(GN(x))), e))))`` with a 1x1 skip when widths differ.

    x: ``(B, C_in, H, W)``; e: ``(B, time_dim)`` -> ``(B, C_out, H, W)``.
    """

    def __init__(self, c_in: int, c_out: int, time_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(time_dim, 2 * c_out)  # -> (scale, shift) of AdaGN
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(e))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift  # adaptive group norm
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the ``H*W`` positions, then optional cross-attention to text tokens.

    x: ``(B, C, H, W)``; context: ``(B, L, Dc)``; context_padding_mask: ``(B, L)`` bool, True =
    pad. A sample whose context is entirely padding (an "empty caption") gets no cross-attention
    update at all, instead of the NaN a softmax over no keys would give.
    """

    def __init__(self, ch: int, n_heads: int, groups: int, context_dim: int | None = None):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.attn = MultiHeadAttention(ch, n_heads)
        zero_init(self.attn.out)
        self.cross = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(ch)
            self.cross = MultiHeadAttention(ch, n_heads, context_dim=context_dim)
            zero_init(self.cross.out)

    def forward(self, x, context=None, context_padding_mask=None):
        B, C, H, W = x.shape
        # (B, C, H, W) -> (B, HW, C); a free view when x is channels_last
        seq = x.permute(0, 2, 3, 1).reshape(B, H * W, C)
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        seq = seq + self.attn(h)[0]
        if self.cross is not None:
            if context is None:
                raise ValueError("this U-Net was built with context_dim and needs a context")
            mask, empty = context_padding_mask, None
            if mask is not None:
                empty = mask.all(dim=1)  # (B,) samples with no real token
                mask = mask & ~empty[:, None]  # let them attend (harmlessly) to avoid NaN
            h = self.cross(self.norm_cross(seq), context.to(seq.dtype), key_padding_mask=mask)[0]
            if empty is not None:
                h = h.masked_fill(empty[:, None, None], 0.0)
            seq = seq + h
        return seq.reshape(B, H, W, C).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Stride-2 3x3 conv: ``(B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))``."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to ``size`` (the matching skip's H, W), then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNet(nn.Module):
    """Noise predictor ``eps_theta(x_t, t, context)``.

    forward(x ``(B, C, H, W)``, t ``(B,)`` long or float, context ``(B, L, Dc)`` or None,
    context_padding_mask ``(B, L)`` bool True = pad, or None) -> eps ``(B, C, H, W)``.
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or UNetConfig()
        tdim = cfg.time_dim or 4 * cfg.base
        g, drop, heads, ctx = cfg.groups, cfg.dropout, cfg.n_heads, cfg.context_dim
        self.time_mlp = nn.Sequential(nn.Linear(cfg.base, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.conv_in = nn.Conv2d(cfg.in_ch, cfg.base, 3, padding=1)

        def attn(ch, level):
            return AttentionBlock(ch, heads, g, ctx) if cfg.image_size >> level in cfg.attn_resolutions else None

        # encoder: per level n_res blocks (+ attention), then downsample (not after the last)
        self.down = nn.ModuleList()
        skip_chs, ch = [cfg.base], cfg.base
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.n_res):
                self.down.append(nn.ModuleList([ResBlock(ch, cfg.base * mult, tdim, g, drop),
                                                attn(cfg.base * mult, level)]))
                ch = cfg.base * mult
                skip_chs.append(ch)
            if level < len(cfg.channel_mults) - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)

        # middle: res, attention (always: the lowest resolution), res
        self.mid1 = ResBlock(ch, ch, tdim, g, drop)
        self.mid_attn = AttentionBlock(ch, heads, g, ctx)
        self.mid2 = ResBlock(ch, ch, tdim, g, drop)

        # decoder: per level n_res + 1 blocks, each eating one skip, then upsample
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.n_res + 1):
                self.up.append(nn.ModuleList([ResBlock(ch + skip_chs.pop(), cfg.base * mult, tdim, g, drop),
                                              attn(cfg.base * mult, level)]))
                ch = cfg.base * mult
            if level > 0:
                self.up.append(Upsample(ch))
        assert not skip_chs

        self.norm_out = nn.GroupNorm(g, ch)
        self.conv_out = zero_init(nn.Conv2d(ch, cfg.in_ch, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                context_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        e = self.time_mlp(timestep_embedding(t, self.config.base))
        kw = dict(context=context, context_padding_mask=context_padding_mask)

        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, Downsample):
                h = layer(h)
            else:
                res, at = layer
                h = res(h, e)
                if at is not None:
                    h = at(h, **kw)
            skips.append(h)

        h = self.mid2(self.mid_attn(self.mid1(h, e), **kw), e)

        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h, skips[-1].shape[-2:])
            else:
                res, at = layer
                h = res(torch.cat([h, skips.pop()], dim=1), e)
                if at is not None:
                    h = at(h, **kw)
        return self.conv_out(F.silu(self.norm_out(h)))

    def n_params(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
