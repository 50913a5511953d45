"""The container every audio dataset in mmsys produces: utterances held in memory.

The audio counterpart of :class:`mmsys.data.split.DataSplit`: waveforms are a list of 1-D
float32 tensors in [-1, 1] at one sample rate (lengths differ); :meth:`AudioSplit.padded`
makes the ``(N, T)`` batch with lengths.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..audio.waves import SAMPLE_RATE, pad


@dataclass
class AudioSplit:
    """One split of one audio dataset, in memory.

    Attributes:
        name: ``"<dataset>/<split>"``, e.g. ``"world-speech/train"`` or ``"librispeech/dev-clean"``.
        waves: per utterance a ``(T_i,)`` float32 tensor in [-1, 1].
        transcripts: per utterance the text spoken.
        sample_rate: of every waveform (Hz).
        labels: ``(N,)`` int64 class indices, or None.
        classes: class names indexed by label, or None.
        identity: provenance for reports (generator and its settings, source folder ...).
        meta: dataset-specific extras (the world scenes spoken, speaker ids, voices ...).
    """

    name: str
    waves: list[torch.Tensor]
    transcripts: list[str]
    sample_rate: int = SAMPLE_RATE
    labels: torch.Tensor | None = None
    classes: list[str] | None = None
    identity: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for w in self.waves:
            if w.dtype != torch.float32 or w.ndim != 1:
                raise ValueError(f"{self.name}: waveforms must be 1-D float32, got {w.dtype} {tuple(w.shape)}")
        n = len(self.waves)
        if len(self.transcripts) != n:
            raise ValueError(f"{self.name}: {len(self.transcripts)} transcripts for {n} waveforms")
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"{self.name}: {len(self.labels)} labels for {n} waveforms")

    def __len__(self) -> int:
        return len(self.waves)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, T_max)`` float32 zero-padded waveforms and lengths ``(N,)`` int64."""
        return pad(self.waves)

    def seconds(self) -> float:
        """Total duration of the split in seconds."""
        return sum(len(w) for w in self.waves) / self.sample_rate

    def sha256(self) -> str:
        """Content hash of waveforms, transcripts and labels: the dataset identity in reports."""
        h = hashlib.sha256(str(self.sample_rate).encode())
        for w in self.waves:
            h.update(len(w).to_bytes(8, "little"))
            h.update(w.contiguous().numpy().tobytes())
        h.update("\n".join(self.transcripts).encode())
        if self.labels is not None:
            h.update(self.labels.to(torch.int64).numpy().tobytes())
        return h.hexdigest()

    def summary(self) -> dict:
        """A report-ready description: name, counts, duration, hash and identity."""
        return {"name": self.name, "n_utterances": len(self), "sample_rate": self.sample_rate,
                "hours": round(self.seconds() / 3600, 4),
                "n_classes": len(self.classes) if self.classes else None,
                "sha256": self.sha256(), **self.identity}
