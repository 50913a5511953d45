"""m6 front end: the log-mel features against librosa, batching with padding, SpecAugment's
masks (widths, counts, placement, determinism). Everything goes through the m6 seam (the
seam is milestones/adapters.py, so ``--impl`` tests the implementation's front end)."""

import numpy as np
import pytest
import torch

from eval.reference.audio.waves import pad  # the grader's batching of its own waveforms
from milestones.adapters import CANDIDATE as impl

librosa = pytest.importorskip("librosa", reason="librosa is in the test extra: pip install -e '.[test]'")
pytestmark = [pytest.mark.m6, pytest.mark.usefixtures("one_thread")]


def LogMelConfig(**kw) -> dict:
    """A front-end config dict: the implementation's defaults with ``kw`` changed."""
    return {**vars(impl.module("audio.features").LogMelConfig()), **kw}


def SpecAugmentConfig(**kw) -> dict:
    return {**vars(impl.module("audio.augment").SpecAugmentConfig()), **kw}


def log_mel(cfg: dict, waves, lengths=None, power=False):
    return impl.audio_log_mel(cfg, waves, lengths, power)


def spec_augment_masks(*args):
    return impl.module("audio.augment").spec_augment_masks(*args[:3], impl.module("audio.augment").SpecAugmentConfig(**args[3]), *args[4:])


def hz_to_mel(f, htk=False):
    return impl.module("audio.features").hz_to_mel(f, htk)


def mel_to_hz(m, htk=False):
    return impl.module("audio.features").mel_to_hz(m, htk)


def frame_lengths(lengths):
    return impl.audio_frame_lengths(lengths, 160)


