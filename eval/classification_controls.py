"""Controls for a classification gate: predictors that must fail it, made by the grader's code.

- :func:`constant_predictions`: every image gets the most frequent training class (the best
  a classifier can do without looking at the image); accuracy = that class's test frequency.
- :func:`permuted_labels`: the test labels in a seeded random order; scoring a trained model's
  predictions against them measures what its accuracy would be if its outputs had nothing to
  do with the images' classes (chance at the label marginals).
"""

from __future__ import annotations

import torch


def constant_predictions(train_labels: torch.Tensor, n: int, n_classes: int) -> torch.Tensor:
    """``(n,)`` long predictions, all the most frequent class of ``train_labels`` ``(N,)`` (the
    lowest such class on ties)."""
    counts = torch.bincount(train_labels.long(), minlength=n_classes)
    return torch.full((n,), int(counts.argmax()), dtype=torch.long)


def permuted_labels(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """``labels`` ``(N,)`` in the order of a permutation drawn from ``seed`` (same multiset of
    classes, each image's own label gone)."""
    g = torch.Generator().manual_seed(seed)
    return labels[torch.randperm(len(labels), generator=g)]
