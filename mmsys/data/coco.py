"""MS-COCO captions (official json + image folder) as a :class:`DataSplit`.

Layout at ``root`` (as unzipped from https://cocodataset.org/#download)::

    root/annotations/captions_<split>.json
    root/<split>/<file_name>.jpg

Annotations may name images that are not on disk (e.g. the full val2017 caption file next to a
subset of its images): those are skipped and counted, never silently dropped. A caption file
that is truncated or lacks a field, or an image that cannot be decoded, is reported in one line
naming the file and the entry (DataMissingError).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

from ..images import load_image, resize_center_crop  # noqa: F401  (re-exported: the one resize)
from .split import DataMissingError, DataSplit


def _how_to_get(root: Path, split: str) -> str:
    return (f"Download annotations_trainval2017.zip and {split}.zip from "
            f"https://cocodataset.org/#download and unzip them into {root}, so that "
            f"{root}/annotations/captions_{split}.json and {root}/{split}/ exist "
            f"(or pass --data-root / annotations=...).")


def _bad(ann_file: Path, what: str) -> DataMissingError:
    return DataMissingError(f"COCO caption file {ann_file}: {what}; restore it from "
                            f"annotations_trainval2017.zip (https://cocodataset.org/#download)")


def _check_entries(ann_file: Path, dataset) -> None:
    """DataMissingError naming the first entry of a parsed caption json that lacks what the
    loader reads: images[k] needs ``id`` and ``file_name``, annotations[k] ``id``, ``image_id``
    and a string ``caption``."""
    if not isinstance(dataset, dict):
        raise _bad(ann_file, f"the top level is a JSON {type(dataset).__name__}, not an object")
    for section, fields in (("images", ("id", "file_name")), ("annotations", ("id", "image_id", "caption"))):
        entries = dataset.get(section, [])
        if not isinstance(entries, list):
            raise _bad(ann_file, f"'{section}' is a JSON {type(entries).__name__}, not a list")
        for k, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise _bad(ann_file, f"{section}[{k}] is not an object")
            missing = [f for f in fields if f not in entry]
            if missing:
                ident = f" (id {entry['id']})" if "id" in entry else ""
                raise _bad(ann_file, f"{section}[{k}]{ident} has no {', '.join(map(repr, missing))}")
            if section == "annotations" and not isinstance(entry["caption"], str):
                raise _bad(ann_file, f"{section}[{k}] (id {entry['id']}) has a caption that is not a string")


def _read_coco(ann_file: Path):
    """A pycocotools ``COCO`` index of ``ann_file``, its entries checked first: DataMissingError
    naming the file (and the entry, or the line and column of a JSON error) when it is
    unreadable, truncated or lacks a field."""
    from pycocotools.coco import COCO
    try:
        with open(ann_file, "rb") as f:
            dataset = json.load(f)
    except json.JSONDecodeError as e:
        raise _bad(ann_file, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}; "
                   f"truncated?)") from e
    except (OSError, UnicodeDecodeError) as e:
        raise _bad(ann_file, f"cannot be read ({(str(e).splitlines() or [type(e).__name__])[0]})") from e
    _check_entries(ann_file, dataset)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints "creating index..."
        coco.createIndex()
    return coco


def _load_one(path: Path, size: int, image_id, ann_file: Path) -> torch.Tensor:
    """:func:`load_image`, or DataMissingError naming the file and its entry in ``ann_file``."""
    try:
        return load_image(path, size)
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataMissingError(f"cannot read the COCO image {path} (image id {image_id} in {ann_file}): "
                               f"{reason}; replace it, or delete it to have it skipped as missing") from e


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
        images.append(_load_one(image_dir / name, image_size, i, ann_file))
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
