"""The embedded world: procedurally generated 32x32 scenes with captions, no files needed.

Every milestone's default dataset. A scene holds one or two objects drawn from

- 10 shapes (the m1 classes): circle, square, triangle, diamond, cross, ring, star, hexagon,
  crescent, heart;
- 8 colours: red, green, blue, yellow, purple, orange, cyan, white;
- 2 sizes (small, large) and a 3x3 grid of positions (left/center/right x top/middle/bottom),

with jitter in position, size, rotation and colour, a random gradient background and pixel noise.
Each image has 5 captions from varied templates and synonyms ("a small red circle to the left of
a blue square", "on the left there is a tiny red circle", ...).

Held-out compositions: the 10 (colour, shape) pairs in :data:`HELDOUT` never appear in the
train, val or test splits, in images or captions. The ``heldout`` split shows exactly those pairs
(single objects), for zero-shot classification (m2) and compositional generation (m5).

Splits are fixed functions of ``(seed, split, index)``: images are made in chunks of
:data:`CHUNK`, each seeded from ``(seed, split, chunk)``, so a smaller split is a prefix of a
larger one and every run sees the same data. Default sizes: :data:`SPLIT_SIZES`.
"""

from __future__ import annotations

import math
import random
import re
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.split import DataSplit

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon", "crescent", "heart")
PLURALS = {s: s + ("es" if s == "cross" else "s") for s in SHAPES}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
RGB = torch.tensor([[220, 40, 40], [40, 175, 60], [50, 90, 235], [235, 220, 50], [150, 60, 210],
                    [245, 140, 30], [40, 215, 225], [240, 240, 240]], dtype=torch.float32)
SIZES = ("small", "large")
RADIUS = (4.5, 7.5)  # pixels, before jitter
COLUMNS = ("left", "center", "right")
ROWS = ("top", "middle", "bottom")
CENTERS = (8.5, 16.0, 23.5)  # pixel coordinate of each grid column / row
# Held out of train/val/test: one pair per shape, so every shape and colour is still seen.
HELDOUT = (("red", "circle"), ("yellow", "square"), ("cyan", "triangle"), ("green", "diamond"),
           ("purple", "cross"), ("white", "ring"), ("blue", "star"), ("orange", "hexagon"),
           ("red", "crescent"), ("yellow", "heart"))
HELDOUT_COLOUR = torch.tensor([COLOURS.index(c) for c, s in sorted(HELDOUT, key=lambda p: SHAPES.index(p[1]))])
SPLITS = ("train", "val", "test", "heldout")
SPLIT_SIZES = {"train": 50_000, "val": 2_000, "test": 2_000, "heldout": 1_000}
CHUNK = 1024
# relation codes for two-object scenes: object A is <relation> object B
RELATIONS = ("none", "left of", "right of", "above", "below")


@dataclass(frozen=True)
class WorldConfig:
    """Which scenes a split holds. ``p_two`` is the share of two-object scenes, ``p_twin``
    the share of those whose two objects are identical ("two red circles")."""

    seed: int = 0
    image_size: int = 32
    p_two: float = 0.5
    p_twin: float = 0.1
    n_captions: int = 5


# ----------------------------------------------------------------------------- scene sampling

def _split_seed(seed: int, split: str, chunk: int) -> int:
    return zlib.crc32(f"mmsys-world/{seed}/{split}/{chunk}".encode())


