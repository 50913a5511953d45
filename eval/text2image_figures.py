"""m5 figures: generated samples with their prompts, the guidance sweep, negative prompts."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _show(ax, img: torch.Tensor, title: str | None = None, color: str = "black", fontsize: float = 6.5):
    ax.imshow(img.permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title("\n".join(textwrap.wrap(title, 22)), fontsize=fontsize, color=color)


def prompt_grid(images: torch.Tensor, prompts: list[str], path: str | Path, title: str = "",
                ok: torch.Tensor | None = None, cols: int = 8) -> str:
    """Generated images with their prompts under each.

    Args:
        images: uint8 (N, 3, H, W); prompts: N strings.
        ok: optional (N,) bool (the judge's verdict): green title = match, red = no match.
    """
    n = len(images)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        ax.axis("on")
        color = "black" if ok is None else ("green" if bool(ok[i]) else "red")
        _show(ax, images[i], prompts[i], color)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def guidance_grid(images_by_scale: dict[float, torch.Tensor], prompts: list[str], path: str | Path,
                  title: str = "same prompts and seeds; one row per guidance scale s") -> str:
    """Columns = prompts, rows = guidance scales (the same noise seed down a column).

    Args:
        images_by_scale: s -> uint8 (K, 3, H, W) for the K prompts.
    """
    scales = sorted(images_by_scale)
    K = len(prompts)
    fig, axes = plt.subplots(len(scales), K, figsize=(1.45 * K + 0.6, 1.55 * len(scales) + 0.5), squeeze=False)
    for j, s in enumerate(scales):
        for k in range(K):
            _show(axes[j, k], images_by_scale[s][k], prompts[k] if j == 0 else None)
        axes[j, 0].set_ylabel(f"s = {s:g}", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def guidance_sweep_plot(sweep: dict[float, dict], path: str | Path, ceiling: float | None = None,
                        floor: float | None = None, default: float | None = None) -> str:
    """Prompt match, CLIP score (cosine) and in-domain FID against the guidance scale.

    Args:
        sweep: s -> {"prompt_match", "clip_score", "fid"} (missing keys are skipped).
        ceiling, floor: the judge CLIP's score on real and on shuffled (image, caption) pairs.
        default: the default guidance scale (marked).
    """
    scales = sorted(sweep)
    panels = [("prompt_match", "prompt match (judge: attributes)"), ("clip_score", "CLIP score (cosine, judge CLIP)"),
              ("fid", "FID (in-domain features, lower = better)")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    fig.suptitle("guidance sweep: eps = eps_u + s (eps_c - eps_u), s = 1 is the plain conditional model", fontsize=9)
    for ax, (key, label) in zip(axes, panels):
        xs = [s for s in scales if sweep[s].get(key) is not None]
        ax.plot(xs, [sweep[s][key] for s in xs], "o-", color="tab:blue")
        if key == "clip_score":
            if ceiling is not None:
                ax.axhline(ceiling, ls="--", color="green", label="real pairs (ceiling)")
            if floor is not None:
                ax.axhline(floor, ls="--", color="red", label="shuffled pairs (floor)")
            ax.legend(fontsize=7)
        if default is not None:
            ax.axvline(default, ls=":", color="gray")
        ax.set_xlabel("guidance scale s")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def negative_prompt_figure(base: torch.Tensor, negative: torch.Tensor, path: str | Path, prompt: str,
                           negative_prompt: str, frac_base: float, frac_neg: float, what: str = "red",
                           k: int = 16) -> str:
    """Two panels with the same seeds: without and with the negative prompt.

    Args:
        base, negative: uint8 (N, 3, H, W) samples (first ``k`` shown).
        frac_base, frac_neg: fraction of all samples the judge sees as ``what``.
    """
    k = min(k, len(base))
    cols = 8
    rows = -(-k // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(1.3 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(k):
        _show(axes[i // cols, i % cols], base[i])
        _show(axes[rows + i // cols, i % cols], negative[i])
    shown = f'"{prompt}"' if prompt else 'the empty prompt ""'
    axes[0, 0].set_title(f'{shown}, no negative: {what} {frac_base:.0%}', fontsize=8, loc="left")
    axes[rows, 0].set_title(f'{shown}, negative "{negative_prompt}": {what} {frac_neg:.0%}', fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
