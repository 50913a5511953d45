"""MS-COCO captions (official json + image folder) as a :class:`DataSplit`.

Layout at ``root`` (as unzipped from https://cocodataset.org/#download)::

    root/annotations/captions_<split>.json
    root/<split>/<file_name>.jpg

Annotations may name images that are not on disk (e.g. the full val2017 caption file next to a
subset of its images): those are skipped and counted, never silently dropped.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from ..images import load_image, resize_center_crop  # noqa: F401  (re-exported: the one resize)
from .split import DataMissingError, DataSplit


def _how_to_get(root: Path, split: str) -> str:
    return (f"Download annotations_trainval2017.zip and {split}.zip from "
            f"https://cocodataset.org/#download and unzip them into {root}, so that "
            f"{root}/annotations/captions_{split}.json and {root}/{split}/ exist "
            f"(or pass --data-root / annotations=...).")


def _read_coco(ann_file: Path):
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints "loading annotations..."
        return COCO(str(ann_file))


def load_coco_captions(root, split: str = "train2017", image_size: int = 64,
                       annotations=None, limit: int | None = None) -> DataSplit:
    """Load COCO images with all their reference captions.

    Args:
        root: COCO folder holding ``<split>/`` images and ``annotations/``.
        split: "train2017" or "val2017" (any folder name with a matching caption json works).
        image_size: output side S (shorter side resized, then center-cropped).
        annotations: caption json path; default ``root/annotations/captions_<split>.json``.
        limit: load at most this many (present) images, in image-id order.

    Returns:
        DataSplit "coco/<split>": images ``(N, 3, S, S)`` uint8, captions: per image the list of
        its official captions (stripped), in annotation-id order. meta: ``image_ids``,
        ``file_names`` and the counts below. identity: ``source``, ``annotations``, ``format``,
        ``n_annotated_images`` (images in the json), ``n_missing_images`` (their files absent),
        ``n_loaded`` and ``image_size`` (plus ``limit``).
    """
    root = Path(root).expanduser()
    ann_file = Path(annotations).expanduser() if annotations else \
        root / "annotations" / f"captions_{split}.json"
    if not ann_file.is_file():
        raise DataMissingError(f"COCO captions ({split}) not found: no {ann_file}. "
                               + _how_to_get(root, split))
    coco = _read_coco(ann_file)
    image_dir = root / split
    ids = sorted(coco.getImgIds())
    present = [i for i in ids if (image_dir / coco.imgs[i]["file_name"]).is_file()]
    n_missing = len(ids) - len(present)
    if not present:
        raise DataMissingError(f"COCO {split}: none of the {len(ids)} images named in {ann_file} "
                               f"is under {image_dir}. " + _how_to_get(root, split))
    keep = present[:limit] if limit is not None else present

    images, captions, files = [], [], []
    for i in keep:
        name = coco.imgs[i]["file_name"]
        images.append(load_image(image_dir / name, image_size))
        anns = sorted(coco.imgToAnns.get(i, []), key=lambda a: a["id"])
        captions.append([a["caption"].strip() for a in anns])
        files.append(name)

    counts = {"n_annotated_images": len(ids), "n_missing_images": n_missing,
              "n_loaded": len(keep)}
    identity = {"source": str(image_dir), "annotations": str(ann_file), "format": "coco-captions",
                **counts, "image_size": image_size}
    if limit is not None:
        identity["limit"] = limit
    meta = {"image_ids": list(keep), "file_names": files, **counts}
    return DataSplit(f"coco/{split}", torch.stack(images), captions=captions,
                     identity=identity, meta=meta)