def sample_scenes(n: int, split: str, g: torch.Generator, cfg: WorldConfig) -> dict[str, torch.Tensor]:
    """Sample ``n`` scene descriptions. Returns a table of tensors:
    shape, colour, size, col, row: (n, 2) long (slot 1 unused when n_objects == 1);
    n_objects, relation (index into RELATIONS): (n,) long; jitter: dx, dy, dr, angle (n, 2) float."""
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    ri = lambda hi, *s: torch.randint(hi, s, generator=g)  # noqa: E731
    shape, size = ri(len(SHAPES), n, 2), ri(2, n, 2)
    if split == "heldout":  # single objects showing a held-out composition
        two = torch.zeros(n, dtype=torch.bool)
        colour = HELDOUT_COLOUR[shape]
    else:
        two = r(n) < cfg.p_two
        colour = ri(len(COLOURS), n, 2)
        banned = colour == HELDOUT_COLOUR[shape]  # redraw uniformly among the 7 allowed colours
        colour = torch.where(banned, (HELDOUT_COLOUR[shape] + 1 + ri(7, n, 2)) % len(COLOURS), colour)
        twin = two & (r(n) < cfg.p_twin)
        shape[twin, 1], colour[twin, 1], size[twin, 1] = shape[twin, 0], colour[twin, 0], size[twin, 0]
    col, row = ri(3, n, 2), ri(3, n, 2)
    # two objects: side by side (A in the left or right column, B in the other) or stacked
    horizontal = r(n) < 0.5
    a_first = r(n) < 0.5  # A on the left (horizontal) or on top (vertical)
    line = ri(3, n)  # the shared row (horizontal) or column (vertical)
    first, last = torch.where(a_first, 0, 2), torch.where(a_first, 2, 0)
    col[:, 0] = torch.where(two & horizontal, first, torch.where(two, line, col[:, 0]))
    col[:, 1] = torch.where(horizontal, last, line)
    row[:, 0] = torch.where(two & ~horizontal, first, torch.where(two, line, row[:, 0]))
    row[:, 1] = torch.where(horizontal, line, last)
    relation = torch.where(horizontal, torch.where(a_first, 1, 2), torch.where(a_first, 3, 4))
    relation = torch.where(two, relation, 0)
    return {"n_objects": 1 + two.long(), "shape": shape, "colour": colour, "size": size,
            "col": col, "row": row, "relation": relation,
            "dx": (r(n, 2) - 0.5) * 2.0, "dy": (r(n, 2) - 0.5) * 2.0,
            "dr": (r(n, 2) - 0.5) * 1.0, "angle": (r(n, 2) - 0.5) * math.radians(30),
            "tint": (r(n, 2, 3) - 0.5) * 40}


# ----------------------------------------------------------------------------- rendering

