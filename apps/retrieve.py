"""Retrieval: find images by text, images by image, or captions by image, with a trained CLIP.

    python -m apps.retrieve "a red circle on the left" -k 8
    python -m apps.retrieve --image runs/m2/some.png -k 8      # image -> image
    python -m apps.retrieve --image test:17 --to text          # gallery image 17 -> captions
    python -m apps.retrieve "a photo of a cat" --gallery cifar10 --kind hnsw --data-root ../shared/data

Loads the checkpoint (default ``runs/m2/checkpoint.pt``, written by ``python grader.py m2``) and
its Faiss index of a gallery (:mod:`apps.index`, :mod:`apps.gallery`): the split the checkpoint
names in ``extra["index"]`` (the world's test split by default) or ``--gallery``. The index lives
in ``<checkpoint dir>/index/<gallery>-<kind>/``: built (in batches) when absent, rebuilt with a
warning when unreadable or made from another checkpoint; an ``--index`` folder given by hand is
refused instead. Writes a PNG grid of the top-k with scores and captions and prints them. An
existing ``--out`` file is replaced only with ``--force``; the default per-query figure is the
program's own and is replaced by the same query. Every option is checked before the model is
loaded (:mod:`apps.cli`): one ``error:`` line, exit 2.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from apps.cli import ArgumentParser, fail, missing_checkpoint, positive_int, unwritable, would_overwrite
from apps.index import EmbeddingIndex, IndexProblem, IndexSpec
from mmsys.checkpoint import CheckpointError, sha256_file
from mmsys.clip import encode_images, encode_texts, load_clip
from mmsys.data.split import DataMissingError

DEFAULT_CHECKPOINT = Path("runs/m2/checkpoint.pt")
REPO_ROOT = Path(__file__).resolve().parents[1]


class RetrieveError(Exception):
    """A usage problem; the message says what to do."""


def find_checkpoint(path: Path | None, default: Path = DEFAULT_CHECKPOINT, what: str = "CLIP",
                    milestone: str = "m2") -> Path:
    """The given checkpoint, or the grader's ``default`` output (relative to cwd, then the repo);
    RetrieveError naming ``milestone``'s grader run when there is none."""
    candidates = (path,) if path is not None else (default, REPO_ROOT / default)
    for p in candidates:
        if p.is_file():
            return p
    raise RetrieveError(missing_checkpoint(candidates[0], what, milestone))


def index_folder(checkpoint: Path, gallery: str, kind: str) -> Path:
    """Where the program keeps a checkpoint's index of ``gallery``: ``<checkpoint dir>/index/<gallery>-<kind>/``."""
    return checkpoint.parent / "index" / f"{gallery}-{kind}"


def checkpoint_gallery(ck: dict) -> tuple[str, dict]:
    """(gallery name, :func:`apps.gallery.load_gallery` keywords) that a checkpoint names in
    ``extra["index"]``: the split its run evaluated retrieval on (the world's test split by default)."""
    spec = ck["extra"].get("index", {"dataset": "world", "split": "test", "n": 2000})
    if spec.get("dataset", "world") == "world":
        return "world", {"n": spec.get("n", 2000), "world_config": spec.get("world_config", {})}
    if spec["dataset"] == "coco":
        return "coco", {"data_root": Path(spec["root"]) if spec.get("root") else None}
    raise RetrieveError(f"unknown index dataset {spec['dataset']!r} in the checkpoint")


