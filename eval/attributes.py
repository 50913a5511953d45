"""AttributeNet: a small frozen CNN that reads the embedded world's scenes back out of pixels.

Two jobs, one network:

- the in-domain **feature extractor** of the quick-profile FID (m4): ``features(x)`` is the
  penultimate layer, ``(B, F)``. Inception-v3 was trained on ImageNet photographs, not on 32x32
  coloured shapes; a network trained on the world's own images measures what matters there.
- the **prompt-match judge** of text-to-image (m5): :func:`predict_attributes` says which
  shape, colour, size and grid cell each object of a generated image has.

What it predicts (the world's scene table, :mod:`eval.reference.data.world`):

- ``n_objects``: 1 or 2 (trained on the world's mixed train split: half the scenes hold two);
- for the **first object in reading order** (top to bottom, then left to right): ``shape`` (10),
  ``colour`` (8), ``size`` (2), ``col`` (3), ``row`` (3). For a one-object scene that is the
  object; for a two-object scene it is the left one (side by side) or the top one (stacked);
- for the **second object** (two-object scenes only): ``second_shape``, ``second_colour``,
  ``second_size``, ``second_col``, ``second_row``. Their values mean nothing when the scene
  holds one object (they are not trained on such scenes): check ``n_objects``.

Reading order, not the caption's "A/B" order: a caption "a red circle to the right of a blue
square" has the square first in reading order. Map a caption's objects to slots by position.

A grading instrument: it lives in ``eval/`` and is built only from the grader's own copy of the
bundled library (:mod:`eval.reference`: world data, engine, cache paths), whatever implementation
is graded.

"Frozen and versioned": the judge is identified by :func:`recipe_hash`, a hash over its recipe
(:class:`AttributeConfig`) AND the source of the code that builds and trains it
(:data:`CODE_FILES`: this module, the world generator, the engine): editing any of them gives a
new hash, so a stale cache file is never reused (no hand-bumped version number).
:func:`load_or_train` trains it once with a fixed seed and caches
``cache_dir("judges")/attributes-<hash>.pt`` (atomic write), then reuses that file. Its
accuracies are never read from that file: they are measured again on a fixed held-out set
(the world test split of the recipe's world seed) every time the judge is loaded
(:func:`test_accuracies`, a few seconds). Reports name the recipe hash and the file's sha256.
Training is deterministic for a given machine and thread count (CPU kernels may round
differently elsewhere: the sha256 identifies the weights).

Usage::

    model, info = load_or_train(AttributeConfig())        # ~40 s the first time, then cached
    feats = model.features(to_float(images))               # (N, 128)
    pred = predict_attributes(model, images)               # dict of (N,) long
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from eval.reference.data.split import to_float

HEADS = {"shape": 10, "colour": 8, "size": 2, "col": 3, "row": 3}


@dataclass
class AttributeConfig:
    """The recipe of the judge (every field enters :func:`recipe_hash`).

    widths: channels of the three conv stages (32x32, 16x16, 8x8).
    feature_dim: width of the penultimate layer (the FID feature size).
    n_train: world train-split images (mixed one/two-object scenes, a prefix of the split).
    n_test: world test-split images for the reported accuracies (and a single-object test set
        of the same size).
    """

    widths: tuple[int, int, int] = (16, 32, 64)
    feature_dim: int = 128
    n_train: int = 20_000
    n_test: int = 2_000
    steps: int = 600
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    seed: int = 0
    world_seed: int = 0


# the source files whose code decides the judge's weights: this module (network, targets,
# loss, training call) and, in the grader's copy of the bundled library, the world generator,
# pixel conversion and the engine (training loop, optimiser/schedule, batching/seeding)
_BUNDLED_CODE = ("data/world.py", "data/split.py", "train.py", "optim.py", "batching.py")


def code_files() -> list[Path]:
    """The files :func:`code_hash` reads (this module first, then the bundled ones)."""
    from eval.reference import BUNDLED
    return [Path(__file__).resolve()] + [BUNDLED / name for name in _BUNDLED_CODE]


@lru_cache(maxsize=1)
def code_hash() -> str:
    """sha256 (hex) over the contents of :func:`code_files` (each name and bytes)."""
    h = hashlib.sha256()
    for path in code_files():
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def recipe_hash(cfg: AttributeConfig) -> str:
    """16 hex digits identifying the judge: its recipe ``cfg`` and :func:`code_hash`."""
    blob = json.dumps({"code": code_hash(), **asdict(cfg)}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the network

def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class AttributeFeatures(nn.Module):
    """The judge's penultimate layer as a module (for torchmetrics FID via
    ``eval.fid.FeatureAdapter``): x ``(B, 3, H, W)`` in [-1, 1] -> ``(B, F)``."""

    def __init__(self, net: "AttributeNet"):
        super().__init__()
        self.net = net
        self.num_features = net.cfg.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


class AttributeNet(nn.Module):
    """conv -> pool -> conv x2 -> pool -> conv x2 -> pool -> flatten (keeps where things are)
    -> linear -> ReLU = features ``(B, F)`` -> one linear head per attribute and slot.

    forward(x ``(B, 3, 32, 32)`` in [-1, 1]) -> dict of logits ``(B, K)``: ``n_objects`` (2),
    and per slot (``""`` first, ``"second_"`` second object) the :data:`HEADS`.
    """

    def __init__(self, cfg: AttributeConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or AttributeConfig()
        a, b, c = cfg.widths
        self.body = nn.Sequential(_conv(3, a), nn.MaxPool2d(2),                     # 32 -> 16
                                  _conv(a, b), _conv(b, b), nn.MaxPool2d(2),        # 16 -> 8
                                  _conv(b, c), _conv(c, c), nn.MaxPool2d(2),        # 8 -> 4
                                  nn.Flatten())
        self.proj = nn.Sequential(nn.Linear(c * 16, cfg.feature_dim), nn.ReLU())
        names = {"n_objects": 2} | HEADS | {f"second_{k}": v for k, v in HEADS.items()}
        self.heads = nn.ModuleDict({k: nn.Linear(cfg.feature_dim, n) for k, n in names.items()})

    @property
    def num_features(self) -> int:
        return self.cfg.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate layer: x ``(B, 3, 32, 32)`` in [-1, 1] -> ``(B, F)`` float32 (>= 0)."""
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        return self.proj(self.body(x.float()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}


# ----------------------------------------------------------------------------- labels

def scene_targets(scenes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The world's scene table -> per-head targets ``(N,)`` long, slots in reading order.

    ``n_objects`` is 0/1 for one/two objects; ``second_*`` targets are -1 (ignored) for
    one-object scenes.
    """
    two = scenes["n_objects"] == 2
    key = scenes["row"] * 3 + scenes["col"]  # (N, 2) reading-order position
    swap = two & (key[:, 1] < key[:, 0])  # object B comes first in reading order
    first = torch.where(swap, 1, 0)
    out = {"n_objects": two.long()}
    for k in HEADS:
        v = scenes[k]
        out[k] = v.gather(1, first[:, None])[:, 0]
        out[f"second_{k}"] = torch.where(two, v.gather(1, (1 - first)[:, None])[:, 0], -1)
    return out


# ----------------------------------------------------------------------------- training

def _loss(model: AttributeNet, batch):
    x, y = batch
    logits = model(x)
    losses = [F.cross_entropy(logits[k].float(), y[k], ignore_index=-1) for k in logits]
    acc = (logits["shape"].argmax(-1) == y["shape"]).float().mean()
    return sum(losses), {"shape_acc": acc}


def train_attribute_net(n_train: int | None = None, steps: int | None = None, seed: int | None = None,
                        progress: bool = True, cfg: AttributeConfig | None = None):
    """Train the judge on the world's train split (deterministic for a given seed and machine).

    Args:
        n_train, steps, seed: override the recipe's values (``cfg`` or the default recipe).
        progress: tqdm bar.
        cfg: the full recipe.
    Returns:
        ``(model in eval mode, test accuracies dict)`` (see :func:`test_accuracies`).
    """
    from eval.reference.data.world import WorldConfig, make_split
    from eval.reference.train import TrainConfig, Trainer
    cfg = cfg or AttributeConfig()
    over = {k: v for k, v in dict(n_train=n_train, steps=steps, seed=seed).items() if v is not None}
    cfg = AttributeConfig(**{**asdict(cfg), **over})
    world = WorldConfig(seed=cfg.world_seed)
    train = make_split("train", cfg.n_train, world, captions=False)
    targets = scene_targets(train.meta["scenes"])
    torch.manual_seed(cfg.seed)
    model = AttributeNet(cfg)
    tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       warmup_steps=cfg.warmup_steps, seed=cfg.seed, progress=progress, log_every=100)
    trainer = Trainer(model, tcfg, loss_fn=_loss, data_size=len(train), kind="attributes",
                      get_batch=lambda idx, g: (to_float(train.images[idx]), {k: v[idx] for k, v in targets.items()}))
    trainer.fit()
    model = trainer.eval_model().eval()
    return model, test_accuracies(model, cfg.n_test, world)


@torch.no_grad()
def predict_logits(model: AttributeNet, images: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """uint8 ``(N, 3, H, W)`` -> dict of logits ``(N, K)`` (eval mode, no grad)."""
    model.eval()
    outs = [model(to_float(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return {k: torch.cat([o[k] for o in outs]).float() for k in outs[0]}


def predict_attributes(model: AttributeNet, images: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """What the judge sees in each image.

    Args:
        images: uint8 ``(N, 3, H, W)`` (resized to 32x32 if needed).
    Returns:
        dict of ``(N,)`` long: ``n_objects`` (1 or 2); ``shape``, ``colour``, ``size``, ``col``,
        ``row`` of the first object in reading order (indices into the world's ``SHAPES``,
        ``COLOURS``, ``SIZES``, ``COLUMNS``, ``ROWS``); the same with a ``second_`` prefix for
        the second object (meaningful only where ``n_objects == 2``).
    """
    logits = predict_logits(model, images, batch_size)
    out = {k: v.argmax(-1) for k, v in logits.items()}
    out["n_objects"] = out["n_objects"] + 1
    return out


def test_accuracies(model: AttributeNet, n_test: int = 2000, world=None) -> dict[str, float]:
    """Accuracies on the world test split: ``single/<head>`` on ``n_test`` one-object scenes,
    ``mixed/n_objects`` on ``n_test`` mixed scenes and ``two/<head>`` (both slots) on the
    two-object scenes among them."""
    from eval.reference.data.world import WorldConfig, make_split
    world = world or WorldConfig()
    out = {}
    for name, single in (("single", True), ("mixed", False)):
        split = make_split("test", n_test, world, single=single, captions=False)
        y = scene_targets(split.meta["scenes"])
        pred = predict_logits(model, split.images)
        if single:
            for k in HEADS:
                out[f"single/{k}"] = (pred[k].argmax(-1) == y[k]).float().mean().item()
        else:
            out["mixed/n_objects"] = (pred["n_objects"].argmax(-1) == y["n_objects"]).float().mean().item()
            two = y["n_objects"] == 1
            for k in list(HEADS) + [f"second_{h}" for h in HEADS]:
                out[f"two/{k}"] = (pred[k].argmax(-1)[two] == y[k][two]).float().mean().item()
    return out


# ----------------------------------------------------------------------------- the frozen judge

def load_or_train(cfg: AttributeConfig | None = None, progress: bool = True, cache: bool = True):
    """The frozen judge of recipe ``cfg``: loaded from the cache, or trained once and cached.

    File: ``eval.reference.data.paths.cache_dir("judges")/attributes-<recipe_hash>.pt``, written
    atomically; it holds the weights and the recipe (and, for the record only, the accuracies
    measured when it was trained). Whether loaded or trained now, ``test_accuracies`` are
    measured in this call on the fixed held-out set (:func:`test_accuracies`: ``cfg.n_test``
    world test images of ``cfg.world_seed``), never read from the file.

    Returns:
        ``(model in eval mode, info)``; info = ``{recipe_hash, code_hash, code_files, recipe,
        path, sha256, test_accuracies, accuracies_measured_s, held_out, trained_now, train_s}``.
    """
    from eval.reference.data.paths import atomic_torch_save, cache_dir, sha256_file
    from eval.reference.data.world import WorldConfig
    cfg = cfg or AttributeConfig()
    h = recipe_hash(cfg)
    path = cache_dir("judges") / f"attributes-{h}.pt" if cache else None
    info = {"recipe_hash": h, "code_hash": code_hash(), "code_files": [p.name for p in code_files()],
            "recipe": asdict(cfg), "trained_now": False}
    model = AttributeNet(cfg)
    if path is not None and path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("recipe_hash") != h:
            raise ValueError(f"{path}: holds recipe {payload.get('recipe_hash')!r}, expected {h!r}")
        model.load_state_dict(payload["model"])
    else:
        t0 = time.perf_counter()
        model, acc = train_attribute_net(progress=progress, cfg=cfg)
        info.update(trained_now=True, train_s=time.perf_counter() - t0)
        if path is not None:
            atomic_torch_save({"kind": "attributes", "code_hash": code_hash(), "recipe": asdict(cfg),
                               "recipe_hash": h, "model": model.state_dict(), "accuracies_at_training": acc}, path)
    if path is not None:
        info.update(path=str(path), sha256=sha256_file(path))
    model.eval().requires_grad_(False)
    t0 = time.perf_counter()
    info["test_accuracies"] = test_accuracies(model, cfg.n_test, WorldConfig(seed=cfg.world_seed))
    info["accuracies_measured_s"] = time.perf_counter() - t0
    info["held_out"] = (f"measured in this run: world test split (world seed {cfg.world_seed}), {cfg.n_test} "
                        f"one-object and {cfg.n_test} mixed scenes; the judge trains on the train split")
    return model, info
