"""m6 data: the spoken world (espeak-ng; skipped where it is absent) and the LibriSpeech-style
folder reader (on a fixture written here). The bundled library is tested directly (the m6 seam
comes with the milestone)."""

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

from mmsys.data import speech as S
from mmsys.data.audio_folder import read_audio_folder
from mmsys.data.split import DataMissingError
from mmsys.data.world import COLOURS, HELDOUT, SHAPES, make_split

pytestmark = [pytest.mark.m6, pytest.mark.usefixtures("one_thread")]
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed: apt-get install -y espeak-ng")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache root; returns the speech cache folder."""
    monkeypatch.setenv("MMSYS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "speech"


def snr_db(clean: torch.Tensor, noisy: torch.Tensor) -> float:
    return float(10 * torch.log10(clean.double().pow(2).mean() / (noisy - clean).double().pow(2).mean()))


# ----------------------------------------------------------------------------- without espeak-ng

def test_missing_espeak_is_a_one_line_data_missing_error():
    with pytest.raises(DataMissingError) as e:
        S.make_speech_split("val", 2, S.SpeechConfig(espeak="espeak-ng-not-here"))
    assert isinstance(e.value, S.EspeakMissingError)
    assert "\n" not in str(e.value) and str(e.value).endswith("apt-get install -y espeak-ng")
    from grader.cli import is_user_error
    assert is_user_error(e.value)  # the grader's exit 2 (it matches error classes by name)


def test_parse_streamed_wav():
    """espeak-ng --stdout writes a placeholder data size: the data runs to the end."""
    samples = (np.sin(np.arange(500) / 7) * 20_000).astype("<i2")
    fmt = (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (22050).to_bytes(4, "little") + \
        (44100).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
    blob = b"RIFF" + b"\x24\xf0\xff\x7f" + b"WAVE" + b"fmt " + (16).to_bytes(4, "little") + fmt + \
        b"data" + b"\x00\xf0\xff\x7f" + samples.tobytes()
    x, rate = S.parse_wav(blob)
    assert rate == 22050 and np.array_equal(x, samples)
    with pytest.raises(ValueError):
        S.parse_wav(b"not a wav file at all, no sir")


def test_noise_is_added_at_the_stated_snr():
    x = 0.3 * np.sin(np.arange(40_000) * 2 * np.pi * 300 / 16_000)
    y = S.add_noise(x, 20.0, seed=5)
    assert snr_db(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(20.0, abs=0.1)
    assert np.array_equal(y, S.add_noise(x, 20.0, seed=5)) and not np.array_equal(y, S.add_noise(x, 20.0, seed=6))


def test_specs_are_fixed_functions_of_seed_split_index():
    caps = make_split("val", 40).captions
    a = S.utterance_specs("val", caps, S.SpeechConfig(), seed=0)
    assert a[10:] == S.utterance_specs("val", caps[10:], S.SpeechConfig(), seed=0, start=10)
    assert a != S.utterance_specs("val", caps, S.SpeechConfig(), seed=1)
    assert all(s["text"] == caps[i][s["caption_index"]] for i, s in enumerate(a))
    assert all(140 <= s["speed"] <= 200 and 30 <= s["pitch"] <= 70 for s in a)
    assert len({s["voice"] for s in a}) >= 10 and len({s["caption_index"] for s in a}) == 5
    assert {s["text"] for s in S.utterance_specs("val", caps, S.SpeechConfig(caption=0), 0)} == {c[0] for c in caps}


# ----------------------------------------------------------------------------- with espeak-ng

@pytest.mark.integration
@needs_espeak
def test_spoken_split(cache):
    s = S.make_speech_split("val", 6)
    world = make_split("val", 6)
    assert s.name == "world-speech/val" and len(s) == 6 and s.sample_rate == 16_000
    assert torch.equal(s.labels, world.labels) and s.meta["world"].sha256() == world.sha256()
    for i, w in enumerate(s.waves):
        assert w.dtype == torch.float32 and w.ndim == 1 and float(w.abs().max()) <= 1.0
        assert 0.8 < len(w) / 16_000 < 8.0 and float(w.abs().max()) > 0.1  # speech, not silence
        assert s.transcripts[i] == world.captions[i][int(s.meta["caption_index"][i])]
    batch, lengths = s.padded()
    assert batch.shape == (6, int(lengths.max())) and torch.equal(batch[0, : lengths[0]], s.waves[0])
    prefix = S.make_speech_split("val", 3, cache=False)  # spoken afresh: the same waveforms
    assert all(torch.equal(a, b) for a, b in zip(prefix.waves, s.waves))
    other = S.make_speech_split("test", 3, cache=False)
    assert other.transcripts != s.transcripts[:3]
    assert S.spoken_transcripts("val", 6) == s.transcripts  # what is said, without speaking it


@needs_espeak
def test_cache_is_used_and_keyed_by_content(cache, monkeypatch):
    a = S.make_speech_split("val", 4)
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 1
    def no_espeak(*args, **kwargs):
        raise AssertionError("espeak-ng ran although the cache holds the utterances")
    with monkeypatch.context() as m:  # (the espeak-ng version is remembered from the first call)
        m.setattr(subprocess, "run", no_espeak)
        b = S.make_speech_split("val", 4)
    assert all(torch.equal(x, y) for x, y in zip(a.waves, b.waves))
    files[0].write_bytes(b"truncated")  # a damaged cache file is noticed and spoken again
    assert all(torch.equal(x, y) for x, y in zip(a.waves, S.make_speech_split("val", 4).waves))
    S.make_speech_split("val", 4, S.SpeechConfig(snr_db=10.0))  # another SNR: another file
    assert len(list(cache.glob("*.pt"))) == 2


@needs_espeak
def test_noise_level_voices_and_resampling(cache):
    clean = S.make_speech_split("train", 4, S.SpeechConfig(snr_db=None), cache=False)
    noisy = S.make_speech_split("train", 4, cache=False)
    assert clean.meta["voice"] == noisy.meta["voice"] and clean.transcripts == noisy.transcripts
    for c, n in zip(clean.waves, noisy.waves):
        assert snr_db(c, n) == pytest.approx(20.0, abs=0.5)  # 16-bit rounding and clipping aside
    spec = S.utterance_specs("train", [["a small red square on the left"]], S.SpeechConfig(), 0)[0]
    raw, rate = S.speak(spec["text"], spec["voice"], spec["speed"], spec["pitch"], S.espeak_path())
    assert rate == 22_050
    assert len(S.render_utterance(spec, S.SpeechConfig(), S.espeak_path())) == round(len(raw) * 16_000 / 22_050)
    x = S.speak("a blue star", "en-us", 175, 50, S.espeak_path())[0]
    assert not np.array_equal(x, S.speak("a blue star", "en-us+f2", 175, 50, S.espeak_path())[0])


@needs_espeak
def test_heldout_speech_speaks_heldout_compositions(cache):
    s = S.make_speech_split("heldout", 5, cache=False)
    sc = s.meta["scenes"]
    for i, text in enumerate(s.transcripts):
        colour, shape = COLOURS[int(sc["colour"][i, 0])], SHAPES[int(sc["shape"][i, 0])]
        assert (colour, shape) in HELDOUT and colour in text and shape in text


# ----------------------------------------------------------------------------- LibriSpeech-style folder

def tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)


@pytest.fixture
def folder(tmp_path):
    """Two speakers: 19/198 with two FLACs at 16 kHz, 84/121 with one stereo WAV at 8 kHz."""
    a = tmp_path / "dev" / "19" / "198"
    a.mkdir(parents=True)
    sf.write(a / "19-198-0000.flac", tone(440, 0.5, 16_000), 16_000, subtype="PCM_16")
    sf.write(a / "19-198-0001.flac", tone(880, 0.25, 16_000), 16_000, subtype="PCM_16")
    (a / "19-198.trans.txt").write_text("19-198-0001 NORTHANGER ABBEY\n19-198-0000 CHAPTER ONE\n")
    b = tmp_path / "dev" / "84" / "121"
    b.mkdir(parents=True)
    stereo = np.stack([tone(300, 0.5, 8_000), tone(300, 0.5, 8_000)], axis=1)
    sf.write(b / "84-121-0007.wav", stereo, 8_000, subtype="PCM_16")
    sf.write(b / "84-121-0008.wav", tone(300, 0.1, 8_000), 8_000)  # no transcript line: ignored
    (b / "84-121.trans.txt").write_text("84-121-0007 A TONE IN STEREO\n")
    return tmp_path / "dev"


def test_audio_folder(folder):
    s = read_audio_folder(folder)
    assert s.name == "audio-folder/dev" and len(s) == 3
    assert s.meta["ids"] == ["19-198-0000", "19-198-0001", "84-121-0007"]
    assert s.transcripts == ["CHAPTER ONE", "NORTHANGER ABBEY", "A TONE IN STEREO"]
    assert s.meta["speakers"] == ["19", "19", "84"]
    assert [len(w) for w in s.waves] == [8_000, 4_000, 8_000]  # 0.5 s, 0.25 s, 0.5 s at 16 kHz
    assert np.abs(s.waves[0].numpy() - tone(440, 0.5, 16_000)).max() < 1e-4  # FLAC: 16-bit exact
    for w, freq in zip(s.waves, (440, 880, 300)):  # resampling keeps the pitch
        spectrum = np.abs(np.fft.rfft(w.numpy()))
        assert np.argmax(spectrum) * 16_000 / len(w) == pytest.approx(freq, abs=2)
    assert len(read_audio_folder(folder, n=2)) == 2


def test_audio_folder_errors(folder, tmp_path):
    with pytest.raises(DataMissingError, match="no audio folder"):
        read_audio_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataMissingError, match="no \\*.trans.txt"):
        read_audio_folder(tmp_path / "empty")
    (folder / "19" / "198" / "19-198-0001.flac").unlink()
    with pytest.raises(DataMissingError, match="19-198-0001"):
        read_audio_folder(folder)
