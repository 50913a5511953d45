"""Retrieval metrics: recall@K (text<->image), zero-shot top-k, image->image precision@K.

Conventions:
- A similarity matrix ``sim`` is ``(Q, G)``: queries by gallery, higher = more similar.
- Embedding inputs are L2-normalised here (``F.normalize``), so similarities are cosines; already
  normalised embeddings are unchanged by this.
- Recall ties are *pessimistic*: a wrong gallery item scoring exactly the same as the best correct
  one counts as ranked above it, so a collapsed model (all embeddings equal) gets recall ~ 0, not 1.
- Recalls and precisions are fractions in ``[0, 1]``; keys are ``"R@1"``, ``"P@5"``, ``"top1"``.
- Large query sets are processed in chunks of ``chunk`` queries (memory ``chunk * G`` floats).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _positive_mask(positives: torch.Tensor, q: int, g: int) -> torch.Tensor:
    """``(Q,)`` indices or ``(Q, G)`` bool -> ``(Q, G)`` bool mask of correct gallery items."""
    if positives.dtype == torch.bool:
        if tuple(positives.shape) != (q, g):
            raise ValueError(f"bool positives must be (Q, G) = ({q}, {g}), got {tuple(positives.shape)}")
        mask = positives
    else:
        if tuple(positives.shape) != (q,):
            raise ValueError(f"index positives must be (Q,) = ({q},), got {tuple(positives.shape)}")
        if q and (positives.min() < 0 or positives.max() >= g):
            raise ValueError(f"positive indices outside [0, {g})")
        mask = torch.zeros(q, g, dtype=torch.bool, device=positives.device)
        mask[torch.arange(q, device=positives.device), positives.long()] = True
    if not mask.any(dim=1).all():
        raise ValueError("every query needs at least one correct gallery item")
    return mask


def first_positive_rank(sim: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """0-based rank of the best-scoring correct item for each query (ties counted against it).

    Args:
        sim: ``(Q, G)`` similarities.
        positives: ``(Q,)`` long index of the single correct item, or ``(Q, G)`` bool mask.
    Returns:
        ``(Q,)`` long: number of *wrong* gallery items with ``sim >=`` the best correct item.
    """
    if sim.ndim != 2:
        raise ValueError(f"sim must be (Q, G), got {tuple(sim.shape)}")
    pos = _positive_mask(positives.to(sim.device), *sim.shape)
    best = sim.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)   # (Q, 1)
    return ((sim >= best) & ~pos).sum(dim=1)


def _summarise(ranks: torch.Tensor, ks, prefix: str) -> dict[str, float]:
    out = {f"{prefix}{k}": (ranks < k).double().mean().item() for k in ks}
    out["median_rank"] = float(ranks.double().add(1).quantile(0.5).item())   # 1-based, averaged
    out["n_queries"] = int(len(ranks))
    return out


def recall_at_k(sim: torch.Tensor, positives: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@K: fraction of queries with ANY correct gallery item in their top K.

    Args:
        sim: ``(Q, G)`` similarities.
        positives: ``(Q,)`` long (one correct item per query) or ``(Q, G)`` bool (several, e.g.
            image->text with 5 captions per image).
        ks: cut-offs.
    Returns:
        ``{"R@k": float in [0,1] for k in ks, "median_rank": 1-based float, "n_queries": Q}``.
    """
    return _summarise(first_positive_rank(sim, positives), ks, "R@")


def _chunked_ranks(query: torch.Tensor, gallery: torch.Tensor, positives: torch.Tensor,
                   chunk: int) -> torch.Tensor:
    """Ranks for normalised ``query (Q, D)`` vs ``gallery (G, D)``; positives (Q,) or (Q, G)."""
    query, gallery = F.normalize(query.float(), dim=-1), F.normalize(gallery.float(), dim=-1)
    ranks = [first_positive_rank(query[i:i + chunk] @ gallery.T, positives[i:i + chunk])
             for i in range(0, len(query), chunk)]
    return torch.cat(ranks)


