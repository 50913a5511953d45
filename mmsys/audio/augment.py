"""SpecAugment's frequency and time masking (Park et al. 2019, sec. 2), seeded.

Per utterance, ``freq_masks`` times: a width f ~ U{0, ..., F} and a start f0 ~ U{0, ..., n_mels
- f}; mel bins [f0, f0 + f) are set to ``value``. ``time_masks`` times: a width t ~ U{0, ...,
min(T, floor(p * L))} with L the utterance's frame count (the paper's upper bound p on the
masked share), a start t0 ~ U{0, ..., L - t}; frames [t0, t0 + t) are set to ``value``. Masks
may overlap. Time warping (the paper's third, least effective policy) is not done.

Defaults: the LibriSpeech "LD" policy's frequency masks (F = 27, two masks), and two time masks
of at most 40 frames and a fifth of the utterance (our utterances are 2-3 s, shorter than
LibriSpeech's, for which the LD policy uses T = 100, p = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpecAugmentConfig:
    freq_masks: int = 2  # m_F
    freq_width: int = 27  # F
    time_masks: int = 2  # m_T
    time_width: int = 40  # T
    time_ratio: float = 0.2  # p: a time mask covers at most this share of the utterance
    value: float = 0.0  # what masked cells become (0 = the mean of normalised features)


def _bands(n: int, count: int, max_width: torch.Tensor, extent: torch.Tensor, size: int,
           g: torch.Generator) -> torch.Tensor:
    """``(n, size)`` bool: per row the union of ``count`` bands, each of width ~ U{0..max_width}
    and start ~ U{0..extent - width} (``max_width``, ``extent``: ``(n,)`` long)."""
    pos = torch.arange(size)[None, :]
    out = torch.zeros(n, size, dtype=torch.bool)
    for _ in range(count):
        width = (torch.rand(n, generator=g) * (max_width + 1)).long().clamp(max=max_width)
        start = (torch.rand(n, generator=g) * (extent - width + 1)).long().clamp(max=extent - width)
        out |= (pos >= start[:, None]) & (pos < (start + width)[:, None])
    return out


def spec_augment_masks(n: int, n_mels: int, n_frames: int, cfg: SpecAugmentConfig, g: torch.Generator,
                       frame_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the masks of ``n`` utterances: ``(freq (n, n_mels), time (n, n_frames))`` bool, True
    = masked. Time masks fall inside each utterance's ``frame_lengths`` ``(n,)`` (default all)."""
    lengths = torch.full((n,), n_frames) if frame_lengths is None else frame_lengths.cpu().long()
    freq = _bands(n, cfg.freq_masks, torch.full((n,), min(cfg.freq_width, n_mels)), torch.full((n,), n_mels),
                  n_mels, g)
    t_max = torch.minimum(torch.full((n,), cfg.time_width), (cfg.time_ratio * lengths).floor().long())
    time = _bands(n, cfg.time_masks, t_max, lengths, n_frames, g)
    return freq, time


def spec_augment(x: torch.Tensor, g: torch.Generator, cfg: SpecAugmentConfig = SpecAugmentConfig(),
                 frame_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Masked copy of features ``(B, n_mels, frames)``; the same generator state gives the same
    masks (drawn on the CPU whatever ``x``'s device)."""
    B, M, T = x.shape
    freq, time = spec_augment_masks(B, M, T, cfg, g, frame_lengths)
    mask = (freq[:, :, None] | time[:, None, :]).to(x.device)
    return x.masked_fill(mask, cfg.value)
