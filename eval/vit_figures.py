"""m1 figures: where the ViT looks (per-head CLS attention and attention rollout)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(K, N) patch scores -> (K, size, size) for overlay (N must be a square)."""
    g = int(round(maps.shape[-1] ** 0.5))
    return F.interpolate(maps.reshape(-1, 1, g, g).float(), size=(size, size), mode="nearest")[:, 0]


def attention_figure(images: torch.Tensor, last_layer: torch.Tensor, rollout: torch.Tensor,
                     titles: list[str], path: str | Path) -> str:
    """One row per image: the image, each head's CLS->patch attention in the last layer, and the
    attention rollout over all layers overlaid on the image.

    Args:
        images: ``(K, 3, S, S)`` uint8.
        last_layer: ``(K, H, 1 + N, 1 + N)`` attention weights of the last block.
        rollout: ``(K, N)`` attention-rollout scores (Abnar & Zuidema 2020), each row summing to 1.
        titles: one label per image (e.g. "true: circle / pred: circle").
    """
    K, H, S = images.shape[0], last_layer.shape[1], images.shape[-1]
    fig, axes = plt.subplots(K, H + 2, figsize=(1.6 * (H + 2), 1.7 * K), squeeze=False)
    for k in range(K):
        img = images[k].permute(1, 2, 0).numpy()
        axes[k, 0].imshow(img)
        axes[k, 0].set_title(titles[k], fontsize=7)
        heads = _upsample(last_layer[k, :, 0, 1:], S)
        for h in range(H):
            axes[k, 1 + h].imshow(heads[h].numpy(), cmap="viridis")
            if k == 0:
                axes[k, 1 + h].set_title(f"head {h}", fontsize=8)
        axes[k, H + 1].imshow(img)
        axes[k, H + 1].imshow(_upsample(rollout[k:k + 1], S)[0].numpy(), cmap="jet", alpha=0.5)
        if k == 0:
            axes[k, H + 1].set_title("rollout", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("ViT: last-layer CLS attention per head, and attention rollout", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def confusion_figure(cm: torch.Tensor, classes: list[str], path: str | Path) -> str:
    """Row-normalised confusion matrix (rows: true class, columns: predicted)."""
    norm = cm.float() / cm.sum(dim=1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