def text_to_image_recall(text_emb: torch.Tensor, image_emb: torch.Tensor,
                         text_to_image: torch.Tensor, ks=(1, 5, 10),
                         chunk: int = 1024) -> dict[str, float]:
    """Text -> image recall@K: each caption retrieves among all images; one image is correct.

    Args:
        text_emb: ``(T, D)`` caption embeddings (normalised here).
        image_emb: ``(I, D)`` image embeddings (normalised here).
        text_to_image: ``(T,)`` long, index of each caption's image.
    Returns:
        see :func:`recall_at_k`.
    """
    ranks = _chunked_ranks(text_emb, image_emb, text_to_image.to(text_emb.device), chunk)
    return _summarise(ranks, ks, "R@")


def image_to_text_recall(image_emb: torch.Tensor, text_emb: torch.Tensor,
                         text_to_image: torch.Tensor, ks=(1, 5, 10),
                         chunk: int = 1024) -> dict[str, float]:
    """Image -> text recall@K: a hit if ANY of the image's captions is in the top K.

    Args:
        image_emb: ``(I, D)`` image embeddings (normalised here).
        text_emb: ``(T, D)`` caption embeddings (normalised here).
        text_to_image: ``(T,)`` long, index of each caption's image (every image needs >= 1).
    Returns:
        see :func:`recall_at_k`.
    """
    n_img, n_txt = len(image_emb), len(text_emb)
    t2i = text_to_image.long().to(image_emb.device)
    pos = torch.zeros(n_img, n_txt, dtype=torch.bool, device=image_emb.device)
    pos[t2i, torch.arange(n_txt, device=image_emb.device)] = True
    return _summarise(_chunked_ranks(image_emb, text_emb, pos, chunk), ks, "R@")


def zero_shot_topk(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor,
                   ks=(1, 5), chunk: int = 1024) -> dict[str, float]:
    """Zero-shot classification accuracy: nearest class-prompt embedding by cosine.

    Args:
        image_emb: ``(N, D)`` image embeddings (normalised here).
        class_emb: ``(C, D)`` one embedding per class, e.g. of "a photo of a {class}" (averaged
            over prompt templates upstream if wanted; normalised here).
        labels: ``(N,)`` true classes.
        ks: cut-offs (``k >= C`` gives 1).
    Returns:
        ``{"top1": .., "top5": .., "n_queries": N}`` fractions (ties pessimistic).
    """
    ranks = _chunked_ranks(image_emb, class_emb, labels.long().to(image_emb.device), chunk)
    out = _summarise(ranks, ks, "top")
    del out["median_rank"]
    return out


def image_to_image_topk(emb: torch.Tensor, labels: torch.Tensor, ks=(1, 5, 10),
                        chunk: int = 1024) -> dict[str, float]:
    """Image -> image retrieval precision@K with relevance = same label, query excluded.

    Each image queries all *other* images; precision@K is the fraction of its K nearest
    neighbours (by cosine) sharing its label, averaged over queries. Ties are pessimistic: among
    equal similarities the images of another label rank first (then by gallery index), so a
    collapsed model gets the precision of its worst ordering. Needs ``max(ks) <= N - 1``.

    Args:
        emb: ``(N, D)`` embeddings (normalised here).
        labels: ``(N,)`` class labels.
    Returns:
        ``{"P@k": float in [0,1] for k in ks, "n_queries": N}``.
    """
    n, kmax = len(emb), max(ks)
    if kmax > n - 1:
        raise ValueError(f"max(ks) = {kmax} needs at least {kmax + 1} images, got {n}")
    emb = F.normalize(emb.float(), dim=-1)
    labels = labels.long().to(emb.device)
    hits = []                                                       # (n, kmax) bool per chunk
    for i in range(0, n, chunk):
        sim = emb[i:i + chunk] @ emb.T                              # (q, N)
        rows = torch.arange(len(sim), device=emb.device)
        sim[rows, rows + i] = float("-inf")                         # exclude the query itself
        rel = labels[None, :] == labels[i:i + chunk, None]          # (q, N) same label
        # two stable sorts: by relevance (others first), then by similarity, so ties rank others first
        pre = torch.sort(rel.to(torch.uint8), dim=1, stable=True).indices
        order = pre.gather(1, torch.sort(sim.gather(1, pre), dim=1, descending=True, stable=True).indices[:, :kmax])
        hits.append(rel.gather(1, order))
    hits = torch.cat(hits).double()
    out = {f"P@{k}": hits[:, :k].mean(dim=1).mean().item() for k in ks}
    out["n_queries"] = n
    return out