def open_index(model, tok, ck: dict, ckpt_path: Path, spec: IndexSpec, gallery: str | None = None,
               data_root: Path | None = None, folder: Path | None = None, rebuild: bool = False,
               progress: bool = False, warn=None) -> EmbeddingIndex:
    """The checkpoint's index of ``gallery`` (default: the one the checkpoint names). A given
    ``folder`` must hold an index of this checkpoint (else :class:`IndexProblem`); the program's
    own folder (:func:`index_folder`) is built when absent and rebuilt, with one warning line, when
    it is unreadable or was made from another checkpoint (``warn(line)``; default: stderr)."""
    from apps import index as ix
    from apps.gallery import load_gallery
    name, kwargs = checkpoint_gallery(ck)
    if gallery is not None and gallery != name:
        name, kwargs = gallery, {}
    if data_root is not None:
        kwargs["data_root"] = data_root
    digest, own = sha256_file(ckpt_path), folder is None
    folder = folder or index_folder(ckpt_path, name, spec.kind)
    if not rebuild:
        try:
            return ix.load(folder, digest, model.cfg.embed_dim)
        except IndexProblem as e:
            if not own:
                raise
            if folder.is_dir() and any(folder.iterdir()):
                line = f"the cached index {folder} cannot be used ({e}); rebuilding it"
                warn(line) if warn else print(f"warning: {line}", file=sys.stderr)
    built = ix.build(model, tok, load_gallery(name, model.cfg.image_size, **kwargs), spec, digest, progress=progress)
    try:
        ix.save(built, folder)
    except OSError:
        pass  # a read-only folder: rebuild next time
    return built


def read_image(path: Path, size: int) -> torch.Tensor:
    """An image file -> uint8 (3, size, size) (shorter side resized, center crop)."""
    from mmsys.data.coco import load_image
    if not path.is_file():
        raise RetrieveError(f"no image file at {path}")
    return load_image(path, size)


