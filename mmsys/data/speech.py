"""The spoken world: the embedded world's captions read aloud by espeak-ng, with noise.

Utterance ``i`` of split ``s`` speaks one caption of scene ``i`` of split ``s``
(:func:`mmsys.data.world.make_split`), so the speech has the same splits and the same held-out
(colour, shape) compositions as the images. Per utterance, drawn from ``(world seed, split, i)``:

- which of the scene's captions is spoken (or ``SpeechConfig.caption`` for all);
- a voice: an espeak-ng accent (:data:`VOICES`) with a voice variant (:data:`VARIANTS`);
- a speed (words per minute, espeak-ng ``-s``) and a pitch (0-99, ``-p``), uniform in ranges;
- the seed of white Gaussian background noise added at ``snr_db`` (default 20 dB), where the
  signal power is the mean square of the whole clean utterance (espeak-ng's short leading and
  trailing silences included).

espeak-ng speaks at 22,050 Hz; the clean waveform is resampled to 16 kHz (polyphase,
:func:`mmsys.audio.waves.resample`), the noise is added there, and the result is clipped to
[-1, 1] and quantised to 16 bits (:func:`mmsys.audio.waves.quantise`) whether or not it comes
from the cache, so a cached and a fresh utterance are identical.

The cache: utterances are spoken in chunks of :data:`CHUNK` indices; each chunk is one file under
``cache_dir("speech")`` named by a sha256 of everything that determines its waveforms (per
utterance text, voice, speed, pitch, noise seed and SNR, the espeak-ng version, the sample rate),
written atomically with a checksum (:func:`mmsys.data.paths.write_checked_cache`).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..audio.waves import SAMPLE_RATE, dequantise, quantise, resample
from .audio_split import AudioSplit
from .paths import cache_dir, read_checked_cache, write_checked_cache
from .split import DataMissingError
from .world import SPLIT_SIZES, WorldConfig, make_split

# espeak-ng accents (each takes a voice variant; checked to change the sound in espeak-ng 1.51)
VOICES = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc")
VARIANTS = ("", "+m3", "+f2", "+f4")  # default, another male, two female variants
CHUNK = 256  # utterances per cache file
INSTALL = "apt-get install -y espeak-ng"


class EspeakMissingError(DataMissingError):
    """espeak-ng is not installed; the message is one line with the install command."""


@dataclass(frozen=True)
class SpeechConfig:
    """How the world's captions are spoken.

    ``speed``: words per minute range (espeak-ng default 175); ``pitch``: 0-99 range (default 50);
    ``snr_db``: background noise level, None for clean speech; ``caption``: which of a scene's
    captions is spoken, None to draw one per utterance; ``espeak``: the executable."""

    voices: tuple[str, ...] = VOICES
    variants: tuple[str, ...] = VARIANTS
    speed: tuple[int, int] = (140, 200)
    pitch: tuple[int, int] = (30, 70)
    snr_db: float | None = 20.0
    sample_rate: int = SAMPLE_RATE
    caption: int | None = None
    espeak: str = "espeak-ng"


# ----------------------------------------------------------------------------- espeak-ng

def espeak_path(exe: str = "espeak-ng") -> str:
    """Full path of the espeak-ng executable; raises :class:`EspeakMissingError` when absent."""
    path = shutil.which(exe)
    if path is None:
        raise EspeakMissingError(f"{exe} is not installed (the spoken world needs it): {INSTALL}")
    return path


@lru_cache(maxsize=None)
def espeak_version(path: str) -> str:
    """The version line of an espeak-ng executable ('eSpeak NG text-to-speech: 1.51 ...')."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.split("Data at")[0].strip()


def parse_wav(blob: bytes) -> tuple[np.ndarray, int]:
    """16-bit mono PCM WAV bytes -> ``(samples (T,) int16, sample rate)``. espeak-ng ``--stdout``
    writes a placeholder data size (it streams), so the data chunk runs to the end of the bytes."""
    if blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE stream")
    pos, rate = 12, None
    while pos + 8 <= len(blob):
        cid, size = blob[pos:pos + 4], int.from_bytes(blob[pos + 4:pos + 8], "little")
        if cid == b"fmt ":
            u16 = lambda at: int.from_bytes(blob[pos + at:pos + at + 2], "little")  # noqa: E731
            fmt, channels, bits = u16(8), u16(10), u16(22)
            rate = int.from_bytes(blob[pos + 12:pos + 16], "little")
            if (fmt, channels, bits) != (1, 1, 16):
                raise ValueError(f"expected 16-bit mono PCM, got format {fmt}, {channels} channels, {bits} bits")
        elif cid == b"data":
            if rate is None:
                raise ValueError("WAV data chunk before its fmt chunk")
            data = blob[pos + 8:]
            return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2"), rate
        pos += 8 + size + (size & 1)
    raise ValueError("WAV stream without a data chunk")


