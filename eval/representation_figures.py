"""m7 figures: how a frozen representation lays out the classes (a 2-D PCA of the features)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def pca(x: torch.Tensor, k: int = 2) -> torch.Tensor:
    """(N, D) -> (N, k): the centred features projected on their first ``k`` principal axes."""
    c = x.double() - x.double().mean(0)
    _, _, v = torch.linalg.svd(c, full_matrices=False)
    return (c @ v[:k].T).float()


def pca_figure(x: torch.Tensor, labels: torch.Tensor, classes: list[str], path: str | Path, title: str = "") -> str:
    """Scatter of the 2-D :func:`pca` of ``x`` (N, D), one colour per class of ``labels`` (N,)."""
    p = pca(x)
    fig, ax = plt.subplots(figsize=(6, 5))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c, name in enumerate(classes):
        m = labels == c
        ax.scatter(p[m, 0], p[m, 1], s=5, color=cmap(c % cmap.N), label=name, alpha=0.7)
    ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
