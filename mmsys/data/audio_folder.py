"""Real speech: a LibriSpeech-style folder (Panayotov et al. 2015) read with soundfile.

Layout (any depth below ``root``; LibriSpeech's ``<speaker>/<chapter>/``)::

    <speaker>/<chapter>/<speaker>-<chapter>.trans.txt    one line per utterance: "ID TRANSCRIPT"
    <speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac   (or .wav) the audio of ID

Every transcript line must have its audio file beside it (FLAC preferred, else WAV); audio files
without a transcript line are ignored. Multi-channel audio is averaged to mono and everything
is resampled to 16 kHz (:func:`mmsys.audio.waves.resample`).
"""

from __future__ import annotations

from pathlib import Path

import soundfile as sf
import torch

from ..audio.waves import SAMPLE_RATE, resample
from .audio_split import AudioSplit
from .split import DataMissingError

EXTENSIONS = (".flac", ".wav")


def read_transcripts(root: Path) -> list[tuple[str, str, Path]]:
    """All ``(utterance id, transcript, folder)`` under ``root``, sorted by id."""
    rows = []
    for file in sorted(Path(root).rglob("*.trans.txt")):
        for line in file.read_text().splitlines():
            if line.strip():
                uid, _, text = line.strip().partition(" ")
                rows.append((uid, text.strip(), file.parent))
    return sorted(rows)


def read_audio(path: Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """One audio file -> ``(T,)`` float32 mono in [-1, 1] at ``sample_rate``."""
    x, rate = sf.read(str(path), dtype="float64", always_2d=True)  # (T, channels)
    return torch.from_numpy(resample(x.mean(axis=1), rate, sample_rate)).float().clamp(-1.0, 1.0)


def read_audio_folder(root: Path | str, sample_rate: int = SAMPLE_RATE, n: int | None = None,
                      name: str | None = None) -> AudioSplit:
    """Read a LibriSpeech-style folder (module doc).

    Args:
        root: the folder (e.g. ``.../LibriSpeech/dev-clean``).
        sample_rate: rate of the returned waveforms.
        n: read only the first ``n`` utterances (by id).
        name: the split's name (default ``"audio-folder/<root's name>"``).

    Returns:
        AudioSplit with waves ``(T_i,)`` float32, transcripts as written, no labels, and in meta
        ``ids`` (utterance ids), ``speakers`` (the id's first field) and ``paths``.

    Raises:
        DataMissingError when ``root`` is missing, holds no transcripts, or a transcript line
        has no audio file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataMissingError(f"no audio folder at {root}: expected <speaker>/<chapter>/*.trans.txt "
                               "with .flac or .wav files (e.g. LibriSpeech dev-clean from openslr.org/12)")
    rows = read_transcripts(root)
    if not rows:
        raise DataMissingError(f"no *.trans.txt transcript files under {root}")
    rows = rows[:n] if n is not None else rows
    paths = []
    for uid, _, folder in rows:
        found = [folder / (uid + ext) for ext in EXTENSIONS if (folder / (uid + ext)).is_file()]
        if not found:
            raise DataMissingError(f"utterance {uid} has a transcript but no {' or '.join(EXTENSIONS)} file in {folder}")
        paths.append(found[0])
    waves = [read_audio(p, sample_rate) for p in paths]
    meta = {"ids": [r[0] for r in rows], "speakers": [r[0].split("-")[0] for r in rows],
            "paths": [str(p) for p in paths]}
    identity = {"source": str(root.resolve()), "format": "LibriSpeech-style folder"}
    return AudioSplit(name or f"audio-folder/{root.name}", waves, [r[1] for r in rows], sample_rate,
                      identity=identity, meta=meta)
