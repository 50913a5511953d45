"""Audio Spectrogram Transformer tower (Gong et al. 2021, "AST"), on log-mel features.

Data flow: log-mel ``(B, n_mels, frames)`` -> frames past each utterance's end zeroed, frames
cropped to ``max_frames`` and zero-padded to a multiple of the patch length -> non-overlapping
``patch_freq x patch_time`` patches, time-major (token ``t * F' + f`` covers mel bins
``f * p_f ...`` of frames ``t * p_t ...``) -> one linear patch embedding (AST's 16x16 conv with
stride 16, i.e. no overlap) -> plus learned positions on the 2-D (time, frequency) patch grid,
cropped to the patches present -> CLS token prepended -> pre-LN transformer
(:class:`mmsys.transformer.Transformer`) with a key padding mask on time patches that start past
the utterance's end -> CLS embedding and the patch token features (what a decoder cross-attends
to, with the same padding mask).

Because padded frames are zeroed first and padded patches are masked as keys, the CLS embedding
and the features of real patches do not depend on what lies past an utterance's end, nor on
what else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..transformer import Transformer
from ..vit import _init as vit_init  # trunc-normal(0.02) linears, unit LayerNorms


@dataclass
class AudioTowerConfig:
    """Patch grid and encoder size. The defaults: AST's 16 x 16 patches (no overlap) and a
    small encoder (about 3M parameters; AST itself is a DeiT-base, 87M)."""

    n_mels: int = 80  # the front end's mel bins (LogMelConfig.n_mels)
    patch_freq: int = 16  # p_f: mel bins per patch
    patch_time: int = 16  # p_t: frames per patch (160 ms at a 10 ms hop)
    max_frames: int = 1024  # longer inputs are cropped (10.24 s); sizes the position grid
    dim: int = 192  # token width D
    depth: int = 6  # transformer blocks
    n_heads: int = 4  # D / n_heads = 48 per head
    mlp_ratio: float = 4.0  # MLP hidden width / D
    dropout: float = 0.0  # in attention weights, after attention and in the MLP

    @property
    def freq_patches(self) -> int:
        return self.n_mels // self.patch_freq

    @property
    def time_patches(self) -> int:
        return self.max_frames // self.patch_time


@dataclass
class AudioTowerOutput:
    cls: torch.Tensor  # (B, D): the utterance embedding
    tokens: torch.Tensor  # (B, N, D): patch features, N = time patches * freq patches
    padding_mask: torch.Tensor  # (B, N) bool, True = padding patch (ignore it)


def patchify_spectrogram(x: torch.Tensor, p_f: int, p_t: int) -> torch.Tensor:
    """``(B, M, T)`` with ``M % p_f == T % p_t == 0`` -> ``(B, (T / p_t) * (M / p_f), p_f * p_t)``,
    time-major; each patch flattened as ``(p_f, p_t)``."""
    B, M, T = x.shape
    if M % p_f or T % p_t:
        raise ValueError(f"a {M} x {T} spectrogram does not split into {p_f} x {p_t} patches")
    x = x.reshape(B, M // p_f, p_f, T // p_t, p_t).permute(0, 3, 1, 2, 4)  # (B, T', M', p_f, p_t)
    return x.reshape(B, (T // p_t) * (M // p_f), p_f * p_t)


class AudioTower(nn.Module):
    """AST-style encoder: log-mel ``(B, n_mels, frames)`` -> :class:`AudioTowerOutput`."""

    def __init__(self, cfg: AudioTowerConfig = AudioTowerConfig()):
        super().__init__()
        if cfg.n_mels % cfg.patch_freq or cfg.max_frames % cfg.patch_time:
            raise ValueError(f"n_mels={cfg.n_mels} and max_frames={cfg.max_frames} must be multiples of "
                             f"the patch size {cfg.patch_freq} x {cfg.patch_time}")
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_freq * cfg.patch_time, cfg.dim)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.time_patches, cfg.freq_patches, cfg.dim) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02)
        self.encoder = Transformer(cfg.dim, cfg.depth, cfg.n_heads, cfg.mlp_ratio, dropout=cfg.dropout)
        self.apply(vit_init)

    def prepare(self, x: torch.Tensor, frame_lengths: torch.Tensor | None = None):
        """Crop, zero past the end and pad: ``(B, n_mels, frames)`` -> ``(B, n_mels, T' * p_t)``
        and the time-patch padding mask ``(B, T')`` (True = patch starts past the end)."""
        cfg = self.cfg
        if x.shape[1] != cfg.n_mels:
            raise ValueError(f"expected {cfg.n_mels} mel bins, got {x.shape[1]}")
        x = x[..., : cfg.max_frames]
        T = x.shape[-1]
        lengths = torch.full((len(x),), T, device=x.device) if frame_lengths is None else frame_lengths.clamp(max=T)
        lengths = lengths.to(x.device)
        x = x.masked_fill(torch.arange(T, device=x.device)[None, None, :] >= lengths[:, None, None], 0.0)
        n_t = math.ceil(T / cfg.patch_time)
        x = nn.functional.pad(x, (0, n_t * cfg.patch_time - T))
        starts = torch.arange(n_t, device=x.device) * cfg.patch_time
        return x, starts[None, :] >= lengths[:, None]

    def forward(self, x: torch.Tensor, frame_lengths: torch.Tensor | None = None) -> AudioTowerOutput:
        """Log-mel features ``(B, n_mels, frames)`` and their frame counts ``(B,)`` (default all
        frames, e.g. :func:`mmsys.audio.features.frame_lengths`) -> CLS ``(B, D)``, patch tokens
        ``(B, N, D)`` and their padding mask ``(B, N)``, N = ceil(min(frames, max_frames) / p_t)
        * (n_mels / p_f)."""
        cfg = self.cfg
        x, time_pad = self.prepare(x, frame_lengths)
        h = self.patch_embed(patchify_spectrogram(x, cfg.patch_freq, cfg.patch_time))  # (B, N, D)
        n_t = time_pad.shape[1]
        h = h + self.pos_embed[:, :n_t].reshape(1, n_t * cfg.freq_patches, cfg.dim)
        pad = time_pad.repeat_interleave(cfg.freq_patches, dim=1)  # (B, N)
        h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], dim=1)
        key_pad = torch.cat([torch.zeros_like(pad[:, :1]), pad], dim=1)
        out = self.encoder(h, padding_mask=key_pad).x
        return AudioTowerOutput(out[:, 0], out[:, 1:], pad)
