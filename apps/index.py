"""Embedding indexes: a gallery's unit-norm CLIP embeddings in Faiss, saved beside what made them.

A gallery (:class:`Gallery`: images, a caption per image, and the identity of the split they
came from) is embedded by an m2 CLIP in batches and held in two Faiss indexes of inner product
(= cosine, the vectors are unit norm): one of the images (text->image and image->image queries)
and one of the captions (image->text). Two kinds (:class:`IndexSpec`):

- ``flat``: ``IndexFlatIP``, exact search (every vector scored).
- ``hnsw``: ``IndexHNSWFlat`` (Malkov & Yashunin 2018), approximate: a graph of ``m`` links per
  vector built with ``ef_construction`` candidates; a query explores ``ef_search`` candidates
  (recall against time: ``benchmarks/index_search.py`` measures the trade-off).

:func:`save` writes ``images.faiss``, ``texts.faiss``, ``gallery.pt`` and ``meta.json`` into a
folder, each atomically (a temporary file, then a rename; ``meta.json`` last, with the sha256 of
the others), so a reader never sees half an index. :func:`load` refuses, with one line that says
what to do, an index built from another checkpoint (its sha256 is in ``meta.json``), of another
embedding dimension, or whose files do not match their recorded hashes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from mmsys.data.paths import atomic_torch_save, atomic_write_text, atomic_write_with, sha256_file

KINDS = ("flat", "hnsw")
FORMAT = 1  # meta.json's layout version


class IndexProblem(Exception):
    """An index that cannot be used as asked; the message says what to do."""


@dataclass
class IndexSpec:
    """Which Faiss index, with its parameters (``m``, ``ef_construction``, ``ef_search``: HNSW only)."""

    kind: str = "flat"
    m: int = 32  # HNSW: links per vector
    ef_construction: int = 80  # HNSW: candidates kept while inserting
    ef_search: int = 64  # HNSW: candidates explored per query (set again at query time if wanted)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise IndexProblem(f"index kind {self.kind!r}: give one of {', '.join(KINDS)}")

    def params(self) -> dict:
        return {} if self.kind == "flat" else {"m": self.m, "ef_construction": self.ef_construction,
                                               "ef_search": self.ef_search}


@dataclass
class Gallery:
    """What an index searches: uint8 images (N, 3, S, S), ``captions[i]`` describing image i,
    and ``identity``: the split they came from (dataset, split, count, world config or root)."""

    images: torch.Tensor
    captions: list[str]
    identity: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)


def make_faiss(spec: IndexSpec, dim: int):
    """An empty Faiss index of inner product for ``dim``-d vectors."""
    import faiss
    if spec.kind == "flat":
        return faiss.IndexFlatIP(dim)
    index = faiss.IndexHNSWFlat(dim, spec.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = spec.ef_construction
    index.hnsw.efSearch = spec.ef_search
    return index


def _as_faiss(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy(), dtype=np.float32)


def build_faiss(emb: torch.Tensor, spec: IndexSpec, batch: int = 50_000, progress: bool = False):
    """A Faiss index holding unit-norm ``emb`` (N, E), added ``batch`` rows at a time."""
    from tqdm import tqdm
    index = make_faiss(spec, emb.shape[1])
    for i in tqdm(range(0, len(emb), batch), desc=f"index {spec.kind}", disable=not progress):
        index.add(_as_faiss(emb[i:i + batch]))
    return index


def search(index, queries: torch.Tensor, k: int, ef_search: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of unit-norm ``queries`` (Q, E): (scores (Q, k) cosine, ids (Q, k) long), best
    first. ``ef_search`` overrides an HNSW index's candidate count for this call."""
    if not 1 <= k <= index.ntotal:
        raise IndexProblem(f"k = {k}: give 1 <= k <= {index.ntotal} (the gallery's size)")
    if ef_search is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = ef_search
    scores, ids = index.search(_as_faiss(queries), k)
    return torch.from_numpy(scores), torch.from_numpy(ids).long()


@dataclass
class EmbeddingIndex:
    """A gallery, its image and caption indexes, and ``meta`` (what made them: gallery identity,
    checkpoint sha256, dimension, kind and parameters, build time)."""

    gallery: Gallery
    images: object  # faiss index of the gallery's image embeddings
    texts: object  # faiss index of its captions' embeddings (caption i describes image i)
    meta: dict

    def text_to_image(self, query_emb: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (Q, k), image ids (Q, k)) for text embeddings (Q, E)."""
        return search(self.images, query_emb, k)

    def image_to_image(self, query_emb: torch.Tensor, k: int, exclude: int | None = None):
        """(scores (Q, k), image ids (Q, k)) for image embeddings; ``exclude``: a gallery id not to
        return (the query itself, when it is a gallery image)."""
        if exclude is None:
            return search(self.images, query_emb, k)
        scores, ids = search(self.images, query_emb, min(k + 1, self.images.ntotal))
        keep = ids[0] != exclude
        return scores[:, keep][:, :k], ids[:, keep][:, :k]

    def image_to_text(self, query_emb: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (Q, k), caption ids (Q, k)) for image embeddings."""
        return search(self.texts, query_emb, k)