def signal(n: int = 3, length: int = 12_345, seed: int = 0) -> torch.Tensor:
    """(n, length): a 440 Hz tone, a chirp-like sum of tones and white noise, at 16 kHz."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / 16_000
    tone = torch.sin(2 * torch.pi * 440 * t)
    return 0.5 * tone + 0.2 * torch.sin(2 * torch.pi * (300 + 2000 * t) * t) + 0.1 * torch.randn(n, length, generator=g)


@pytest.mark.integration
@pytest.mark.parametrize("htk", [False, True])
@pytest.mark.parametrize("slaney_norm", [True, False])
def test_filterbank_matches_librosa(htk, slaney_norm):
    cfg = LogMelConfig(htk=htk, slaney_norm=slaney_norm)
    ours = impl.audio_mel_filterbank(cfg).double().numpy()
    ref = librosa.filters.mel(sr=16_000, n_fft=400, n_mels=80, fmin=0.0, fmax=8000.0, htk=htk,
                              norm="slaney" if slaney_norm else None, dtype=np.float64)
    assert ours.shape == ref.shape == (80, 201)
    assert np.abs(ours - ref).max() <= 1e-7 * np.abs(ref).max()  # measured 3.5e-8 (float32 rounding)


@pytest.mark.parametrize("htk", [False, True])
def test_mel_scale_round_trip(htk):
    f = torch.linspace(0, 8000, 101, dtype=torch.float64)
    assert torch.allclose(mel_to_hz(hz_to_mel(f, htk), htk), f, atol=1e-6)
    if not htk:  # Slaney: linear below 1 kHz, 15 mels at 1 kHz, log-spaced above
        assert float(hz_to_mel(torch.tensor(1000.0))) == pytest.approx(15.0)
        assert float(hz_to_mel(torch.tensor(500.0))) == pytest.approx(7.5)


@pytest.mark.integration
@pytest.mark.parametrize("htk", [False, True])
def test_power_mel_matches_librosa(htk):
    x = signal()
    ours = log_mel(LogMelConfig(htk=htk), x, power=True).numpy()
    ref = librosa.feature.melspectrogram(y=x.numpy(), sr=16_000, n_fft=400, hop_length=160, win_length=400,
                                         window="hann", center=True, pad_mode="constant", power=2.0,
                                         n_mels=80, fmin=0.0, fmax=8000.0, htk=htk, norm="slaney")
    assert ours.shape == ref.shape == (3, 80, 1 + 12_345 // 160)
    # measured: relative Frobenius error 1.6e-7, largest error 4.4e-7 of the peak, 2.7e-4 of its cell
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-6
    assert np.abs(ours - ref).max() < 1e-6 * ref.max()
    assert (np.abs(ours - ref) / ref).max() < 1e-3
    log_ours, log_ref = np.log(np.maximum(ours, 1e-10)), np.log(np.maximum(ref, 1e-10))
    assert np.abs(log_ours - log_ref).max() < 1e-3


def test_shapes_floor_and_normalisation():
    x = signal(2, 16_000)
    raw = log_mel(LogMelConfig(normalize=False), x)
    assert raw.shape == (2, 80, 101) and raw.dtype == torch.float32
    assert float(log_mel(LogMelConfig(normalize=False), torch.zeros(1, 1600)).min()) == pytest.approx(np.log(1e-10))
    z = log_mel(LogMelConfig(), x)
    assert torch.allclose(z.mean(-1), torch.zeros(2, 80), atol=1e-4)
    assert torch.allclose(z.std(-1, unbiased=False), torch.ones(2, 80), atol=1e-2)


def test_padding_in_a_batch_changes_nothing():
    """An utterance alone and zero-padded beside a longer one: same features on its frames;
    its padded frames are zero; normalisation uses only its own frames."""
    short, long = signal(1, 5_000, seed=1)[0], signal(1, 16_000, seed=2)[0]
    batch, lengths = pad([short, long])
    assert lengths.tolist() == [5_000, 16_000]
    n_short = int(frame_lengths(lengths)[0])
    assert n_short == 1 + 5_000 // 160
    for cfg in (LogMelConfig(normalize=False), LogMelConfig()):
        alone, together = log_mel(cfg, short[None]), log_mel(cfg, batch, lengths)
        assert torch.allclose(together[0, :, :n_short], alone[0], atol=1e-4)
        assert torch.allclose(together[1], log_mel(cfg, long[None])[0], atol=1e-4)
    assert torch.all(log_mel(LogMelConfig(), batch, lengths)[0, :, n_short:] == 0)


def test_spec_augment_widths_and_counts():
    cfg = SpecAugmentConfig(freq_masks=1, freq_width=10, time_masks=1, time_width=30, time_ratio=0.2)
    lengths = torch.tensor([300, 100] * 200)
    freq, time = spec_augment_masks(400, 80, 300, cfg, torch.Generator().manual_seed(0), lengths)
    fw, tw = freq.sum(1), time.sum(1)
    assert fw.max() == 10 and fw.min() == 0 and set(fw.tolist()) == set(range(11))  # U{0..F}
    assert tw[0::2].max() == 30 and tw[1::2].max() == 20  # min(T, p * L): 30 and 0.2 * 100
    assert set(tw[1::2].tolist()) == set(range(21))
    for mask in (freq, time):  # one mask: a single contiguous band
        idx = [torch.nonzero(row).flatten() for row in mask]
        assert all(len(i) == 0 or int(i[-1] - i[0]) + 1 == len(i) for i in idx)
    assert not time[1::2, 100:].any()  # time masks stay inside the utterance
    two = SpecAugmentConfig(freq_masks=2, freq_width=10, time_masks=3, time_width=30, time_ratio=1.0)
    freq, time = spec_augment_masks(400, 80, 300, two, torch.Generator().manual_seed(1))
    assert freq.sum(1).max() <= 20 and freq.sum(1).max() > 10 and time.sum(1).max() <= 90


def test_spec_augment_applies_and_is_deterministic():
    x = torch.randn(4, 80, 200, generator=torch.Generator().manual_seed(0))
    a = impl.audio_spec_augment(x, torch.Generator().manual_seed(7), SpecAugmentConfig(value=-3.0))
    b = impl.audio_spec_augment(x, torch.Generator().manual_seed(7), SpecAugmentConfig(value=-3.0))
    c = impl.audio_spec_augment(x, torch.Generator().manual_seed(8), SpecAugmentConfig(value=-3.0))
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = a != x
    assert changed.any() and torch.all(a[changed] == -3.0)
    freq, time = spec_augment_masks(4, 80, 200, SpecAugmentConfig(), torch.Generator().manual_seed(7))
    assert torch.equal(changed, freq[:, :, None] | time[:, None, :])
    assert torch.equal(x, torch.randn(4, 80, 200, generator=torch.Generator().manual_seed(0)))  # input untouched
