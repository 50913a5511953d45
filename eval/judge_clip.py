"""m5's judge CLIP: a CLIP trained by the grader to tell single-attribute swaps apart.

The quick profile grades generated images with a CLIP the grader trains itself (its own copy of
the bundled code, :mod:`eval.reference`; another run and seed than the generator's conditioning
CLIP). A plain contrastive CLIP on the world's single-object scenes learns colour first and
hardly sees shape or position (measured: a caption with the right colour but another shape and
position scored 0.84 against 0.91 for the true caption), so a colour-only generator cleared the
CLIP-score gates. This judge is trained with *hard negatives* (NegCLIP, Yuksekgonul et al. 2023,
"When and why vision-language models behave like bags-of-words"): besides the symmetric InfoNCE
over the batch (duplicates masked), each image must rank its canonical caption above the same
caption with one attribute swapped (colour, shape, position or size) -- a cross-entropy over
``[true, swap_colour, swap_shape, swap_position, swap_size]``. It is the grader's instrument, so
training it on the very distinctions it must judge is legitimate.

Captions of single-object scenes are a function of five attributes, so every canonical caption
is one of :data:`N_COMBOS` "combos" (shape, colour, size, col, row), indexed by
:func:`combo_of`. Swaps never produce a held-out (colour, shape) pair
(:data:`eval.reference.data.world.HELDOUT`): those texts are never seen in training, not even as
negatives.

Every run measures the judge (:func:`judge_accuracies`, never read from the cache): on a fixed
set of real test images, for each attribute the share of images whose true caption outscores the
swapped one and the mean cosine drop, and the CLIP R-precision (Park et al. 2021, "Benchmark for
Compositional Text-to-Image Synthesis"): the share whose true caption beats all its swaps.
:func:`r_precision` is the same measurement for generated images (the gate). The trained judge is
cached under ``cache_dir("judges")/m5-judge-clip-<hash>/``, the hash over this module's and the
bundled CLIP/text/engine code's sources, the recipe, the seed and the data's content hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from eval.reference.data.split import to_float
from eval.reference.data.world import COLOURS, HELDOUT, SHAPES, canonical_caption

# ------------------------------------------------------------------ combos and swaps
N_SHAPE, N_COLOUR, N_SIZE, N_POS = len(SHAPES), len(COLOURS), 2, 9
N_COMBOS = N_SHAPE * N_COLOUR * N_SIZE * N_POS
SWAPS = ("colour", "shape", "position", "size")  # the attributes a swap changes
GATE_SWAPS = ("colour", "shape", "position")  # the spec's prompt-match attributes (the gate's distractors)
_HELD = {(COLOURS.index(c), SHAPES.index(s)) for c, s in HELDOUT}


def combo_index(shape, colour, size, col, row):
    """(shape, colour, size, col, row) (ints or tensors) -> combo index in [0, N_COMBOS)."""
    return (((shape * N_COLOUR + colour) * N_SIZE + size) * N_POS) + col * 3 + row


def combo_parts(k: int) -> tuple[int, int, int, int, int]:
    """Combo index -> (shape, colour, size, col, row)."""
    k, pos = divmod(k, N_POS)
    k, size = divmod(k, N_SIZE)
    shape, colour = divmod(k, N_COLOUR)
    return shape, colour, size, pos // 3, pos % 3


def combo_of(scenes: dict[str, torch.Tensor]) -> torch.Tensor:
    """The combo (N,) long of each single-object scene's object (slot 0 of the scene table)."""
    return combo_index(*(scenes[k][:, 0].long() for k in ("shape", "colour", "size", "col", "row")))


def combo_of_prompt(prompt: str) -> int:
    """The combo of a canonical single-object prompt ("a large red circle on the left")."""
    from eval.prompt_match import parse_prompt
    p = parse_prompt(prompt)
    if any(p[k] is None for k in ("shape", "colour", "size", "col", "row")):
        raise ValueError(f"not a single-object world prompt (shape, colour, size and position): {prompt!r}")
    return combo_index(p["shape"], p["colour"], p["size"], p["col"], p["row"])


def combo_captions() -> list[str]:
    """The canonical caption of every combo (index = combo)."""
    out = []
    for k in range(N_COMBOS):
        s, c, z, x, y = combo_parts(k)
        out.append(canonical_caption({"n_objects": 1, "shape": [s, 0], "colour": [c, 0], "size": [z, 0],
                                      "col": [x, 0], "row": [y, 0], "relation": 0}))
    return out


