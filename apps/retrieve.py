"""Retrieval demo: find images by text (or by image) with a trained CLIP.

    python -m apps.retrieve "a red circle on the left" -k 8
    python -m apps.retrieve --image runs/m2/some.png -k 8      # image -> image
    python -m apps.retrieve --image test:17 -k 8               # image 17 of the index as query

Loads the checkpoint (default ``runs/m2/checkpoint.pt``, written by ``python grader.py m2``),
builds the embedding index of the gallery the checkpoint names in ``extra["index"]`` (the world's
test split by default; COCO val2017 for a COCO-trained model, found at its recorded root or at
``--data-root``) or loads it from ``<checkpoint dir>/retrieval_index.pt`` when that file was made
from the same checkpoint (checked by sha256; a corrupt cache is rebuilt with a warning), and
writes a PNG grid of the top-k images. An existing ``--out`` file is replaced only with
``--force``; the default per-query figure is the program's own and is replaced by the same query.
Every option is checked before the model is loaded (:mod:`apps.cli`): one ``error:`` line, exit 2.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from apps.cli import ArgumentParser, fail, missing_checkpoint, positive_int, unwritable, would_overwrite
from mmsys.checkpoint import CheckpointError, sha256_file
from mmsys.clip import encode_images, encode_texts, load_clip
from mmsys.data.paths import atomic_torch_save
from mmsys.data.split import DataMissingError

DEFAULT_CHECKPOINT = Path("runs/m2/checkpoint.pt")
REPO_ROOT = Path(__file__).resolve().parents[1]


class RetrieveError(Exception):
    """A usage problem; the message says what to do."""


def find_checkpoint(path: Path | None) -> Path:
    """The given checkpoint, or the grader's default output (relative to cwd, then the repo)."""
    candidates = (path,) if path is not None else (DEFAULT_CHECKPOINT, REPO_ROOT / DEFAULT_CHECKPOINT)
    for p in candidates:
        if p.is_file():
            return p
    raise RetrieveError(missing_checkpoint(candidates[0], "CLIP", "m2"))


def gallery(spec: dict, image_size: int, data_root: Path | None):
    """(images uint8 (N, 3, S, S), first caption of each) of the index described by ``spec``."""
    if spec.get("dataset", "world") == "world":
        from mmsys.data.world import WorldConfig, make_split
        split = make_split(spec.get("split", "test"), spec.get("n", 2000), WorldConfig(**spec.get("world_config", {})))
    elif spec["dataset"] == "coco":
        from mmsys.data.coco import load_coco_captions
        root = data_root or Path(spec["root"])
        split = load_coco_captions(root, spec.get("split", "val2017"), image_size)
    else:
        raise RetrieveError(f"unknown index dataset {spec['dataset']!r} in the checkpoint")
    return split.images, [cs[0] if cs else "" for cs in split.captions]


INDEX_KEYS = ("sha256", "spec", "images", "captions", "emb")


def build_or_load_index(model, ck: dict, ckpt_path: Path, data_root: Path | None, rebuild: bool = False) -> dict:
    """{"sha256", "spec", "images" (N,3,S,S) uint8, "captions", "emb" (N, E)}; cached next to the
    checkpoint (written atomically: a reader never sees half a file). A cache that cannot be
    read (truncated, not a torch file, wrong contents) is rebuilt with a warning line."""
    spec = ck["extra"].get("index", {"dataset": "world", "split": "test", "n": 2000})
    digest, cache = sha256_file(ckpt_path), ckpt_path.parent / "retrieval_index.pt"
    if cache.is_file() and not rebuild:
        index = _read_index(cache)
        if index is not None and index["sha256"] == digest and index["spec"] == spec:
            return index
    images, captions = gallery(spec, model.cfg.image_size, data_root)
    index = {"sha256": digest, "spec": spec, "images": images, "captions": captions,
             "emb": encode_images(model, images)}
    try:
        atomic_torch_save(index, cache)
    except OSError:
        pass  # a read-only folder: rebuild next time
    return index


