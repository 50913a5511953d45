"""The galleries an index can be built from: the world's test split (the default: no files), the
CIFAR-10 test set and COCO val2017 where the data is present.

Each is a :class:`apps.index.Gallery`: images at the CLIP's input size, one caption per image
(the world's and COCO's first reference caption; CIFAR-10's "a photo of a {class}"), and the
identity of the split (what an index's meta.json records).
"""

from __future__ import annotations

from pathlib import Path

from apps.index import Gallery, IndexProblem

NAMES = ("world", "cifar10", "coco")
CIFAR_CAPTION = "a photo of a {}"


def load_gallery(name: str, image_size: int, data_root: Path | None = None, n: int | None = None,
                 world_config: dict | None = None) -> Gallery:
    """The gallery ``name`` (:data:`NAMES`) at ``image_size``; ``n`` its first images (None: the
    whole split; the world's test split is 2,000 by default). CIFAR-10 and COCO are read from
    ``data_root`` (or the shared data folder); their absence is an :class:`IndexProblem` that
    says where to put them."""
    from mmsys.data.paths import shared_data_root
    from mmsys.data.split import DataMissingError
    if name == "world":
        from mmsys.data.world import WorldConfig, make_split
        cfg = world_config or {}
        split = make_split("test", n or 2000, WorldConfig(**cfg))
        return Gallery(split.images, [cs[0] for cs in split.captions],
                       {"dataset": "world", "split": "test", "n": len(split), "world_config": cfg})
    root = Path(data_root) if data_root is not None else shared_data_root()
    try:
        if name == "cifar10":
            from mmsys.data.cifar import load_cifar10
            from mmsys.images import resize_uint8
            where = (root / "cifar10") if root is not None and (root / "cifar10").exists() else root
            split = load_cifar10(where, "test")
            images, labels = resize_uint8(split.images[:n], image_size), split.labels[:n]
            return Gallery(images, [CIFAR_CAPTION.format(split.classes[y]) for y in labels.tolist()],
                           {"dataset": "cifar10", "split": "test", "n": len(images), "root": str(where)})
        if name == "coco":
            from mmsys.data.coco import load_coco_captions
            where = root / "coco" if root is not None and (root / "coco").exists() else root
            split = load_coco_captions(where, "val2017", image_size, limit=n)
            return Gallery(split.images, [cs[0] if cs else "" for cs in split.captions],
                           {"dataset": "coco", "split": "val2017", "n": len(split), "root": str(where)})
    except (DataMissingError, FileNotFoundError, TypeError) as e:
        raise IndexProblem(f"gallery {name}: its data is not there ({str(e).splitlines()[0]}); pass --data-root "
                           f"with a {name} folder, or use the world gallery (no files)") from None
    raise IndexProblem(f"gallery {name!r}: give one of {', '.join(NAMES)}")