def _alternatives(attribute: str) -> list[list[int]]:
    """For each combo, the combos that differ from it in ``attribute`` only (never a held-out
    (colour, shape) pair)."""
    out = []
    for k in range(N_COMBOS):
        s, c, z, x, y = combo_parts(k)
        if attribute == "colour":
            alts = [(s, c2, z, x, y) for c2 in range(N_COLOUR) if c2 != c]
        elif attribute == "shape":
            alts = [(s2, c, z, x, y) for s2 in range(N_SHAPE) if s2 != s]
        elif attribute == "size":
            alts = [(s, c, 1 - z, x, y)]
        elif attribute == "position":
            alts = [(s, c, z, p // 3, p % 3) for p in range(N_POS) if p != x * 3 + y]
        else:
            raise ValueError(f"unknown attribute {attribute!r}: one of {SWAPS}")
        out.append([combo_index(*a) for a in alts if (a[1], a[0]) not in _HELD])
    return out


_ALT_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def alternatives(attribute: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(table (N_COMBOS, K) long padded with -1, counts (N_COMBOS,) long) of :func:`_alternatives`."""
    if attribute not in _ALT_CACHE:
        alts = _alternatives(attribute)
        k = max(len(a) for a in alts)
        table = torch.full((N_COMBOS, k), -1, dtype=torch.long)
        for i, a in enumerate(alts):
            table[i, :len(a)] = torch.tensor(a, dtype=torch.long)
        _ALT_CACHE[attribute] = (table, torch.tensor([len(a) for a in alts]))
    return _ALT_CACHE[attribute]


def sample_swaps(combos: torch.Tensor, attribute: str, k: int = 1, generator: torch.Generator | None = None):
    """``k`` distinct random swaps of ``attribute`` per combo: (N,) -> (N, min(k, available)) long."""
    table, counts = alternatives(attribute)
    c = counts[combos]
    k = min(k, int(c.min()))
    order = torch.rand(len(combos), table.shape[1], generator=generator)
    order = order.masked_fill(torch.arange(table.shape[1])[None] >= c[:, None], 2.0).argsort(1)[:, :k]
    return table[combos][torch.arange(len(combos))[:, None], order]


# ------------------------------------------------------------------ recipe and training
JUDGE_MODEL = dict(image_tower="vit", image_size=32, patch_size=8, vision_dim=96, vision_depth=3, vision_heads=4,
                   context_length=24, text_dim=96, text_depth=2, text_heads=4, mlp_ratio=2.0, embed_dim=96)


@dataclass
class JudgeRecipe:
    """The judge's recipe (every field enters the cache hash)."""

    model: dict = field(default_factory=lambda: dict(JUDGE_MODEL))
    steps: int = 400
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    hard_weight: float = 1.0  # weight of the swap-ranking loss beside the InfoNCE
    ema_decay: float | None = None


def code_digest() -> str:
    """sha256 over the sources that determine the judge: this module and the bundled CLIP,
    tokenizer, transformer, ViT and engine."""
    from eval.reference import BUNDLED
    h = hashlib.sha256()
    for path in [Path(__file__)] + [BUNDLED / f for f in ("clip.py", "text.py", "transformer.py", "attention.py",
                                                          "vit.py", "train.py", "optim.py")]:
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def cache_key(recipe: JudgeRecipe, seed: int, split) -> tuple[str, dict]:
    """(16-hex hash, the keyed fields): code digest, recipe, seed, data name and content hash."""
    key = {"code": code_digest(), "recipe": asdict(recipe), "seed": seed, "data": split.name,
           "data_sha256": split.sha256()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16], key


def _hard_negative_step(combo_ids: torch.Tensor, combo_pad: torch.Tensor, weight: float):
    """The engine's ``step_fn``: symmetric InfoNCE over the batch (duplicates masked, the
    bundled ``clip_loss``) + ``weight`` x CE over each image's [canonical true caption, one
    random swap per attribute of :data:`SWAPS`]. Batches carry ``candidates`` (B, 1 + S) combos."""
    from eval.reference.clip import batch_mask, clip_loss

    def step(model, batch, n_micro, autocast_ctx=None):
        ctx = autocast_ctx() if callable(autocast_ctx) else (autocast_ctx or torch.autocast("cpu", enabled=False))
        flat = batch["candidates"].flatten().cpu()  # (B * (1 + S),) combos: true, then one swap each
        ids, pad = combo_ids[flat], combo_pad[flat]
        L = int((~pad).sum(1).max())
        with ctx:
            img = model.encode_image(batch["images"]).float()
            txt = model.encode_text(batch["ids"], batch["pad_mask"]).float()
            cand = model.encode_text(ids[:, :L].to(img.device), pad[:, :L].to(img.device)).float()
        mask, scale = batch_mask(batch), model.scale()
        nce, m = clip_loss(img, txt, scale, mask)
        logits = scale * torch.einsum("be,bke->bk", img, cand.view(len(img), -1, cand.shape[-1]))
        target = torch.zeros(len(img), dtype=torch.long, device=img.device)
        hard = F.cross_entropy(logits, target)
        loss = nce + weight * hard
        loss.backward()
        with torch.no_grad():
            swap_acc = (logits[:, :1] > logits[:, 1:]).float().mean(0)
        return {"loss": loss.detach(), "nce": nce.detach(), "hard": hard.detach(), "logit_scale": scale.detach(),
                **{k: v.detach() for k, v in m.items()},
                **{f"swap_acc_{a}": swap_acc[i] for i, a in enumerate(SWAPS)}}
    return step


def train_judge(recipe: JudgeRecipe, split, seed: int, out_dir: Path, progress: bool = False, device: str = "cpu"):
    """Train the judge on a single-object world split with captions (the grader's own code).
    Writes ``out_dir/checkpoint.pt`` (kind "clip"). Returns (model in eval mode, tokenizer, summary)."""
    from eval.reference.clip import CLIP, CLIPConfig, PairedCaptions
    from eval.reference.text import Tokenizer
    from eval.reference.train import TrainConfig, Trainer
    texts = combo_captions()
    tok = Tokenizer.train([c for cs in split.captions for c in cs] + texts)
    model_config = {**recipe.model, "vocab_size": len(tok)}
    torch.manual_seed(seed)
    model = CLIP(CLIPConfig(**model_config))
    combos = combo_of(split.meta["scenes"])
    pairs = PairedCaptions(split.images, split.captions, tok, model.context_length, combos)
    combo_ids, combo_pad = tok.batch_encode(texts, model.context_length)

    def get_batch(idx, g):
        c = combos[idx]
        cands = torch.cat([c[:, None]] + [sample_swaps(c, a, 1, g) for a in SWAPS], 1)  # (B, 1 + S)
        return {**pairs.get_batch(idx, g), "candidates": cands}

    cfg = TrainConfig(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                      weight_decay=recipe.weight_decay, warmup_steps=recipe.warmup_steps, seed=seed,
                      out_dir=str(out_dir), device=device, progress=progress, log_every=50,
                      **({"ema_decay": recipe.ema_decay} if recipe.ema_decay else {}))
    trainer = Trainer(model, cfg, step_fn=_hard_negative_step(combo_ids, combo_pad, recipe.hard_weight),
                      data_size=len(pairs), get_batch=get_batch, kind="clip", model_config=model_config,
                      extra={"tokenizer": tok.state_dict(), "train_data": split.name, "judge": "m5 hard-negative"})
    summary = trainer.fit()
    return trainer.eval_model().eval(), tok, summary


def load_judge(path: Path):
    """(model in eval mode, tokenizer) from a judge checkpoint (the grader's own code)."""
    from eval.reference.checkpoint import eval_weights, load_checkpoint
    from eval.reference.clip import CLIP, CLIPConfig
    from eval.reference.text import Tokenizer
    ck = load_checkpoint(path, expect_kind="clip")
    model = CLIP(CLIPConfig(**ck["model_config"]))
    model.load_state_dict(eval_weights(ck))
    return model.eval(), Tokenizer.from_state_dict(ck["extra"]["tokenizer"])


def load_or_train_judge(recipe: JudgeRecipe, split, seed: int, progress: bool = False, device: str = "cpu",
                        cache: bool = True, out_dir: Path | None = None):
    """The judge of ``recipe``: from ``cache_dir("judges")/m5-judge-clip-<hash>/`` (the hash of
    :func:`cache_key`), or trained now (and cached). Returns (model, tokenizer, info: recipe,
    hash, checkpoint path and sha256, trained_now, train_s). Its accuracies are NOT in the
    cache: measure them with :func:`judge_accuracies`."""
    from eval.reference.data.paths import cache_dir, sha256_file
    h, key = cache_key(recipe, seed, split)
    folder = cache_dir("judges") / f"m5-judge-clip-{h}" if cache else Path(out_dir)
    ckpt = folder / "checkpoint.pt"
    info = {"recipe_hash": h, "code_sha256": key["code"], "recipe": key["recipe"], "seed": seed, "data": split.name,
            "code": "eval.judge_clip + eval.reference (the grader's own)"}
    if cache and ckpt.is_file():
        model, tok = load_judge(ckpt)
        return model.to(device), tok, {**info, "checkpoint": str(ckpt), "sha256": sha256_file(ckpt),
                                       "trained_now": False}
    work = folder.with_name(f"{folder.name}.tmp-{os.getpid()}") if cache else folder
    t0 = time.perf_counter()
    model, tok, summary = train_judge(recipe, split, seed, work, progress, device)
    info.update(train_s=time.perf_counter() - t0, final_metrics=summary.get("final_metrics"))
    (work / "summary.json").write_text(json.dumps(info, indent=2, default=str))
    if cache:
        if ckpt.is_file():  # another run cached the same recipe meanwhile
            shutil.rmtree(work, ignore_errors=True)
        else:
            os.replace(work, folder)
    return model, tok, {**info, "checkpoint": str(ckpt), "sha256": sha256_file(ckpt), "trained_now": True}


# ------------------------------------------------------------------ measuring (every run)
@torch.no_grad()
def _embed_texts(model, tok, texts: list[str], batch: int = 1024) -> torch.Tensor:
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch):
        ids, pad = tok.batch_encode(texts[i:i + batch], model.context_length)
        out.append(model.encode_text(ids.to(dev), pad.to(dev)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def _embed_images(model, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    dev = next(model.parameters()).device
    return torch.cat([model.encode_image(to_float(images[i:i + batch]).to(dev)).float().cpu()
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def swap_scores(model, tok, images: torch.Tensor, combos: torch.Tensor, k: int = 3, seed: int = 0,
                attributes=SWAPS) -> dict:
    """Cosines of each image with its own canonical caption and with ``k`` fixed swaps (seeded
    by ``seed``) of each attribute. images: uint8 (N, 3, H, W); combos: (N,) long.
    Returns {"true": (N,), attribute: (N, k_a)} (k_a = min(k, alternatives))."""
    was = model.training
    model.eval()
    try:
        g = torch.Generator().manual_seed(seed)
        swaps = {a: sample_swaps(combos, a, k, g) for a in attributes}
        needed = torch.cat([combos] + [s.flatten() for s in swaps.values()]).unique()
        texts = combo_captions()
        t = _embed_texts(model, tok, [texts[i] for i in needed.tolist()])
        emb = torch.zeros(N_COMBOS, t.shape[1])
        emb[needed] = t
        img = _embed_images(model, images)
        out = {"true": (img * emb[combos]).sum(-1)}
        for a, s in swaps.items():
            out[a] = torch.einsum("ne,nke->nk", img, emb[s])
        return out
    finally:
        model.train(was)


def summarise(scores: dict, gate_attributes=GATE_SWAPS) -> dict:
    """Per attribute: ``<a>_swap_acc`` (share of (image, swap) pairs where the true caption
    scores higher), ``<a>_swap_drop`` (mean cosine drop true - swap); ``r_precision``: share of
    images whose true caption beats every swap of ``gate_attributes``; ``n``."""
    out = {"n": len(scores["true"])}
    true = scores["true"][:, None]
    for a in (k for k in scores if k != "true"):
        out[f"{a}_swap_acc"] = (true > scores[a]).float().mean().item()
        out[f"{a}_swap_drop"] = (true - scores[a]).mean().item()
    distract = torch.cat([scores[a] for a in gate_attributes if a in scores], 1)
    out["r_precision"] = (scores["true"] > distract.max(1).values).float().mean().item()
    return out


def r_precision(model, tok, images: torch.Tensor, prompts: list[str], k: int = 3, seed: int = 0) -> dict:
    """CLIP R-precision of generated images against attribute-swapped prompts (Park et al.
    2021): image ``i`` counts when the judge scores ``prompts[i]`` above each of its ``k``
    colour, ``k`` shape and ``k`` position swaps (R = 3k + 1 candidates; chance 1 / R). Size
    swaps are reported (``size_swap_acc``) but are not distractors. See :func:`summarise`."""
    combos = torch.tensor([combo_of_prompt(p) for p in prompts], dtype=torch.long)
    return summarise(swap_scores(model, tok, images, combos, k, seed))


def judge_accuracies(model, tok, split, n: int = 500, k: int = 3, seed: int = 0) -> dict:
    """The judge measured now, on the first ``n`` real single-object scenes of ``split`` (a
    fixed set): per attribute the swap accuracy and cosine drop, and the R-precision
    (:func:`summarise`), plus the mean cosine of true pairs."""
    combos = combo_of(split.meta["scenes"])[:n]
    s = swap_scores(model, tok, split.images[:n], combos, k, seed)
    return {**summarise(s), "true_cosine": s["true"].mean().item(), "set": f"{split.name}[0:{n}]"}


def class_r_precision(model, tok, images: torch.Tensor, prompts: list[str], classes: list[str],
                      template: str = "a photo of a {}") -> dict:
    """CLIP R-precision with class prompts (CIFAR-10, the full profile): image ``i`` counts when
    the judge scores its prompt's class prompt above every other class's (R = number of classes).
    Returns {"r_precision", "n"}."""
    from eval.prompt_match import parse_class
    true = torch.tensor([parse_class(p, classes) for p in prompts])
    was = model.training
    model.eval()
    try:
        txt = _embed_texts(model, tok, [template.format(c) for c in classes])
        img = _embed_images(model, images)
    finally:
        model.train(was)
    return {"r_precision": ((img @ txt.T).argmax(1) == true).float().mean().item(), "n": len(prompts)}
