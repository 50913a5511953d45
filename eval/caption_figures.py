"""Figures for captioning: an image, its generated caption, and per word where the decoder looked.

One row per image: the image with its caption as title, then one panel per generated word (the
final <eos> included) showing the decoder's cross-attention over the patch grid, upsampled and
overlaid on the image (heads and blocks averaged; see the seam's ``captioner_cross_attention``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def word_maps(ids: torch.Tensor, maps: torch.Tensor, vocab: list[str], eos_id: int,
              pad_id: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Pair each generated token with its attention map.

    ids (B, L): <bos> w1 .. <eos> <pad>...; maps (B, L - 1, g, g) with row k belonging to token
    ids[:, k + 1]. Returns per image ``[(word, map (g, g)), ...]`` up to and including <eos>.
    """
    out = []
    for b in range(len(ids)):
        row = []
        for k, t in enumerate(ids[b, 1:].tolist()):
            if t == pad_id:
                break
            row.append((vocab[t], maps[b, k]))
            if t == eos_id:
                break
        out.append(row)
    return out


def caption_attention_figure(images: torch.Tensor, ids: torch.Tensor, maps: torch.Tensor, path: str | Path, *,
                             vocab: list[str], captions: list[str], eos_id: int, pad_id: int,
                             max_words: int = 16, upsample: int = 4) -> str:
    """Save the per-word cross-attention figure as a PNG and return its path.

    Args:
        images: uint8 (B, 3, S, S).
        ids: generated ids (B, L) (greedy or beam search output).
        maps: (B, L - 1, g, g), row k belonging to token ids[:, k + 1] (the seam's
            ``captioner_cross_attention``).
        vocab: the word of each id; captions: the B decoded captions (panel titles);
        eos_id, pad_id: the end and padding ids.
        max_words: panels per row at most.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = word_maps(ids, maps, vocab, eos_id, pad_id)
    n_cols = 1 + min(max_words, max(len(r) for r in rows))
    B, S = len(images), images.shape[-1]
    fig, axes = plt.subplots(B, n_cols, figsize=(1.3 * n_cols, 1.75 * B), squeeze=False)
    for b in range(B):
        big = F.interpolate(images[b:b + 1].float(), scale_factor=upsample, mode="nearest")[0]
        big = big.permute(1, 2, 0).byte().numpy()
        ax = axes[b, 0]
        ax.imshow(big)
        ax.set_title("input", fontsize=7)
        ax.text(0.0, -0.06, f'"{captions[b]}"', transform=ax.transAxes,
                ha="left", va="top", fontsize=8)
        words = rows[b][:max_words]
        vmax = max((float(m.max()) for _, m in words), default=1.0) or 1.0  # one scale per image
        for c, (word, m) in enumerate(words, start=1):
            heat = F.interpolate(m[None, None].float(), size=(S * upsample, S * upsample),
                                 mode="bilinear", align_corners=False)[0, 0]
            ax = axes[b, c]
            ax.imshow(big)
            ax.imshow(heat.numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=vmax)
            ax.set_title(word, fontsize=8)
        for ax in axes[b]:
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
    fig.suptitle("generated caption (beam search) and, per word, where the decoder looked when it chose "
                 "that word: cross-attention over the patches, heads and blocks averaged, one colour "
                 "scale per image", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.5 / (1.75 * B), bottom=0.25 / (1.75 * B),
                        wspace=0.06, hspace=0.45)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
