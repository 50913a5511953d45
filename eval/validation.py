"""A validation split carved from training data, so that a recipe is chosen without the test set.

The test split is for the gate alone, measured once per recipe; every choice between recipes
(steps, augmentation, an initialisation) is made on validation accuracy. Datasets without a
validation split of their own (CIFAR-10) hold out the last training images of each class.
"""

from __future__ import annotations

import torch

from eval.reference.data.split import DataSplit

RULE = "recipes are chosen on these numbers; the test split is the gates' alone, measured once per recipe"


def record(split_name: str, n: int, metrics: dict[str, float], protocol: str) -> dict:
    """What a run reports as ``RunResult.validation``: the validation split's name and size, the
    numbers measured on it (the gates' own metrics where they apply), how, and :data:`RULE`."""
    return {"split": split_name, "n": n, "metrics": metrics, "protocol": protocol, "rule": RULE}


def hold_out_last(split: DataSplit, n_val: int) -> tuple[DataSplit, DataSplit]:
    """(train, val) of a split without classes (a captioned one, COCO's): ``val`` is its last
    ``n_val`` images (with their captions and meta rows), ``train`` the rest, both in order."""
    if not 0 < n_val < len(split):
        raise ValueError(f"{split.name}: cannot hold out {n_val} of {len(split)} images")
    k = len(split) - n_val
    held = {"from": split.name, "n_val": n_val, "rule": f"last {n_val} images"}

    def part(sl: slice, name: str, role: str) -> DataSplit:
        meta = {key: v[sl] for key, v in split.meta.items() if hasattr(v, "__getitem__") and len(v) == len(split)}
        return DataSplit(name, split.images[sl], None if split.labels is None else split.labels[sl], split.classes,
                         None if split.captions is None else split.captions[sl],
                         {**split.identity, "held_out": {**held, "this_part": role}}, meta)

    return (part(slice(0, k), split.name, "training images left after holding out"),
            part(slice(k, None), split.name.rsplit("/", 1)[0] + "/val", "validation images"))


def hold_out(split: DataSplit, n_val: int) -> tuple[DataSplit, DataSplit]:
    """(train, val): ``val`` is the last ``n_val / C`` images of each of the C classes, in the
    split's own order; ``train`` is the rest, in order. Per class, because a loader may list a
    split class by class (an ImageFolder tree does), where the last ``n_val`` images would all be
    one class.

    split: labelled, ``(N, 3, H, W)`` uint8 with ``labels`` (N,) in 0..C-1 (C = len(classes)).
    n_val: a multiple of C, each class having more than ``n_val / C`` images.
    Both halves record ``held_out`` in their identity (what was held out, from which split)."""
    if split.labels is None or not split.classes:
        raise ValueError(f"{split.name}: holding out a validation split needs class labels")
    n_classes = len(split.classes)
    if n_val <= 0 or n_val % n_classes:
        raise ValueError(f"n_val={n_val} must be a positive multiple of the {n_classes} classes")
    per_class = n_val // n_classes
    is_val = torch.zeros(len(split), dtype=torch.bool)
    for c in range(n_classes):
        idx = (split.labels == c).nonzero().flatten()
        if len(idx) <= per_class:
            raise ValueError(f"{split.name}: class {split.classes[c]!r} has {len(idx)} images, "
                             f"cannot hold out {per_class}")
        is_val[idx[-per_class:]] = True
    held = {"from": split.name, "n_val": n_val, "rule": f"last {per_class} images of each class"}

    def part(mask: torch.Tensor, name: str, role: str) -> DataSplit:
        return DataSplit(name, split.images[mask], split.labels[mask], split.classes,
                         identity={**split.identity, "held_out": {**held, "this_part": role}})

    return (part(~is_val, split.name, "training images left after holding out"),
            part(is_val, split.name.rsplit("/", 1)[0] + "/val", "validation images"))