def speak(text: str, voice: str, speed: int, pitch: int, path: str) -> tuple[np.ndarray, int]:
    """One utterance from espeak-ng: ``(samples (T,) float64 in [-1, 1], sample rate)``."""
    out = subprocess.run([path, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout"],
                         input=text.encode(), capture_output=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"espeak-ng failed on {text!r} ({voice}): {out.stderr.decode().strip()}")
    samples, rate = parse_wav(out.stdout)
    return samples.astype(np.float64) / 32768.0, rate


def add_noise(x: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    """``x + n`` with white Gaussian ``n`` (seeded torch generator) scaled so that
    ``10 log10(mean(x^2) / mean(n^2)) = snr_db`` in expectation. ``(T,)`` -> ``(T,)``."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(x), generator=g, dtype=torch.float64).numpy()
    power = float(np.mean(x ** 2)) if len(x) else 0.0
    return x + noise * np.sqrt(power / 10 ** (snr_db / 10))


# ----------------------------------------------------------------------------- utterances

def _utterance_seed(seed: int, split: str, index: int) -> int:
    return zlib.crc32(f"mmsys-speech/{seed}/{split}/{index}".encode())


def utterance_specs(split: str, captions: list[list[str]], cfg: SpeechConfig, seed: int,
                    start: int = 0) -> list[dict]:
    """Everything that determines utterances ``start, start + 1, ...`` (one per caption list):
    a JSON-able dict each with text, caption_index, voice, speed, pitch, noise_seed, snr_db."""
    specs = []
    for k, caps in enumerate(captions):
        rng = random.Random(_utterance_seed(seed, split, start + k))
        c = rng.randrange(len(caps)) if cfg.caption is None else cfg.caption
        specs.append({"text": caps[c], "caption_index": c,
                      "voice": rng.choice(cfg.voices) + rng.choice(cfg.variants),
                      "speed": rng.randint(*cfg.speed), "pitch": rng.randint(*cfg.pitch),
                      "noise_seed": rng.getrandbits(32), "snr_db": cfg.snr_db})
    return specs


def render_utterance(spec: dict, cfg: SpeechConfig, path: str) -> torch.Tensor:
    """Speak one spec: espeak-ng -> resample -> noise -> int16 ``(T,)`` (see module doc)."""
    x, rate = speak(spec["text"], spec["voice"], spec["speed"], spec["pitch"], path)
    x = resample(x, rate, cfg.sample_rate)
    if spec["snr_db"] is not None:
        x = add_noise(x, spec["snr_db"], spec["noise_seed"])
    return quantise(x)


def _chunk_key(specs: list[dict], cfg: SpeechConfig, version: str) -> str:
    blob = json.dumps({"specs": specs, "espeak": version, "sample_rate": cfg.sample_rate,
                       "format": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _speak_chunk(specs: list[dict], cfg: SpeechConfig, path: str, cache: bool) -> list[torch.Tensor]:
    """int16 waveforms of one chunk of specs, from the cache when it holds them."""
    file = cache_dir("speech") / f"{_chunk_key(specs, cfg, espeak_version(path))[:24]}.pt" if cache else None
    saved = read_checked_cache(file, "speech cache") if cache else None
    if saved is None:
        waves = [render_utterance(s, cfg, path) for s in specs]
        if cache:
            write_checked_cache({"samples": torch.cat(waves) if waves else torch.zeros(0, dtype=torch.int16),
                                 "lengths": torch.tensor([len(w) for w in waves], dtype=torch.int64),
                                 "specs": specs}, file)
        return waves
    return list(torch.split(saved["samples"], saved["lengths"].tolist()))


def spoken_transcripts(split: str = "train", n: int | None = None, cfg: SpeechConfig = SpeechConfig(),
                       world: WorldConfig = WorldConfig(), single: bool = False) -> list[str]:
    """What :func:`make_speech_split` with the same arguments says, without speaking it (no
    espeak-ng needed): one transcript per utterance."""
    n = SPLIT_SIZES[split] if n is None else int(n)
    return [s["text"] for s in utterance_specs(split, make_split(split, n, world, single=single).captions, cfg,
                                                world.seed)]


def make_speech_split(split: str = "train", n: int | None = None, cfg: SpeechConfig = SpeechConfig(),
                      world: WorldConfig = WorldConfig(), single: bool = False,
                      cache: bool = True) -> AudioSplit:
    """Speak the captions of a world split.

    Args:
        split: "train", "val", "test" or "heldout" (as :func:`mmsys.data.world.make_split`).
        n: number of utterances (default the split's size); a smaller n is a prefix of a larger.
        cfg: voices, speeds, pitches, noise (:class:`SpeechConfig`).
        world: the world whose scenes are spoken (its seed also seeds the speech).
        single: only one-object scenes.
        cache: read and write the on-disk cache (module doc).

    Returns:
        AudioSplit ``world-speech/<split>``: waves ``(T_i,)`` float32 at ``cfg.sample_rate``,
        transcripts (the captions spoken), labels = shape of object A (10 classes), and in meta:
        ``world`` (the image DataSplit of the same scenes, with all captions), ``scenes`` (its
        scene table), ``caption_index`` ``(N,)`` long, ``voice`` (list), ``speed`` / ``pitch``
        ``(N,)`` long.

    Raises:
        EspeakMissingError (a DataMissingError) when espeak-ng is not installed.
    """
    path = espeak_path(cfg.espeak)
    n = SPLIT_SIZES[split] if n is None else int(n)
    scenes = make_split(split, n, world, single=single)
    specs = utterance_specs(split, scenes.captions, cfg, world.seed)
    waves = []
    for c in range(0, n, CHUNK):
        waves += _speak_chunk(specs[c:c + CHUNK], cfg, path, cache)
    identity = {"source": "spoken embedded world (mmsys.data.speech)", "seed": world.seed, "split": split,
                "espeak": espeak_version(path), "config": {k: v for k, v in cfg.__dict__.items() if k != "espeak"},
                "world_sha256": scenes.sha256()}
    meta = {"world": scenes, "scenes": scenes.meta["scenes"],
            "caption_index": torch.tensor([s["caption_index"] for s in specs], dtype=torch.int64),
            "voice": [s["voice"] for s in specs],
            "speed": torch.tensor([s["speed"] for s in specs], dtype=torch.int64),
            "pitch": torch.tensor([s["pitch"] for s in specs], dtype=torch.int64)}
    return AudioSplit(f"world-speech/{split}" + ("-single" if single else ""), [dequantise(w) for w in waves],
                      [s["text"] for s in specs], cfg.sample_rate, scenes.labels, scenes.classes, identity, meta)
