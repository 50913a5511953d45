"""The log-mel front end: waveforms ``(B, T)`` -> log-mel spectrograms ``(B, n_mels, frames)``.

Data flow: short-time Fourier transform with a periodic Hann window (25 ms frames every 10 ms at
16 kHz; frames centred, the signal zero-padded by n_fft / 2 at both ends) -> power spectrum
``|X|^2`` -> triangular mel filterbank (written here, :func:`mel_filterbank`) -> natural log
with a floor, ``log(max(mel, 1e-10))`` -> optional per-utterance normalisation (each mel bin to
zero mean, unit variance over the utterance's frames, cepstral mean and variance normalisation).

The mel scale is Slaney's (Auditory Toolbox; linear below 1 kHz, logarithmic above) with Slaney
area normalisation by default, librosa's default; ``htk=True`` gives the HTK scale
``2595 log10(1 + f / 700)``. tests/test_audio_features.py checks both the filterbank and the
power mel spectrogram against librosa.

Zero padding (not reflection) at the edges means that frame ``t < 1 + L // hop`` of an
utterance of ``L`` samples is the same alone or zero-padded in a batch; :func:`frame_lengths`
gives those counts and the normalisation uses only them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .waves import SAMPLE_RATE


@dataclass(frozen=True)
class LogMelConfig:
    sample_rate: int = SAMPLE_RATE
    n_fft: int = 400  # 25 ms
    hop: int = 160  # 10 ms
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8000.0
    htk: bool = False  # mel scale: Slaney (False) or HTK (True)
    slaney_norm: bool = True  # scale each triangle to unit area (2 / bandwidth in Hz)
    floor: float = 1e-10
    normalize: bool = True  # per-utterance mean / std of each mel bin over time


# ----------------------------------------------------------------------------- mel scale

_F_SP = 200.0 / 3  # Slaney: Hz per mel below the break
_BREAK_HZ = 1000.0
_BREAK_MEL = _BREAK_HZ / _F_SP  # 15 mels
_LOGSTEP = math.log(6.4) / 27.0  # Slaney: log-spaced above 1 kHz


def hz_to_mel(f: torch.Tensor, htk: bool = False) -> torch.Tensor:
    """Frequencies (Hz) -> mels, element-wise (HTK, or Slaney's piecewise linear/log scale)."""
    if htk:
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    return torch.where(f >= _BREAK_HZ, _BREAK_MEL + torch.log(f.clamp(min=_BREAK_HZ) / _BREAK_HZ) / _LOGSTEP,
                       f / _F_SP)


def mel_to_hz(m: torch.Tensor, htk: bool = False) -> torch.Tensor:
    """Mels -> frequencies (Hz), element-wise; the inverse of :func:`hz_to_mel`."""
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    return torch.where(m >= _BREAK_MEL, _BREAK_HZ * torch.exp(_LOGSTEP * (m - _BREAK_MEL)), m * _F_SP)


def mel_filterbank(cfg: LogMelConfig = LogMelConfig()) -> torch.Tensor:
    """Triangular filters ``(n_mels, n_fft // 2 + 1)`` float32 (computed in float64).

    Filter m rises linearly from centre m - 1 to centre m and falls to centre m + 1, where the
    n_mels + 2 edge frequencies are equally spaced on the mel scale from f_min to f_max, and is
    evaluated at the FFT bin frequencies ``k * sample_rate / n_fft``."""
    bins = torch.linspace(0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1, dtype=torch.float64)
    lo, hi = hz_to_mel(torch.tensor([cfg.f_min, cfg.f_max], dtype=torch.float64), cfg.htk)
    edges = mel_to_hz(torch.linspace(float(lo), float(hi), cfg.n_mels + 2, dtype=torch.float64), cfg.htk)
    width = edges.diff()  # (n_mels + 1,)
    rise = (bins[None, :] - edges[:-2, None]) / width[:-1, None]
    fall = (edges[2:, None] - bins[None, :]) / width[1:, None]
    fb = torch.minimum(rise, fall).clamp(min=0.0)
    if cfg.slaney_norm:
        fb = fb * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return fb.float()


# ----------------------------------------------------------------------------- front end

def frame_lengths(lengths: torch.Tensor, hop: int = LogMelConfig.hop) -> torch.Tensor:
    """Samples ``(B,)`` -> frames ``(B,)`` of a centred STFT: ``1 + L // hop``."""
    return 1 + torch.div(lengths, hop, rounding_mode="floor")


def frame_padding_mask(lengths: torch.Tensor, n_frames: int, hop: int = LogMelConfig.hop) -> torch.Tensor:
    """``(B, n_frames)`` bool, True where a frame lies past the end of its utterance."""
    return torch.arange(n_frames, device=lengths.device)[None, :] >= frame_lengths(lengths, hop)[:, None]


class LogMel(nn.Module):
    """Batched log-mel spectrograms; the window and filterbank are (non-persistent) buffers."""

    def __init__(self, cfg: LogMelConfig = LogMelConfig()):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.n_fft, periodic=True), persistent=False)
        self.register_buffer("fb", mel_filterbank(cfg), persistent=False)

    def power_mel(self, waves: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` float -> mel power ``(B, n_mels, 1 + T // hop)`` (before the log)."""
        spec = torch.stft(waves, self.cfg.n_fft, self.cfg.hop, window=self.window, center=True,
                          pad_mode="constant", return_complex=True)  # (B, n_fft // 2 + 1, frames)
        return self.fb @ spec.abs().pow(2)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T)`` waveforms (zero-padded; ``lengths`` ``(B,)`` samples, default all T) ->
        ``(B, n_mels, 1 + T // hop)`` log-mel features; frames past an utterance's end are 0
        when normalising."""
        x = self.power_mel(waves).clamp(min=self.cfg.floor).log()
        if not self.cfg.normalize:
            return x
        if lengths is None:
            lengths = torch.full((len(waves),), waves.shape[-1], dtype=torch.long, device=waves.device)
        valid = (~frame_padding_mask(lengths, x.shape[-1], self.cfg.hop))[:, None, :].to(x.dtype)
        count = valid.sum(-1, keepdim=True)
        mean = (x * valid).sum(-1, keepdim=True) / count
        var = ((x - mean) ** 2 * valid).sum(-1, keepdim=True) / count
        return (x - mean) / (var + 1e-5).sqrt() * valid