def build(model, tokenizer, gallery: Gallery, spec: IndexSpec, checkpoint_sha256: str, batch: int = 500,
          progress: bool = False) -> EmbeddingIndex:
    """Embed ``gallery`` with an m2 ``model`` (images and captions, ``batch`` at a time, a
    progress bar when asked) and index both."""
    from tqdm import tqdm

    from mmsys.clip import encode_images, encode_texts
    t0 = time.perf_counter()
    steps = range(0, len(gallery), batch)
    img = torch.cat([encode_images(model, gallery.images[i:i + batch])
                     for i in tqdm(steps, desc="embed images", disable=not progress)])
    txt = torch.cat([encode_texts(model, tokenizer, gallery.captions[i:i + batch])
                     for i in tqdm(steps, desc="embed captions", disable=not progress)])
    embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    images, texts = build_faiss(img, spec), build_faiss(txt, spec)
    meta = {"format": FORMAT, "gallery": gallery.identity, "n": len(gallery), "dim": int(img.shape[1]),
            "checkpoint_sha256": checkpoint_sha256, "kind": spec.kind, "params": spec.params(),
            "built_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "embed_s": round(embed_s, 2), "build_s": round(time.perf_counter() - t0, 2)}
    return EmbeddingIndex(gallery, images, texts, meta)


def _write_faiss(index, path: Path) -> None:
    import faiss
    atomic_write_with(path, lambda tmp: faiss.write_index(index, str(tmp)))


FILES = ("images.faiss", "texts.faiss", "gallery.pt")


def save(index: EmbeddingIndex, folder: Path) -> Path:
    """Write the index into ``folder`` (created): the three data files, then ``meta.json`` with
    their sha256 (written last: an interrupted save leaves no meta.json that vouches for it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_faiss(index.images, folder / "images.faiss")
    _write_faiss(index.texts, folder / "texts.faiss")
    atomic_torch_save({"images": index.gallery.images, "captions": index.gallery.captions,
                       "identity": index.gallery.identity}, folder / "gallery.pt")
    meta = {**index.meta, "files": {name: sha256_file(folder / name) for name in FILES}}
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
    index.meta = meta
    return folder


def read_meta(folder: Path) -> dict:
    """``folder/meta.json``, or IndexProblem when there is no index there."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise IndexProblem(f"no index at {folder} (no meta.json): build one with "
                          f"`python -m apps.retrieve --build-index` or from the page's sidebar")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IndexProblem(f"{path} is not readable JSON ({e}): rebuild the index") from None


def load(folder: Path, checkpoint_sha256: str | None = None, dim: int | None = None) -> EmbeddingIndex:
    """The index saved in ``folder``. Refused (:class:`IndexProblem`, one line) when it was built
    from another checkpoint than ``checkpoint_sha256``, for another embedding ``dim``, or when a
    file is missing or differs from the hash ``meta.json`` recorded."""
    import faiss
    folder = Path(folder)
    meta = read_meta(folder)
    if checkpoint_sha256 is not None and meta.get("checkpoint_sha256") != checkpoint_sha256:
        raise IndexProblem(f"the index at {folder} was built from checkpoint sha256 "
                          f"{str(meta.get('checkpoint_sha256'))[:12]}..., not this one ({checkpoint_sha256[:12]}...): "
                          f"rebuild it for this checkpoint")
    if dim is not None and meta.get("dim") != dim:
        raise IndexProblem(f"the index at {folder} holds {meta.get('dim')}-d embeddings, this CLIP makes {dim}-d "
                          f"ones: rebuild it for this checkpoint")
    for name in FILES:
        path = folder / name
        if not path.is_file():
            raise IndexProblem(f"the index at {folder} lacks {name}: rebuild it")
        if sha256_file(path) != meta.get("files", {}).get(name):
            raise IndexProblem(f"{path} differs from the hash in its meta.json (changed or half-written): rebuild it")
    g = torch.load(folder / "gallery.pt", weights_only=True)
    return EmbeddingIndex(Gallery(g["images"], list(g["captions"]), g["identity"]),
                          faiss.read_index(str(folder / "images.faiss")),
                          faiss.read_index(str(folder / "texts.faiss")), meta)


def spec_of(meta: dict) -> IndexSpec:
    """The :class:`IndexSpec` an index's meta records."""
    return IndexSpec(kind=meta["kind"], **meta.get("params", {}))


def describe(meta: dict) -> str:
    """One line: kind and parameters, size, dimension, gallery, checkpoint hash."""
    params = ", ".join(f"{k} {v}" for k, v in meta.get("params", {}).items())
    g = meta.get("gallery", {})
    return (f"{meta['kind']}{f' ({params})' if params else ''}: {meta['n']} x {meta['dim']}-d, gallery "
            f"{g.get('dataset', '?')}/{g.get('split', '?')}, checkpoint sha256 {meta['checkpoint_sha256'][:12]}")
