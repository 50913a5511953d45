"""Caption controls the grader makes itself (m3): outputs that must FAIL the BLEU-4 / CIDEr gates.

- :func:`most_frequent_caption`: the constant-output control (one caption for every image: what
  a captioner that ignores the image converges to).
- :func:`shuffled`: each image gets the caption generated for *another* image (a derangement),
  which keeps the candidate's vocabulary, lengths and fluency but breaks the image-caption link.

(The third control, an untrained captioner, is built with the candidate's own builder in
``milestones/m3_caption.py``.)
"""

from __future__ import annotations

from collections import Counter

import torch


def most_frequent_caption(captions: list[list[str]]) -> tuple[str, int]:
    """The single most frequent caption string among all captions of all images (exact text;
    ties broken by first occurrence) and its count. captions: per image its list of strings."""
    counts = Counter(c for caps in captions for c in caps)
    if not counts:
        raise ValueError("no captions")
    return counts.most_common(1)[0]


def shuffled(captions: list[str], seed: int = 0) -> list[str]:
    """``captions`` re-assigned so that no image keeps its own: a seeded random order, each
    position in it given the next one's caption (a cyclic shift, hence no fixed point; n >= 2)."""
    n = len(captions)
    if n < 2:
        raise ValueError("shuffling needs at least two captions")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out = [""] * n
    for k, i in enumerate(order):
        out[i] = captions[order[(k + 1) % n]]
    return out