def _read_index(cache: Path) -> dict | None:
    """The cached index, or None (after a warning on stderr) when the file is not a readable one."""
    try:
        index = torch.load(cache, weights_only=True)
        ok = isinstance(index, dict) and all(k in index for k in INDEX_KEYS) \
            and torch.is_tensor(index["emb"]) and torch.is_tensor(index["images"]) \
            and len(index["emb"]) == len(index["images"]) == len(index["captions"])
        problem = None if ok else "not a retrieval index"
    except Exception as e:  # noqa: BLE001 -- any unreadable file (UnpicklingError, EOFError, RuntimeError ...)
        problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if problem:
        print(f"warning: the cached retrieval index {cache} is unreadable ({problem}); rebuilding it",
              file=sys.stderr)
        return None
    return index


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


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m apps.retrieve", description=__doc__.split("\n\n")[0])
    p.add_argument("text", nargs="?", help="text query, e.g. 'a red circle on the left'")
    p.add_argument("-k", type=positive_int, default=8, help="how many images to show (default 8)")
    p.add_argument("--image", help="image query instead of text: an image file, or test:<i> for index image i")
    p.add_argument("--checkpoint", type=Path, default=None, help=f"CLIP checkpoint (default {DEFAULT_CHECKPOINT})")
    p.add_argument("--out", type=Path, default=None,
                   help="PNG to write (default <checkpoint dir>/retrieve/<query>.png, replaced by the same query)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--data-root", type=Path, default=None, help="COCO folder, for a COCO-trained checkpoint")
    p.add_argument("--rebuild-index", action="store_true", help="re-embed the gallery even if a cached index exists")
    a = p.parse_args(argv)
    try:
        if (a.text is None) == (a.image is None):
            raise RetrieveError("give either a text query or --image (not both)")
        m = re.fullmatch(r"test:(\d+)", a.image) if a.image is not None else None
        if a.image is not None and not m and not Path(a.image).is_file():
            raise RetrieveError(f"--image {a.image}: no such image file (or use test:<i> for index image i)")
        if a.data_root is not None and not a.data_root.is_dir():
            raise RetrieveError(f"--data-root {a.data_root}: no such folder")
        path = find_checkpoint(a.checkpoint)
        slug = re.sub(r"[^a-z0-9]+", "_", (a.text or a.image).lower()).strip("_")[:60] or "query"
        out = a.out or path.parent / "retrieve" / f"{slug}.png"
        problem = unwritable(out, "--out", create_parents=True) or (a.out and would_overwrite([a.out], a.force))
        if problem:
            raise RetrieveError(problem)
        model, tok, ck = load_clip(path)
        index = build_or_load_index(model, ck, path, a.data_root, a.rebuild_index)
        qimg = None
        if a.text is not None:
            query, q = a.text, encode_texts(model, tok, [a.text])[0]
        else:
            if m and int(m.group(1)) >= len(index["images"]):
                raise RetrieveError(f"{a.image}: the index has {len(index['images'])} images")
            qimg = index["images"][int(m.group(1))] if m else read_image(Path(a.image), model.cfg.image_size)
            query, q = f"image query: {a.image}", encode_images(model, qimg[None])[0]
        sims = index["emb"] @ q
        if qimg is not None and m:
            sims[int(m.group(1))] = float("-inf")  # do not return the query itself
        top = sims.topk(min(a.k, len(sims)))
        caps = [index["captions"][i] for i in top.indices.tolist()]
        save_results_figure(query, qimg, index["images"][top.indices], top.values, caps, out)
    except (RetrieveError, CheckpointError, DataMissingError) as e:
        return fail(str(e))
    print(f"query: {query}")
    for r, (i, s) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
        print(f"{r:3d}. image {i:5d}  cos {s:.3f}  {index['captions'][i]}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
