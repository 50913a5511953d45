"""1-D waveforms: resampling, int16 quantisation and padding into a batch.

Every waveform in mmsys is a float32 1-D tensor in [-1, 1] at :data:`SAMPLE_RATE` (16 kHz).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.signal import resample_poly

SAMPLE_RATE = 16_000


def resample(x: np.ndarray, rate_from: int, rate_to: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling of a 1-D signal (scipy's ``resample_poly``: up by L, FIR low-pass
    (Kaiser window), down by M, with L / M = rate_to / rate_from in lowest terms). ``(T,)`` ->
    ``(round(T * rate_to / rate_from),)`` float64; unchanged when the rates are equal."""
    x = np.asarray(x, dtype=np.float64)
    if rate_from == rate_to:
        return x
    g = math.gcd(int(rate_from), int(rate_to))
    return resample_poly(x, rate_to // g, rate_from // g)


def quantise(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Float samples -> int16 ``(T,)`` (clipped to [-1, 1], scaled by 32767, rounded): how the
    caches store waveforms (half the bytes of float32, and what espeak-ng and FLAC hold anyway)."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float64))
    return t.clamp(-1.0, 1.0).mul(32767.0).round().to(torch.int16)


def dequantise(x: torch.Tensor) -> torch.Tensor:
    """int16 ``(T,)`` -> float32 ``(T,)`` in [-1, 1] (the inverse scale of :func:`quantise`)."""
    return x.to(torch.float32) / 32767.0


def pad(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of ``B`` 1-D waveforms -> ``(B, T_max)`` float32, zero-padded at the end, and
    their lengths ``(B,)`` int64."""
    lengths = torch.tensor([len(w) for w in waves], dtype=torch.int64)
    out = torch.zeros(len(waves), int(lengths.max()) if len(waves) else 0, dtype=torch.float32)
    for i, w in enumerate(waves):
        out[i, : len(w)] = w
    return out, lengths
