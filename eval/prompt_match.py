"""Prompt match: does a generated image show what its prompt asks for?

World prompts read ``"a {size} {colour} {shape} {position}"`` (the canonical captions of
single-object scenes, :func:`eval.reference.data.world.canonical_caption`), e.g. "a large red circle on the
left", "a small blue star at the top right". :func:`parse_prompt` turns one into the expected
attributes (indices into the world's SHAPES, COLOURS, SIZES, COLUMNS, ROWS); an automatic judge
(an attribute classifier trained on real world images) predicts the same attributes for each
generated image; :func:`match_rates` compares them.

A sample *matches* when its colour, shape and position (column and row) are all right; size is
reported on its own and is not part of the match (the spec asks for colour, shape and position).
"""

from __future__ import annotations

import re

import torch

from eval.reference.data.world import (COLOURS, COLUMNS, ROWS, SHAPES, SIZE_WORDS, WorldConfig, canonical_caption,
                                       make_split, scene_row)

ATTRIBUTES = ("shape", "colour", "size", "col", "row")
_SIZE = {w: s for s, words in SIZE_WORDS.items() for w in words}
_POS = re.compile(r"\b(?:(?P<center>in the (?:center|middle))"
                  r"|on the (?P<side>left|right)"
                  r"|at the (?P<edge>top|bottom)(?: (?P<edge_h>left|right))?"
                  r"|in the (?P<corner_v>top|bottom) (?P<corner_h>left|right) corner)\b")


def parse_prompt(prompt: str) -> dict:
    """World prompt -> expected attributes ``{shape, colour, size, col, row}`` (ints, or None
    where the prompt does not say). "on the left" is column 0, row 1 (middle); "at the top" is
    column 1 (center), row 0; "in the center" is (1, 1)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    out = {k: None for k in ATTRIBUTES}
    for w in words:
        if w in SHAPES and out["shape"] is None:
            out["shape"] = SHAPES.index(w)
        elif w in COLOURS and out["colour"] is None:
            out["colour"] = COLOURS.index(w)
        elif w in _SIZE and out["size"] is None:
            out["size"] = _SIZE[w]
    m = _POS.search(" ".join(words))
    if m:
        if m["center"]:
            out["col"], out["row"] = 1, 1
        elif m["side"]:
            out["col"], out["row"] = COLUMNS.index(m["side"]), 1
        elif m["edge"]:
            out["row"] = ROWS.index(m["edge"])
            out["col"] = COLUMNS.index(m["edge_h"]) if m["edge_h"] else 1
        else:
            out["col"], out["row"] = COLUMNS.index(m["corner_h"]), ROWS.index(m["corner_v"])
    return out


def world_prompts(split: str = "test", n: int = 100, start: int = 0, world=None) -> tuple[list[str], dict]:
    """The grader's prompts: canonical captions ``"a {size} {colour} {shape} {position}"`` of
    single-object world scenes ``[start, start + n)`` of ``split``.

    Returns (n prompts, the scene table of those scenes). ``split="heldout"`` gives the held-out
    (colour, shape) compositions never seen in training."""
    s = make_split(split, start + n, world or WorldConfig(), single=True, captions=False)
    scenes = {k: v[start:] for k, v in s.meta["scenes"].items()}
    return [canonical_caption(scene_row(scenes, i)) for i in range(n)], scenes


def expected_table(prompts: list[str]) -> dict[str, torch.Tensor]:
    """Parse many prompts: attribute -> (N,) long, -1 where a prompt does not say."""
    rows = [parse_prompt(p) for p in prompts]
    return {k: torch.tensor([-1 if r[k] is None else r[k] for r in rows], dtype=torch.long) for k in ATTRIBUTES}


def match_table(prompts: list[str], predicted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sample booleans (N,): colour, shape, size, position (col and row) and ``all`` (colour,
    shape and position). Attributes a prompt does not mention count as matched.

    Args:
        prompts: N world prompts.
        predicted: the judge's attributes, each (N,) long (keys of :data:`ATTRIBUTES`).
    """
    exp = expected_table(prompts)
    n = len(prompts)
    for k in ATTRIBUTES:
        if k not in predicted or len(predicted[k]) != n:
            raise ValueError(f"predicted['{k}'] must hold {n} values")
    ok = {k: (exp[k] < 0) | (predicted[k].long().cpu() == exp[k]) for k in ATTRIBUTES}
    position = ok["col"] & ok["row"]
    return {"colour": ok["colour"], "shape": ok["shape"], "size": ok["size"], "position": position,
            "all": ok["colour"] & ok["shape"] & position}


def match_rates(prompts: list[str], predicted: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fractions of samples matching: ``prompt_match`` (colour & shape & position) and per
    attribute (``colour``, ``shape``, ``size``, ``position``), plus ``n``."""
    t = match_table(prompts, predicted)
    out = {"prompt_match": t["all"].float().mean().item()}
    out.update({f"{k}_match": t[k].float().mean().item() for k in ("colour", "shape", "position", "size")})
    out["n"] = len(prompts)
    return out


def colour_fraction(predicted: dict[str, torch.Tensor], colour: str) -> float:
    """Fraction of images the judge sees as ``colour`` (e.g. "red")."""
    return (predicted["colour"].long() == COLOURS.index(colour)).float().mean().item()


def heldout_pairs(prompts: list[str]) -> list[tuple[str, str]]:
    """The (colour, shape) pair each prompt asks for (to list held-out compositions in reports)."""
    e = [parse_prompt(p) for p in prompts]
    return sorted({(COLOURS[r["colour"]], SHAPES[r["shape"]]) for r in e if r["colour"] is not None})


# ----------------------------------------------------------------------------- class prompts (CIFAR-10)

def parse_class(prompt: str, classes: list[str]) -> int | None:
    """'a photo of a cat' -> index of 'cat' in ``classes`` (None if no class name occurs)."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    hits = [i for i, c in enumerate(classes) if c.lower() in words]
    return hits[0] if hits else None


def class_match_table(prompts: list[str], predicted: dict[str, torch.Tensor], classes: list[str]) -> dict:
    """Per-sample bool (N,) ``all``: the judge's ``predicted["class"]`` is the prompt's class."""
    exp = torch.tensor([-1 if (c := parse_class(p, classes)) is None else c for p in prompts])
    return {"all": predicted["class"].long().cpu() == exp}


def class_match_rates(prompts: list[str], predicted: dict[str, torch.Tensor], classes: list[str]) -> dict:
    """``{"prompt_match": fraction whose predicted class is the prompt's class, "n"}``."""
    return {"prompt_match": class_match_table(prompts, predicted, classes)["all"].float().mean().item(),
            "n": len(prompts)}
