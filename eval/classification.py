"""Classification metrics: accuracy, top-k accuracy, confusion matrix.

Plain functions of tensors. ``logits`` are ``(N, C)`` scores (any monotone transform of class
probabilities); ``preds`` and ``labels`` are ``(N,)`` integer class indices.

Tie policy: :func:`accuracy` takes the ``argmax`` (first maximal class wins), i.e. the class a
predictor would actually output; :func:`topk_accuracy` is *pessimistic*: a wrong class whose
score equals the true class's score counts as ranked above it, so a constant (degenerate) model
scores 0 rather than a lucky 1/C.
"""

from __future__ import annotations

import torch


def _as_preds(logits_or_preds: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` scores -> ``(N,)`` argmax; ``(N,)`` integer predictions pass through."""
    if logits_or_preds.ndim == 2:
        return logits_or_preds.argmax(dim=-1)
    if logits_or_preds.ndim == 1:
        if logits_or_preds.is_floating_point():
            raise ValueError("1-D predictions must be integer class indices, got floats")
        return logits_or_preds
    raise ValueError(f"expected (N, C) logits or (N,) predictions, got {tuple(logits_or_preds.shape)}")


def _check_labels(n: int, labels: torch.Tensor) -> torch.Tensor:
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"labels must be (N,) = ({n},), got {tuple(labels.shape)}")
    if n == 0:
        raise ValueError("no samples")
    return labels.long()


def accuracy(logits_or_preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct predictions.

    Args:
        logits_or_preds: ``(N, C)`` float scores (argmax is taken) or ``(N,)`` int predictions.
        labels: ``(N,)`` int true classes.
    Returns:
        accuracy in ``[0, 1]``.
    """
    preds = _as_preds(logits_or_preds)
    labels = _check_labels(len(preds), labels).to(preds.device)
    return (preds.long() == labels).double().mean().item()


def true_class_rank(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-based rank of the true class among the scores, ties counted against it.

    Args:
        logits: ``(N, C)`` scores.
        labels: ``(N,)`` true classes.
    Returns:
        ``(N,)`` long: number of *other* classes scoring ``>=`` the true class.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got {tuple(logits.shape)}")
    labels = _check_labels(len(logits), labels).to(logits.device)
    true = logits.gather(1, labels[:, None])                      # (N, 1)
    others = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], False)
    return ((logits >= true) & others).sum(dim=1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of samples whose true class is among the ``k`` highest scores.

    Args:
        logits: ``(N, C)`` scores.
        labels: ``(N,)`` true classes.
        k: ``>= 1``; ``k >= C`` gives 1.
    Returns:
        top-k accuracy in ``[0, 1]`` (pessimistic on exact ties, see module docstring).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return (true_class_rank(logits, labels) < k).double().mean().item()


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Counts of (true, predicted) pairs.

    Args:
        preds: ``(N,)`` predicted classes, or ``(N, C)`` scores (argmax is taken).
        labels: ``(N,)`` true classes.
        n_classes: ``C``.
    Returns:
        ``(C, C)`` long; ``M[i, j]`` = number of samples of true class ``i`` predicted as ``j``
        (rows = truth, columns = prediction, as in scikit-learn). ``M.trace() / N`` is accuracy.
    """
    preds = _as_preds(preds).long()
    labels = _check_labels(len(preds), labels).to(preds.device)
    for name, t in (("preds", preds), ("labels", labels)):
        if t.min() < 0 or t.max() >= n_classes:
            raise ValueError(f"{name} outside [0, {n_classes})")
    flat = labels * n_classes + preds
    return torch.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
