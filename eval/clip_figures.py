"""Figures of a contrastive image/text model (matplotlib, Agg backend, PNG).

- :func:`similarity_heatmap`: the (B, B) image-text cosine matrix of a small batch with the
  images and captions as axis labels; a trained model shows a bright diagonal.
- :func:`retrieval_grid`: text queries (rows) and their top-k images, correct ones framed green.
- :func:`embedding_scatter`: images and texts PCA-projected to 2-D in one plot (one shared
  projection per panel), before vs after training, matching pairs joined by thin lines.
- :func:`figure_set`: the three of them for one gallery split, from the model's two encoders.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from eval.representation_figures import pca  # noqa: E402


FRAME = {0: "red", 1: "gold", 2: "limegreen"}


def _hwc(img: torch.Tensor):
    """uint8 (3, H, W) -> numpy (H, W, 3) for imshow."""
    return img.permute(1, 2, 0).cpu().numpy()


def similarity_heatmap(sim: torch.Tensor, images: torch.Tensor, captions: list[str], path,
                       title: str = "image-text cosine similarity") -> Path:
    """sim: (B, B) cosines (rows = images, columns = captions); images: (B, 3, H, W) uint8."""
    B = len(sim)
    fig = plt.figure(figsize=(2.0 + 0.55 * B, 2.6 + 0.55 * B))
    ax = fig.add_axes([0.24, 0.04, 0.64, 0.62])
    im = ax.imshow(sim.float().cpu().numpy(), cmap="viridis")
    ax.set_xticks(range(B))
    ax.set_xticklabels([textwrap.shorten(c, 56) for c in captions], rotation=90, fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    for i in range(B):  # the image of each row, left of the matrix
        box = ax.get_position()
        h = box.height / B
        iax = fig.add_axes([box.x0 - h * 1.05 * fig.get_figheight() / fig.get_figwidth(), box.y1 - (i + 1) * h, h * fig.get_figheight() / fig.get_figwidth(), h])
        iax.imshow(_hwc(images[i]))
        iax.axis("off")
    fig.suptitle(title, y=0.995)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def retrieval_grid(queries: list[str], images: torch.Tensor, path, correct: torch.Tensor | None = None,
                   scores: torch.Tensor | None = None, query_images: torch.Tensor | None = None,
                   title: str = "text -> image retrieval") -> Path:
    """queries: Q strings; images: (Q, k, 3, H, W) uint8 top-k per query; correct: (Q, k) bool
    or int (0 = wrong: red frame, 1 = a duplicate of the right answer: gold, 2 or True = right:
    green); scores: (Q, k) cosines; query_images: (Q, 3, H, W) for image->image rows."""
    Q, k = images.shape[:2]
    extra = 1 if query_images is not None else 0
    fig, axes = plt.subplots(Q, k + extra, figsize=(1.25 * (k + extra) + 2.6, 1.45 * Q + 0.5), squeeze=False)
    for q in range(Q):
        if extra:
            axes[q, 0].imshow(_hwc(query_images[q]))
            axes[q, 0].set_title("query", fontsize=7)
        for j in range(k):
            ax = axes[q, j + extra]
            ax.imshow(_hwc(images[q, j]))
            if correct is not None:
                c = correct[q, j]
                colour = FRAME[2 if c.dtype == torch.bool and bool(c) else int(c)]
                for s in ax.spines.values():
                    s.set_edgecolor(colour)
                    s.set_linewidth(3)
            if scores is not None:
                ax.set_title(f"{float(scores[q, j]):.2f}", fontsize=7)
        axes[q, 0].set_ylabel("\n".join(textwrap.wrap(queries[q], 22)), rotation=0, ha="right",
                              va="center", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def embedding_scatter(panels: dict[str, tuple[torch.Tensor, torch.Tensor]], path,
                      colours: torch.Tensor | None = None, title: str = "shared embedding space (PCA)") -> Path:
    """panels: name -> (image_emb (N, E), text_emb (N, E)) with row i a matching pair.
    Each panel fits one PCA on images and texts together; dots = images, crosses = texts;
    ``colours``: (N,) int class per pair (tab10), or (N, 3) RGB in [0, 1] (e.g. the object's colour)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8), squeeze=False)
    for ax, (name, (img, txt)) in zip(axes[0], panels.items()):
        n = len(img)
        xy = pca(torch.cat([img, txt])).numpy()
        c = colours.numpy() if colours is not None else None
        kw = {"cmap": "tab10"} if c is not None and c.ndim == 1 else {}
        for i in range(min(n, 60)):  # a few pair links
            ax.plot([xy[i, 0], xy[n + i, 0]], [xy[i, 1], xy[n + i, 1]], color="0.8", lw=0.5, zorder=0)
        ax.scatter(xy[:n, 0], xy[:n, 1], c=c, s=16, marker="o", edgecolors="0.3", linewidths=0.4,
                   label="images", **kw)
        ax.scatter(xy[n:, 0], xy[n:, 1], c=c, s=26, marker="x", label="texts", **kw)
        ax.set_title(name)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def figure_set(images: torch.Tensor, captions: list[list[str]], embed_images: Callable, embed_texts: Callable,
               path: Callable, before=None, keys: torch.Tensor | None = None, labels: torch.Tensor | None = None,
               colours: torch.Tensor | None = None, k: int = 8) -> list[Path]:
    """Similarity heatmap (the first 12 pairs), retrieval grids (6 text queries: the first
    caption of images 0, 7, ..., 35; 4 image queries: images 0, 11, 22, 33; top-``k`` each) and,
    when ``before`` is given, the embedding scatter before/after training.

    Args:
        images: (N, 3, H, W) uint8 gallery; captions: N lists of captions (the first is used).
        embed_images: uint8 (n, 3, H, W) -> (n, E) unit vectors; embed_texts: T strings -> (T, E).
        path: file name -> Path to write it to.
        before: (image_emb (m, E), text_emb (m, E)) of the first m pairs before training.
        keys: (N,) id, equal = the same canonical description (gold frames: a duplicate answer).
        labels: (N,) class, equal = same colour and shape (green frames in image -> image).
        colours: (N, 3) RGB in [0, 1] per image for the scatter.
    """
    n = 12
    caps = [cs[0] for cs in captions[:n]]
    img, txt = embed_images(images[:n]), embed_texts(caps)
    figs = [similarity_heatmap(img @ txt.T, images[:n], caps, path("similarity_heatmap.png"))]
    gallery = embed_images(images)
    queries = [captions[i][0] for i in range(0, 6 * 7, 7)]
    truth = torch.arange(0, 6 * 7, 7)
    top = (embed_texts(queries) @ gallery.T).topk(k, dim=1)
    grade = (top.indices == truth[:, None]).long() * 2
    title = "text -> image: top-8 of the test split (green = the captioned image)"
    if keys is not None:  # gold: a different image with the same canonical description
        grade = torch.maximum(grade, (keys[top.indices] == keys[truth][:, None]).long())
        title = title[:-1] + ", gold = same canonical description)"
    figs.append(retrieval_grid(queries, images[top.indices], path("retrieval_grid.png"),
                               correct=grade, scores=top.values, title=title))
    qi = torch.arange(4) * 11  # image -> image: 4 query images, their top-k others
    sims = gallery[qi] @ gallery.T
    sims[torch.arange(4), qi] = float("-inf")
    top = sims.topk(k, dim=1)
    same = None if labels is None else labels[top.indices] == labels[qi][:, None]
    figs.append(retrieval_grid([f"test image {i}" for i in qi.tolist()], images[top.indices],
                               path("retrieval_grid_image.png"), correct=same, scores=top.values,
                               query_images=images[qi],
                               title="image -> image: top-8 (green = same colour and shape of object A)"))
    if before is not None:
        m = len(before[0])
        after = (gallery[:m], embed_texts([cs[0] for cs in captions[:m]]))
        figs.append(embedding_scatter({"before training": before, "after training": after},
                                      path("embedding_scatter.png"), colours=None if colours is None else colours[:m],
                                      title="images (o) and captions (x) in the shared space, PCA; "
                                            "colour = object colour"))
    return figs
