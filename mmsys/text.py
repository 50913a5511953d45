"""A word-level tokenizer learned from training captions.

Text is lower-cased and split into words and single punctuation marks. The vocabulary is the
special tokens followed by every word seen at least ``min_freq`` times, most frequent first
(ties alphabetical, so the same captions always give the same ids). Unseen words map to <unk>.
Its state is a plain dict, stored inside checkpoints next to the model that uses it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """'A red circle, left.' -> ['a', 'red', 'circle', ',', 'left', '.']"""
    return _WORD.findall(text.lower())


class Tokenizer:
    """Maps captions to id sequences ``<bos> w1 ... wn <eos>`` and back."""

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    def __init__(self, vocab: list[str]):
        if tuple(vocab[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with the special tokens {SPECIALS}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def train(cls, texts: Iterable[str], min_freq: int = 1) -> "Tokenizer":
        """Learn the vocabulary from ``texts`` (e.g. every training caption)."""
        counts = Counter(w for t in texts for w in split_words(t))
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, max_len: int | None = None, bos: bool = True, eos: bool = True) -> list[int]:
        """Ids of ``text`` with <bos>/<eos>; truncated to ``max_len`` keeping the final <eos>."""
        ids = [self.index.get(w, self.unk_id) for w in split_words(text)]
        ids = ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])
        if max_len is not None and len(ids) > max_len:
            ids = ids[:max_len - 1] + ([self.eos_id] if eos else ids[max_len - 1:max_len])
        return ids

    def batch_encode(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and right-pad a batch. Returns ids ``(B, L)`` long and pad_mask ``(B, L)`` bool
        (True = padding), with L = the longest sequence (at most ``max_len``)."""
        seqs = [self.encode(t, max_len) for t in texts]
        L = max(map(len, seqs))
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        return ids, ids == self.pad_id

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` up to the first <eos>, specials dropped."""
        words = []
        for i in (int(i) for i in ids):
            if i == self.eos_id:
                break
            if i >= len(SPECIALS):
                words.append(self.vocab[i])
        return " ".join(words)

    def state_dict(self) -> dict:
        return {"type": "word", "vocab": self.vocab}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Tokenizer":
        if state.get("type") != "word":
            raise ValueError(f"not a word-tokenizer state: type={state.get('type')!r}")
        return cls(state["vocab"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.state_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        return cls.from_state_dict(json.loads(Path(path).read_text()))
