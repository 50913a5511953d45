"""Limitation probes for a contrastive image/text model on the embedded world.

For each test image we build its canonical caption and a minimally changed caption that is
false for the image, then ask whether the model scores the true caption higher (cosine with the
image embedding). Chance is 50 %. Bag-of-words models are known to fail exactly these (Yuksekgonul
et al. 2023, "When and why vision-language models behave like bags-of-words").

- ``relation``: two different objects, relation inverted, objects kept in place
  ("a red circle left of a blue square" -> "a red circle right of a blue square"); the same words
  in a different order when the relation words are swapped for their inverse.
- ``binding``: two objects of different colours and shapes, colours bound to the wrong shapes
  ("a red circle left of a blue square" -> "a blue circle left of a red square"): the same bag of
  words.
- ``count``: one object vs a pair of identical objects ("a small red circle on the left" <->
  "two small red circles side by side").

Perturbed captions are generated with the world's own caption grammar (the grader's copy,
:func:`eval.reference.data.world.canonical_caption`) from an edited scene row, so true and false
captions differ only in the probed property.
"""

from __future__ import annotations

from typing import Callable

import torch

from eval.reference.data.world import INVERSE, canonical_caption, scene_row

PROBES = ("relation", "binding", "count")


def perturb(row: dict, probe: str) -> str | None:
    """The false caption of scene ``row`` for ``probe``, or None when the probe does not apply."""
    two = row["n_objects"] == 2
    twin = two and row["shape"][0] == row["shape"][1] and row["colour"][0] == row["colour"][1]
    new = {k: list(v) if isinstance(v, list) else v for k, v in row.items()}
    if probe == "relation":
        if not two or twin:
            return None
        new["relation"] = INVERSE[row["relation"]]
    elif probe == "binding":
        if not two or row["colour"][0] == row["colour"][1] or row["shape"][0] == row["shape"][1]:
            return None
        new["colour"] = [row["colour"][1], row["colour"][0]]
    elif probe == "count":
        if not two:  # one object -> "two ... side by side" (a twin of object A)
            new.update(n_objects=2, relation=1)
            for k in ("shape", "colour", "size"):
                new[k] = [row[k][0], row[k][0]]
        elif twin:  # a twin pair -> one object, where object A is
            new["n_objects"], new["relation"] = 1, 0
        else:
            return None
    else:
        raise ValueError(f"unknown probe {probe!r}: choose one of {PROBES}")
    false = canonical_caption(new)
    return false if false != canonical_caption(row) else None


def build_probe_pairs(scenes: dict[str, torch.Tensor], probe: str) -> tuple[list[int], list[str], list[str]]:
    """(image indices, true captions, false captions) of every scene the probe applies to."""
    idx, true, false = [], [], []
    for i in range(len(scenes["shape"])):
        row = scene_row(scenes, i)
        f = perturb(row, probe)
        if f is not None:
            idx.append(i)
            true.append(canonical_caption(row))
            false.append(f)
    return idx, true, false


def preference_rate(image_emb: torch.Tensor, true_emb: torch.Tensor, false_emb: torch.Tensor) -> float:
    """Fraction of rows where cos(image, true) > cos(image, false) (ties count as failures).

    All inputs ``(N, E)``; normalised here."""
    n = torch.nn.functional.normalize
    i, t, f = n(image_emb.float(), dim=-1), n(true_emb.float(), dim=-1), n(false_emb.float(), dim=-1)
    return ((i * t).sum(-1) > (i * f).sum(-1)).double().mean().item()


def run_probes(image_emb: torch.Tensor, scenes: dict[str, torch.Tensor],
               encode_text: Callable[[list[str]], torch.Tensor]) -> dict[str, dict]:
    """All probes on a split: ``{probe: {"rate": float, "n": int, "example": [true, false]}}``.

    Args:
        image_emb: ``(N, E)`` embeddings of the split's images (row i = scene i).
        scenes: the split's scene table (``DataSplit.meta["scenes"]``).
        encode_text: list of T captions -> ``(T, E)`` embeddings.
    """
    out = {}
    for probe in PROBES:
        idx, true, false = build_probe_pairs(scenes, probe)
        if not idx:
            out[probe] = {"rate": float("nan"), "n": 0, "example": None}
            continue
        rate = preference_rate(image_emb[idx], encode_text(true), encode_text(false))
        out[probe] = {"rate": rate, "n": len(idx), "example": [true[0], false[0]]}
    return out
