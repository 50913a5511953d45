"""Figures for speech: a log-mel spectrogram with, per transcribed word, where in time the decoder
listened; and audio -> image retrieval rows.

The attention figure has two panels per utterance: the log-mel spectrogram (mel bins x frames),
and below it on the same time axis one row per generated token (the final <eos> included) with
the decoder's cross-attention mass over the tower's time patches (heads and blocks averaged; the
seam's ``audio_cross_attention``). A decoder that listens follows the words left to right: the
bright cells step down a diagonal.
"""

from __future__ import annotations

from pathlib import Path

import torch

from eval.caption_figures import word_maps


def speech_attention_figure(feats: list[torch.Tensor], ids: torch.Tensor, att: torch.Tensor, path: str | Path, *,
                            vocab: list[str], transcripts: list[str], hypotheses: list[str], eos_id: int,
                            pad_id: int, patch_time: int, hop_s: float = 0.01) -> str:
    """Save the spectrogram + cross-attention figure as a PNG and return its path.

    Args:
        feats: per utterance its log-mel (n_mels, F_i) (its own frames only).
        ids: transcribed ids (B, L) (<bos> .. <eos>, padded).
        att: (B, L - 1, time patches), row k belonging to token ids[:, k + 1].
        vocab: the word of each id; transcripts: the B reference texts; hypotheses: the B decoded.
        eos_id, pad_id: the end and padding ids.
        patch_time: frames per time patch (to put patches and frames on one axis); hop_s: seconds
            per frame.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = word_maps(ids, att, vocab, eos_id, pad_id)
    B = len(feats)
    heights = [r for b in range(B) for r in (2.0, 0.22 * max(len(rows[b]), 1) + 0.4)]
    fig, axes = plt.subplots(2 * B, 1, figsize=(9, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for b in range(B):
        spec, words = feats[b].float(), rows[b]
        seconds = spec.shape[1] * hop_s
        ax = axes[2 * b, 0]
        ax.imshow(spec.numpy(), origin="lower", aspect="auto", cmap="magma", extent=(0, seconds, 0, spec.shape[0]))
        ax.set_ylabel("mel bin", fontsize=7)
        ax.set_title(f"said: {transcripts[b]}\nheard: {hypotheses[b]}", fontsize=8, loc="left")
        ax.set_xticks([])
        ax = axes[2 * b + 1, 0]
        if words:
            grid = torch.stack([m for _, m in words]).float()  # (words, time patches)
            ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(0, grid.shape[1] * patch_time * hop_s, len(words), 0))
            ax.set_yticks([k + 0.5 for k in range(len(words))], [w for w, _ in words], fontsize=6)
        ax.set_xlim(0, seconds)
        ax.set_xlabel("seconds (cross-attention over time patches, per generated word)", fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
