"""Controls for the CLIP gates: embeddings that must FAIL zero-shot and text->image retrieval.

A gate is trustworthy only if something that does not do the task fails it, measured with the
gate's own protocol. From the embeddings a gate is computed on (:class:`GateEmbeddings`) this
module makes two such controls without any model:

- shuffled captions: the pairing is broken, the embeddings kept -- each caption's correct image
  is another image (a derangement of the gallery), and each class is scored with another
  class's prompt embedding (a derangement of the classes);
- constant embedding: every image gets the same embedding (the normalised mean of the real
  ones), the texts are kept. Retrieval then ties everywhere, and ties rank against the query
  (:mod:`eval.retrieval`), so it scores 0; zero-shot scores the share of images whose class is
  among the k classes nearest that one vector (0.5 for top-5 of 10 balanced classes).

The third control, an untrained model, is built by the milestone with the candidate's own
builder and measured through :func:`gate_metrics` like the trained one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from eval.retrieval import text_to_image_recall, zero_shot_topk

GATE_KEYS = ("zeroshot_top1", "zeroshot_top5", "t2i_R@10")


@dataclass(frozen=True)
class GateEmbeddings:
    """What the CLIP gates are computed from.

    zs_images (N, E) image embeddings classified zero-shot; class_emb (C, E) one (prompt-ensemble)
    embedding per class; labels (N,) true classes; texts (T, E) caption embeddings (the
    retrieval queries); gallery (G, E) image embeddings retrieved among; t2i (T,) long, each
    caption's image in ``gallery``."""

    zs_images: torch.Tensor
    class_emb: torch.Tensor
    labels: torch.Tensor
    texts: torch.Tensor
    gallery: torch.Tensor
    t2i: torch.Tensor


def gate_metrics(e: GateEmbeddings) -> dict[str, float]:
    """{"zeroshot_top1", "zeroshot_top5", "t2i_R@10"} of ``e`` (cosines, ties pessimistic)."""
    zs = zero_shot_topk(e.zs_images, e.class_emb, e.labels, ks=(1, 5))
    return {"zeroshot_top1": zs["top1"], "zeroshot_top5": zs["top5"],
            "t2i_R@10": text_to_image_recall(e.texts, e.gallery, e.t2i, ks=(10,))["R@10"]}


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) long permutation with no fixed point (n >= 2): one random cycle through all n."""
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got {n}")
    order = torch.randperm(n, generator=generator)
    out = torch.empty(n, dtype=torch.long)
    out[order] = order.roll(-1)
    return out


def shuffled_captions(e: GateEmbeddings, seed: int) -> dict[str, float]:
    """Gate metrics with captions deranged against images and class prompts against classes:
    caption k's correct image becomes ``d[t2i[k]] != t2i[k]``; class c is scored with the
    prompt embedding of class ``d'[c] != c``."""
    g = torch.Generator().manual_seed(seed)
    classes, images = derangement(len(e.class_emb), g), derangement(len(e.gallery), g)
    return gate_metrics(replace(e, class_emb=e.class_emb[classes], t2i=images[e.t2i.long()]))


def constant_embedding(e: GateEmbeddings) -> dict[str, float]:
    """Gate metrics with every image (zero-shot and gallery) given the normalised mean image
    embedding of its set: a collapsed image tower in front of the trained text tower."""
    def const(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float().mean(dim=0), dim=-1).expand(len(x), -1)
    return gate_metrics(replace(e, zs_images=const(e.zs_images), gallery=const(e.gallery)))