def _shape_mask(shape: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-test of one shape in object-local units (radius 1, v pointing up)."""
    rho, phi = torch.sqrt(u * u + v * v), torch.atan2(v, u)
    if shape == 0:  # circle
        return rho <= 1
    if shape == 1:  # square
        return torch.maximum(u.abs(), v.abs()) <= 0.82
    if shape == 2:  # triangle, pointing up
        return (v >= -0.6) & (v <= 1 - 1.7 * u.abs())
    if shape == 3:  # diamond
        return u.abs() + v.abs() <= 1
    if shape == 4:  # cross (plus sign)
        return ((u.abs() <= 0.32) & (v.abs() <= 1)) | ((v.abs() <= 0.32) & (u.abs() <= 1))
    if shape == 5:  # ring
        return (rho <= 1) & (rho >= 0.55)
    if shape == 6:  # five-pointed star (radius oscillates between 0.45 and 1)
        return rho <= 0.45 + 0.55 * (0.5 + 0.5 * torch.cos(5 * (phi - math.pi / 2))) ** 2
    if shape == 7:  # hexagon with flat top and bottom
        return torch.maximum(u.abs() * 0.866 + v.abs() * 0.5, v.abs()) <= 0.88
    if shape == 8:  # crescent: a disc minus an offset disc
        return (rho <= 1) & ((u - 0.45) ** 2 + (v - 0.15) ** 2 >= 0.75 ** 2)
    if shape == 9:  # heart: (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0
        x, y = u * 1.15, v * 1.15 + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    raise ValueError(f"unknown shape index {shape}")


def render(scenes: dict[str, torch.Tensor], g: torch.Generator, size: int = 32) -> torch.Tensor:
    """Draw a scene table as uint8 images ``(n, 3, size, size)``; 2x supersampled edges."""
    n, s2 = len(scenes["shape"]), 2 * size
    # background: dark random colour with a linear gradient in a random direction
    base = torch.rand(n, 3, 1, 1, generator=g) * 90
    theta = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    amp = torch.rand(n, 1, 1, 1, generator=g) * 40
    lin = torch.linspace(-1, 1, size)
    ramp = torch.cos(theta) * lin[None, None, :] + torch.sin(theta) * lin[None, :, None]
    img = base + amp * ramp[:, None] / 2
    coords = (torch.arange(s2, dtype=torch.float32) + 0.5) / 2  # pixel units of a 32 grid
    coords = coords * (32.0 / size)
    centers = torch.tensor(CENTERS)
    for k in range(2):
        active = scenes["n_objects"] > k
        cx = centers[scenes["col"][:, k]] + scenes["dx"][:, k]
        cy = centers[scenes["row"][:, k]] + scenes["dy"][:, k]
        rad = torch.tensor(RADIUS)[scenes["size"][:, k]] + scenes["dr"][:, k]
        cos, sin = torch.cos(scenes["angle"][:, k]), torch.sin(scenes["angle"][:, k])
        X = (coords[None, None, :] - cx[:, None, None]) / rad[:, None, None]
        Y = (cy[:, None, None] - coords[None, :, None]) / rad[:, None, None]  # up is positive
        U = cos[:, None, None] * X + sin[:, None, None] * Y
        V = -sin[:, None, None] * X + cos[:, None, None] * Y
        mask = torch.zeros(n, s2, s2)
        for s in range(len(SHAPES)):
            idx = torch.nonzero(active & (scenes["shape"][:, k] == s)).flatten()
            if len(idx):
                mask[idx] = _shape_mask(s, U[idx], V[idx]).float()
        alpha = F.avg_pool2d(mask[:, None], 2)  # (n, 1, size, size) coverage
        colour = (RGB[scenes["colour"][:, k]] + scenes["tint"][:, k]).clamp(0, 255)
        img = img * (1 - alpha) + colour[:, :, None, None] * alpha
    sigma = 3 + torch.rand(n, 1, 1, 1, generator=g) * 7
    img = img + sigma * torch.randn(img.shape, generator=g)
    return img.clamp(0, 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------- captions

SIZE_WORDS = {0: ("small", "small", "little", "tiny"), 1: ("large", "large", "big")}
REL_WORDS = {1: ("to the left of", "left of"), 2: ("to the right of", "right of"),
             3: ("above", "over"), 4: ("below", "under", "beneath")}
INVERSE = {1: 2, 2: 1, 3: 4, 4: 3}


def position_phrase(col: int, row: int, rng: random.Random | None = None) -> str:
    """Where a lone object sits: 'on the left', 'at the top right', 'in the center' ..."""
    h, v = COLUMNS[col], ROWS[row]
    if h == "center" and v == "middle":
        return rng.choice(("in the center", "in the middle")) if rng else "in the center"
    if v == "middle":
        return f"on the {h}"
    if h == "center":
        return f"at the {v}"
    return rng.choice((f"at the {v} {h}", f"in the {v} {h} corner")) if rng else f"at the {v} {h}"


def describe(shape: int, colour: int, size: int | None = None, rng: random.Random | None = None) -> str:
    """'small red circle' (size omitted when None)."""
    words = [] if size is None else [rng.choice(SIZE_WORDS[size]) if rng else SIZES[size]]
    return " ".join(words + [COLOURS[colour], SHAPES[shape]])


def canonical_caption(row: dict) -> str:
    """The one canonical caption of a scene (used as a generation prompt and for probes)."""
    return scene_captions(row, n=1, rng=None)[0]


def scene_captions(row: dict, n: int = 5, rng: random.Random | None = None) -> list[str]:
    """``n`` captions of one scene; ``row`` holds python ints (see :func:`scene_row`).
    With ``rng=None`` the first caption is the canonical one."""
    return [re.sub(r"\ba (?=[aeiou])", "an ", c) for c in _captions(row, n, rng)]


def _captions(row: dict, n: int, rng: random.Random | None) -> list[str]:
    sh, co, si = row["shape"], row["colour"], row["size"]
    if row["n_objects"] == 1:
        pos = position_phrase(row["col"][0], row["row"][0], rng)
        templates = [
            lambda d, p: f"a {d} {p}",
            lambda d, p: f"{p} there is a {d}",
            lambda d, p: f"there is a {d} {p}",
            lambda d, p: f"a picture of a {d} {p}",
            lambda d, p: f"one {d} {p}",
            lambda d, p: f"a {d} sitting {p}",
        ]
        if rng is None:
            return [templates[0](describe(sh[0], co[0], si[0]), pos)]
        return [rng.choice(templates)(describe(sh[0], co[0], rng.choice((si[0], si[0], None)), rng),
                                      position_phrase(row["col"][0], row["row"][0], rng))
                for _ in range(n)]
    rel = row["relation"]
    if sh[0] == sh[1] and co[0] == co[1]:  # twins
        layout = "side by side" if rel in (1, 2) else "one above the other"
        plural = f"{COLOURS[co[0]]} {PLURALS[SHAPES[sh[0]]]}"
        if rng is None:
            return [f"two {SIZES[si[0]]} {plural} {layout}"]
        templates = [f"two {rng.choice(SIZE_WORDS[si[0]])} {plural} {layout}", f"two {plural} {layout}",
                     f"a pair of {plural} {layout}", f"there are two {plural} {layout}"]
        return [rng.choice(templates) for _ in range(n)]
    if rng is None:
        return [f"a {describe(sh[0], co[0], si[0])} {REL_WORDS[rel][0]} a {describe(sh[1], co[1], si[1])}"]
    out = []
    for _ in range(n):
        a, b, r = 0, 1, rel
        if rng.random() < 0.4:  # describe from the other object's point of view
            a, b, r = 1, 0, INVERSE[rel]
        da = describe(sh[a], co[a], rng.choice((si[a], None)), rng)
        db = describe(sh[b], co[b], rng.choice((si[b], None)), rng)
        lead = rng.choice(("a", "a", "there is a", "a picture of a"))
        out.append(f"{lead} {da} {rng.choice(REL_WORDS[r])} a {db}")
    return out


def scene_row(scenes: dict[str, torch.Tensor], i: int) -> dict:
    """Scene ``i`` of a table as plain python values."""
    return {k: v[i].tolist() for k, v in scenes.items()}


# ----------------------------------------------------------------------------- splits

def make_split(split: str = "train", n: int | None = None, cfg: WorldConfig = WorldConfig(),
               single: bool = False, captions: bool = True) -> DataSplit:
    """Generate a split of the world in memory.

    Args:
        split: "train", "val", "test" or "heldout" (held-out compositions only).
        n: number of images (default :data:`SPLIT_SIZES`); a smaller n is a prefix of a larger.
        single: only one-object scenes (the m1 classification task).
        captions: also write ``cfg.n_captions`` captions per image.

    Returns:
        DataSplit with images ``(n, 3, S, S)`` uint8, labels = shape of object A (10 classes),
        captions, and ``meta["scenes"]`` (the scene table).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown world split {split!r}: choose one of {', '.join(SPLITS)}")
    n = SPLIT_SIZES[split] if n is None else int(n)
    tables, images = [], []
    for chunk in range(math.ceil(n / CHUNK)):
        g = torch.Generator().manual_seed(_split_seed(cfg.seed, split, chunk))
        c_cfg = WorldConfig(**{**cfg.__dict__, "p_two": 0.0}) if single else cfg
        table = sample_scenes(CHUNK, split, g, c_cfg)
        images.append(render(table, g, cfg.image_size))
        tables.append(table)
    scenes = {k: torch.cat([t[k] for t in tables])[:n] for k in tables[0]}
    caps = None
    if captions:
        caps = []
        for i in range(n):
            rng = random.Random(_split_seed(cfg.seed, split, i) ^ 0x5EED)
            caps.append(scene_captions(scene_row(scenes, i), cfg.n_captions, rng))
    name = f"world/{split}" + ("-single" if single else "")
    identity = {"source": "embedded world (mmsys.data.world)", "seed": cfg.seed, "split": split,
                "single_object": single, "config": dict(cfg.__dict__), "heldout": [list(p) for p in HELDOUT]}
    return DataSplit(name, torch.cat(images)[:n], scenes["shape"][:, 0].clone(), list(SHAPES), caps,
                     identity, {"scenes": scenes})


def composition_classes() -> list[tuple[str, str]]:
    """All 80 (colour, shape) compositions, index = colour * 10 + shape."""
    return [(c, s) for c in COLOURS for s in SHAPES]


def composition_label(scenes: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n,) index of object A's (colour, shape) among :func:`composition_classes`."""
    return scenes["colour"][:, 0] * len(SHAPES) + scenes["shape"][:, 0]