def save_results_figure(query: str, query_image, images, scores, captions, out: Path) -> Path:
    """Write the query (text or image) and its top-k images with scores and captions as a PNG."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k, extra = len(images), int(query_image is not None)
    fig, axes = plt.subplots(1, k + extra, figsize=(1.9 * (k + extra), 2.9), squeeze=False)
    if extra:
        axes[0, 0].imshow(query_image.permute(1, 2, 0).numpy())
        axes[0, 0].set_title("query image", fontsize=8)
    for j in range(k):
        ax = axes[0, j + extra]
        ax.imshow(images[j].permute(1, 2, 0).numpy())
        ax.set_title(f"#{j + 1}  cos {float(scores[j]):.2f}", fontsize=8)
        ax.set_xlabel("\n".join(textwrap.wrap(captions[j], 24)[:3]), fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(textwrap.shorten(query, 90), fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def unknown_words(tok, text: str) -> list[str]:
    """The words of ``text`` the tokenizer does not know (they would all read as <unk>)."""
    from mmsys.text import split_words
    return [w for w in split_words(text) if w not in tok.index]


@dataclass
class Results:
    """A query's top k: ``ids`` of gallery images (or, for image->text, of captions, caption i
    describing image i), their cosine ``scores``, and the images and captions to show."""

    query: str
    ids: list[int]
    scores: list[float]
    images: torch.Tensor  # (k, 3, S, S) uint8
    captions: list[str]


def run_query(index: EmbeddingIndex, model, tok, k: int, text: str | None = None, image: torch.Tensor | None = None,
              exclude: int | None = None, to: str = "image", label: str = "") -> Results:
    """Search ``index`` with a ``text`` or a uint8 ``image`` (3, S, S): text->image, image->image
    (``exclude`` a gallery id not to return: the query itself) or image->text (``to="text"``).
    Raises RetrieveError for an empty query, unknown words, or ``k`` out of range."""
    from apps.index import IndexProblem
    n = len(index.gallery)
    if not 1 <= k <= n:
        raise RetrieveError(f"k = {k}: give 1 <= k <= {n} (the gallery's size)")
    try:
        if text is not None:
            if not text.strip():
                raise RetrieveError("the text query is empty: type a description, e.g. 'a red circle on the left'")
            unknown = unknown_words(tok, text)
            if unknown:
                raise RetrieveError(f"the CLIP's tokenizer does not know {', '.join(repr(w) for w in unknown)}: "
                                    f"use words from its training captions (colours, shapes, positions, sizes)")
            scores, ids = index.text_to_image(encode_texts(model, tok, [text]), k)
            query = text
        else:
            q = encode_images(model, image[None])
            scores, ids = index.image_to_text(q, k) if to == "text" else index.image_to_image(q, k, exclude)
            query = f"image query{': ' + label if label else ''}"
    except IndexProblem as e:
        raise RetrieveError(str(e)) from None
    ids_, scores_ = ids[0].tolist(), scores[0].tolist()
    return Results(query, ids_, scores_, index.gallery.images[ids[0]], [index.gallery.captions[i] for i in ids_])


def main(argv=None) -> int:
    from apps.gallery import NAMES
    from apps.index import KINDS, describe
    p = ArgumentParser(prog="python -m apps.retrieve", description=__doc__.split("\n\n")[0])
    p.add_argument("text", nargs="?", help="text query, e.g. 'a red circle on the left'")
    p.add_argument("-k", type=positive_int, default=8, help="how many results (default 8)")
    p.add_argument("--image", help="image query instead of text: an image file, or test:<i> for gallery image i")
    p.add_argument("--to", choices=("image", "text"), default="image",
                   help="for an image query: find images (default) or captions")
    p.add_argument("--checkpoint", type=Path, default=None, help=f"CLIP checkpoint (default {DEFAULT_CHECKPOINT})")
    p.add_argument("--gallery", choices=NAMES, default=None,
                   help="what to search (default: the split the checkpoint's run evaluated, the world's test split)")
    p.add_argument("--kind", choices=KINDS, default="flat", help="Faiss index: flat (exact, default) or hnsw")
    p.add_argument("--ef-search", type=positive_int, default=64, help="HNSW candidates per query (default 64)")
    p.add_argument("--index", type=Path, default=None,
                   help="an index folder to use (refused if made from another checkpoint); default "
                        "<checkpoint dir>/index/<gallery>-<kind>/, built when absent")
    p.add_argument("--out", type=Path, default=None,
                   help="PNG to write (default <checkpoint dir>/retrieve/<query>.png, replaced by the same query)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--data-root", type=Path, default=None, help="folder with cifar10/ or coco/ (or a COCO folder)")
    p.add_argument("--rebuild-index", action="store_true", help="re-embed the gallery even if an index exists")
    a = p.parse_args(argv)
    try:
        if (a.text is None) == (a.image is None):
            raise RetrieveError("give either a text query or --image (not both)")
        m = re.fullmatch(r"test:(\d+)", a.image) if a.image is not None else None
        if a.image is not None and not m and not Path(a.image).is_file():
            raise RetrieveError(f"--image {a.image}: no such image file (or use test:<i> for gallery image i)")
        if a.data_root is not None and not a.data_root.is_dir():
            raise RetrieveError(f"--data-root {a.data_root}: no such folder")
        if a.index is not None and not (a.index / "meta.json").is_file():
            raise RetrieveError(f"--index {a.index}: no index there (no meta.json); leave --index out to build one")
        path = find_checkpoint(a.checkpoint)
        slug = re.sub(r"[^a-z0-9]+", "_", (a.text or a.image).lower()).strip("_")[:60] or "query"
        out = a.out or path.parent / "retrieve" / f"{slug}.png"
        problem = unwritable(out, "--out", create_parents=True) or (a.out and would_overwrite([a.out], a.force))
        if problem:
            raise RetrieveError(problem)
        model, tok, ck = load_clip(path)
        spec = IndexSpec(kind=a.kind, ef_search=a.ef_search)
        index = open_index(model, tok, ck, path, spec, a.gallery, a.data_root, a.index, a.rebuild_index,
                           progress=sys.stderr.isatty())  # a bar while embedding, on a terminal
        qimg = None
        if m:
            if int(m.group(1)) >= len(index.gallery):
                raise RetrieveError(f"{a.image}: the gallery has {len(index.gallery)} images")
            qimg = index.gallery.images[int(m.group(1))]
        elif a.image is not None:
            qimg = read_image(Path(a.image), model.cfg.image_size)
        res = run_query(index, model, tok, min(a.k, len(index.gallery)), a.text, qimg,
                        int(m.group(1)) if m else None, a.to, a.image or "")
        save_results_figure(res.query, qimg, res.images, res.scores, res.captions, out)
    except (RetrieveError, IndexProblem, CheckpointError, DataMissingError) as e:
        return fail(str(e))
    print(f"index: {describe(index.meta)}")
    print(f"query: {res.query}")
    what = "caption" if a.image is not None and a.to == "text" else "image"
    for r, (i, s, c) in enumerate(zip(res.ids, res.scores, res.captions), 1):
        print(f"{r:3d}. {what} {i:5d}  cos {s:.3f}  {c}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
