"""Figures for diffusion models (m4, m5): sample grids, denoising trajectories, line plots.

All functions write one PNG (matplotlib, Agg backend) and return its path as a string.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from eval.reference.data.split import to_uint8  # noqa: E402


def _hwc(img: torch.Tensor):
    """uint8 or float [-1, 1] ``(3, H, W)`` -> numpy ``(H, W, 3)`` uint8."""
    if img.dtype != torch.uint8:
        img = to_uint8(img.float())
    return img.permute(1, 2, 0).cpu().numpy()


def _save(fig, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def sample_grid(images: torch.Tensor, path: str | Path, title: str = "", nrow: int | None = None,
                labels: Sequence[str] | None = None, scale: float = 0.9) -> str:
    """A grid of images.

    Args:
        images: ``(N, 3, H, W)`` uint8 (or float in [-1, 1]).
        path: PNG to write.
        title: figure title (say the sampler, steps, seed).
        nrow: images per row (default ~sqrt(N)).
        labels: optional caption under each image (e.g. a prompt or a judge's reading).
        scale: inches per image.
    """
    n = len(images)
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    h = scale * (1.25 if labels else 1.0)
    fig, axes = plt.subplots(rows, nrow, figsize=(scale * nrow, h * rows + (0.4 if title else 0)), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(_hwc(images[k]), interpolation="nearest")
            if labels:
                ax.set_title(labels[k], fontsize=5)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(wspace=0.05, hspace=0.3 if labels else 0.05)
    return _save(fig, path)


def trajectory_strip(trajectory: Sequence[torch.Tensor], timesteps: Sequence[int], path: str | Path,
                     n_samples: int = 4, n_frames: int = 10, title: str = "",
                     predicted_x0: Sequence[torch.Tensor] | None = None) -> str:
    """Denoising trajectories: one row per sample, ``x_t`` from pure noise (left) to ``x_0``.

    Args:
        trajectory: ``[x_T, ..., x_0]`` as returned by the reverse loop (``mmsys.diffusion.samplers.sample(...,
            return_trajectory=True)``): ``len(timesteps) + 1`` tensors ``(B, 3, H, W)`` float.
        timesteps: the sampler's timesteps in visiting order; frame ``k`` of the trajectory is the
            state *before* step ``k`` (``x_t`` at ``t = timesteps[k]``), the last frame is ``x_0``.
        n_samples: rows (the first samples of the batch).
        n_frames: columns, evenly spaced along the trajectory (first and last always shown).
        predicted_x0: optional list aligned with ``trajectory`` of the model's ``x0_hat`` at each
            frame; when given, each sample gets a second row showing it.
    """
    L = len(trajectory)
    picks = sorted({round(i * (L - 1) / (n_frames - 1)) for i in range(n_frames)})
    names = [f"t={int(timesteps[k])}" if k < len(timesteps) else "x_0" for k in picks]
    B = min(n_samples, trajectory[0].shape[0])
    per = 2 if predicted_x0 is not None else 1
    fig, axes = plt.subplots(B * per, len(picks), figsize=(0.95 * len(picks), 1.0 * B * per + 0.4),
                             squeeze=False)
    for b in range(B):
        for j, k in enumerate(picks):
            rows = [(trajectory, "x_t")] + ([(predicted_x0, "x0_hat")] if predicted_x0 is not None else [])
            for r, (seq, label) in enumerate(rows):
                ax = axes[b * per + r, j]
                ax.imshow(_hwc(seq[k][b]), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if b == 0 and r == 0:
                    ax.set_title(names[j], fontsize=7)
                if j == 0:
                    ax.set_ylabel(label, fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(wspace=0.05, hspace=0.08)
    return _save(fig, path)


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, xlabel: str = "",
              ylabel: str = "", title: str = "", logy: bool = False,
              hlines: dict[str, float] | None = None) -> str:
    """Several named ``(x, y)`` curves on one axis, with optional labelled horizontal lines
    (thresholds, floors, ceilings)."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), marker="o" if len(list(x)) < 20 else None, label=name, lw=1.4, ms=3)
    for i, (name, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, ls="--", lw=1, color=f"C{len(series) + i}", label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def bar_plot(values: dict[str, float], path: str | Path, ylabel: str = "", title: str = "",
             logy: bool = False, threshold: float | None = None) -> str:
    """Named values as bars (e.g. FID of floor / model / trivial baseline), value printed on top."""
    fig, ax = plt.subplots(figsize=(1.1 * len(values) + 1.5, 3.2))
    names = list(values)
    bars = ax.bar(names, [values[k] for k in names], color=[f"C{i}" for i in range(len(names))])
    for b, k in zip(bars, names):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{values[k]:.3g}", ha="center", va="bottom",
                fontsize=7)
    if threshold is not None:
        ax.axhline(threshold, ls="--", color="k", lw=1, label=f"threshold {threshold:g}")
        ax.legend(fontsize=7)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=7)
    return _save(fig, path)
