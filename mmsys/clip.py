"""CLIP: contrastive image/text pre-training (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision").

Data flow::

    image (B, 3, H, W) in [-1, 1] -> ImageTower (ViT CLS token | CNN pooled) -> W_i -> L2 norm -> (B, E)
    ids (B, L) + pad_mask (B, L)  -> TextTower (token + position embeddings -> transformer
                                     encoder -> pool at <eos> or <bos>/CLS) -> W_t -> L2 norm -> (B, E)
    logits = exp(t) * I @ T^T     (B, B); t = log logit-scale, init log(1/0.07), clamped at log(100)
    loss = (CE(logits, diag) + CE(logits^T, diag)) / 2          (symmetric InfoNCE, CLIP fig. 3)

The towers share no weights. Negatives are the other items of the (effective) batch; there is no
negative mining.

False negatives (duplicates). A batch may hold two images that mean the same thing (in the
embedded world: two scenes with the same canonical description, e.g. two "small red circle on the
left" pictures), or two identical caption strings. Treating them as negatives of each other would
teach the model to separate things that are the same. Each batch item therefore carries two
integer keys: ``image_key`` (world: id of the scene's canonical caption; COCO: the image id) and
``text_key`` (id of the caption's exact normalised text). An off-diagonal pair (i, j) whose image
keys or text keys are equal is a *known duplicate*: :func:`clip_loss` removes it from both softmax
denominators (logit set to -inf), so it is neither a positive nor a negative. Residual
near-duplicates that neither key catches (a caption that omits the size, against a scene that
differs only in size; paraphrases in COCO) stay negatives; their rate is small and the report
states the share of pairs that were masked.

Gradient accumulation (:func:`gradcache_step`, Gao et al. 2021, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup"). Averaging the losses of micro-batches would change the
loss: each micro-batch would only see its own negatives. Instead, one optimizer step does
(1) embed every micro-batch without autograd; (2) compute the loss over the whole effective batch
from the cached embeddings, with gradients w.r.t. those embeddings and the temperature;
(3) re-run each micro-batch with autograd (same RNG state) and back-propagate the cached embedding
gradients through it. The parameter gradient equals the one of the full batch in one pass
(tested), while activation memory is that of one micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import config_errors, load_checkpoint, load_into
from .distributed import gather_no_grad, gather_with_grad, rank, world_size
from .text import Tokenizer
from .transformer import Transformer
from .vit import ViT, ViTConfig, _init


@dataclass
class CLIPConfig:
    """Defaults = the quick profile (32x32 embedded world)."""

    # image tower
    image_tower: str = "vit"  # "vit" | "cnn"
    image_size: int = 32
    patch_size: int = 4
    vision_dim: int = 128
    vision_depth: int = 4
    vision_heads: int = 4
    cnn_width: int = 64
    # text tower
    vocab_size: int = 256
    context_length: int = 32
    text_dim: int = 128
    text_depth: int = 3
    text_heads: int = 4
    text_pool: str = "eot"  # "eot" (the <eos> token, as in CLIP) | "cls" (the leading <bos>)
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    # shared space
    embed_dim: int = 128
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def to_dict(self) -> dict:
        return asdict(self)


class TextTower(nn.Module):
    """ids (B, L) long, pad_mask (B, L) bool (True = padding) -> features (B, text_dim).

    Token + learned position embeddings -> bidirectional pre-LN transformer encoder (padding keys
    masked) -> the hidden state at the <eos> token (``eot``: the last non-padding position) or at
    position 0 (``cls``: the <bos> token)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.pool = cfg.text_pool
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.text_dim)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.context_length, cfg.text_dim) * 0.01)
        self.encoder = Transformer(cfg.text_dim, cfg.text_depth, cfg.text_heads, cfg.mlp_ratio,
                                   dropout=cfg.dropout)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def forward(self, ids: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        B, L = ids.shape
        if L > self.pos_embed.shape[1]:
            raise ValueError(f"{L} tokens exceed the context length {self.pos_embed.shape[1]}")
        h = self.token_embed(ids) + self.pos_embed[:, :L]
        h = self.encoder(h, padding_mask=pad_mask).x  # (B, L, D)
        if self.pool == "cls":
            return h[:, 0]
        last = (~pad_mask).sum(dim=1).clamp(min=1) - 1  # index of <eos> (right padding)
        return h[torch.arange(B, device=ids.device), last]


class ConvTower(nn.Module):
    """A small CNN alternative: images (B, 3, H, W) -> (B, 4 * width), global average pooled."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        w = cfg.cnn_width
        def stage(cin, cout, stride):  # noqa: E306
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.GELU())
        self.net = nn.Sequential(stage(3, w, 1), stage(w, w, 1), stage(w, 2 * w, 2), stage(2 * w, 2 * w, 1),
                                 stage(2 * w, 4 * w, 2), stage(4 * w, 4 * w, 1))
        self.out_dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3))


class ImageTower(nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> features (B, F): the m1 ViT's final CLS token (LayerNorm'd
    by the encoder) or the CNN's pooled features."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.kind = cfg.image_tower
        if self.kind == "vit":
            self.vit = ViT(ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, dim=cfg.vision_dim,
                                     depth=cfg.vision_depth, n_heads=cfg.vision_heads, mlp_ratio=cfg.mlp_ratio,
                                     n_classes=0, dropout=cfg.dropout))
            self.out_dim = cfg.vision_dim
        elif self.kind == "cnn":
            self.cnn = ConvTower(cfg)
            self.out_dim = self.cnn.out_dim
        else:
            raise ValueError(f"image_tower must be 'vit' or 'cnn', got {self.kind!r}")

    def no_weight_decay(self) -> set[str]:
        return {"vit.pos_embed", "vit.cls_token"} if self.kind == "vit" else set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "vit":
            return self.vit.tokens(x)[0][:, 0]
        return self.cnn(x)


class CLIP(nn.Module):
    """Two towers, two linear projections (no bias) into one E-dim space, a learnable temperature."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.image_tower = ImageTower(cfg)
        self.text_tower = TextTower(cfg)
        self.image_proj = nn.Linear(self.image_tower.out_dim, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.embed_dim, bias=False)
        self.apply(_init)
        nn.init.normal_(self.text_tower.token_embed.weight, std=0.02)
        # t = log(1 / T): stored as a log so it stays positive; CLIP init T = 0.07 (scale 14.3)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> (B, E) unit vectors."""
        return F.normalize(self.image_proj(self.image_tower(images)), dim=-1)

    def encode_text(self, ids: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """ids (B, L) long, pad_mask (B, L) bool (True = padding) -> (B, E) unit vectors."""
        return F.normalize(self.text_proj(self.text_tower(ids, pad_mask)), dim=-1)

    def scale(self) -> torch.Tensor:
        """The logit scale exp(t), t clamped at log(max_logit_scale) (0-d; no gradient above)."""
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    def temperature(self) -> float:
        """T = 1 / logit scale, as reported."""
        return 1.0 / float(self.scale().detach())

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """(B, E), (B', E) -> logits_per_image (B, B') = scale * cosine similarities."""
        return similarity(image_emb, text_emb) * self.scale()

    def forward(self, images, ids, pad_mask):
        """-> (image_emb (B, E), text_emb (B, E), scale 0-d)."""
        return self.encode_image(images), self.encode_text(ids, pad_mask), self.scale()


def similarity(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix (B, B') of unit vectors (B, E) and (B', E)."""
    return image_emb @ text_emb.T


def duplicate_mask(image_key: torch.Tensor, text_key: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) keys -> (B, B) bool, True for *off-diagonal* pairs that are known duplicates
    (same image key or same text key)."""
    same = image_key[:, None] == image_key[None, :]
    if text_key is not None:
        same |= text_key[:, None] == text_key[None, :]
    return same & ~torch.eye(len(image_key), dtype=torch.bool, device=image_key.device)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Symmetric InfoNCE (CLIP fig. 3).

    Args:
        image_emb, text_emb: (B, E) unit vectors; row i of each is a matching pair.
        scale: 0-d logit scale exp(t) (= 1 / temperature).
        mask: optional (B, B) bool, True = known duplicate pair to drop from both softmax
            denominators (must be False on the diagonal).
    Returns:
        loss = (CE(S, diag) + CE(S^T, diag)) / 2 with S = scale * I T^T, and metrics
        (image->text and text->image in-batch accuracy).
    """
    if world_size() > 1:
        return global_clip_loss(image_emb, text_emb, scale, mask)
    logits = scale * similarity(image_emb.float(), text_emb.float())  # (B, B) rows = images
    if mask is not None:
        if mask.diagonal().any():
            raise ValueError("the duplicate mask must not cover the diagonal (the positives)")
        logits = logits.masked_fill(mask, float("-inf"))
    labels = torch.arange(len(logits), device=logits.device)
    loss_i2t = F.cross_entropy(logits, labels)
    loss_t2i = F.cross_entropy(logits.T, labels)
    with torch.no_grad():
        acc_i2t = (logits.argmax(dim=1) == labels).float().mean()
        acc_t2i = (logits.argmax(dim=0) == labels).float().mean()
    return (loss_i2t + loss_t2i) / 2, {"acc_i2t": acc_i2t, "acc_t2i": acc_t2i}


def global_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """:func:`clip_loss` over the global batch of a process group (open_clip's local-loss
    scheme): every rank's embeddings are all-gathered with gradients, so each image is contrasted
    with world_size x B texts and each text with as many images; this rank scores its own B rows
    in each direction.

    Args:
        image_emb, text_emb: (B, E) this rank's unit vectors (B equal on every rank).
        scale: 0-d logit scale.
        mask: optional (B, B) duplicate mask of this rank's batch; duplicates across ranks are
            not known here (:func:`global_batch_mask` builds the (B, world_size x B) one).
    Returns:
        this rank's loss and metrics. Its mean over ranks is :func:`clip_loss` of the
        concatenated batch; since each rank's backward also reaches the other ranks' slices, the
        gradient of a replicated parameter averaged over ranks (what data parallelism does) is
        that loss's gradient.
    """
    r, B = rank(), len(image_emb)
    img_all, txt_all = gather_with_grad(image_emb.float()), gather_with_grad(text_emb.float())
    logits_i = scale * similarity(image_emb.float(), txt_all)  # (B, W*B): my images vs every text
    logits_t = scale * similarity(text_emb.float(), img_all)   # (B, W*B): my texts vs every image
    labels = r * B + torch.arange(B, device=logits_i.device)
    if mask is not None:
        if mask.shape == (B, B):  # this rank's own duplicates, placed in its column block
            full = torch.zeros(B, len(img_all), dtype=torch.bool, device=mask.device)
            full[:, r * B:(r + 1) * B] = mask
            mask = full
        if mask[torch.arange(B), labels].any():
            raise ValueError("the duplicate mask must not cover the diagonal (the positives)")
        logits_i, logits_t = logits_i.masked_fill(mask, float("-inf")), logits_t.masked_fill(mask, float("-inf"))
    loss = (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2
    with torch.no_grad():
        acc_i2t = (logits_i.argmax(dim=1) == labels).float().mean()
        acc_t2i = (logits_t.argmax(dim=1) == labels).float().mean()
    return loss, {"acc_i2t": acc_i2t, "acc_t2i": acc_t2i}


# ----------------------------------------------------------------------------- training step

# (image_emb (B, E), text_emb (B, E), scale 0-d, mask (B, B) | None) -> (loss, metrics)
LossFn = Callable[..., tuple[torch.Tensor, dict]]


def batch_mask(batch: dict) -> torch.Tensor | None:
    """The duplicate mask of a batch dict holding ``image_key`` (and optionally ``text_key``):
    (B, B); in a process group, this rank's rows of the global batch's, (B, world_size x B),
    for :func:`global_clip_loss`."""
    if "image_key" not in batch:
        return None
    if world_size() == 1:
        return duplicate_mask(batch["image_key"], batch.get("text_key"))
    text_key = batch.get("text_key")
    full = duplicate_mask(gather_no_grad(batch["image_key"]), None if text_key is None else gather_no_grad(text_key))
    B = len(batch["image_key"])
    return full[rank() * B:(rank() + 1) * B]


def _embed(model: CLIP, mb: dict):
    return model.encode_image(mb["images"]), model.encode_text(mb["ids"], mb["pad_mask"])


def _metrics(loss, m, mask, scale) -> dict:
    out = {"loss": loss.detach(), **{k: v.detach() for k, v in m.items()},
           "logit_scale": scale.detach()}
    if mask is not None:
        n = len(mask)
        out["masked_frac"] = mask.float().sum() / max(n * (n - 1), 1)
    return out


def _split(batch: dict, n_micro: int) -> list[dict]:
    """Split a batch dict of (B, ...) tensors into n_micro nearly equal micro-batches (dim 0)."""
    B = len(batch["images"])
    if n_micro > B:
        raise ValueError(f"cannot split {B} items into {n_micro} micro-batches")
    bounds = [round(i * B / n_micro) for i in range(n_micro + 1)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        mb = {k: v[a:b] for k, v in batch.items() if k in ("images", "ids", "pad_mask")}
        L = int((~mb["pad_mask"]).sum(dim=1).max())  # trim padding columns of this micro-batch
        mb["ids"], mb["pad_mask"] = mb["ids"][:, :L], mb["pad_mask"][:, :L]
        out.append(mb)
    return out


def full_batch_step(model: CLIP, batch: dict, autocast_ctx=None, loss_fn: LossFn = clip_loss) -> dict:
    """One forward/backward over the whole batch (no accumulation). Leaves .grad filled.
    ``loss_fn``: the contrastive loss, :func:`clip_loss` unless a variant is studied."""
    ctx = autocast_ctx() if autocast_ctx is not None else torch.autocast("cpu", enabled=False)
    with ctx:
        img, txt = _embed(model, batch)
    mask, scale = batch_mask(batch), model.scale()
    loss, m = loss_fn(img, txt, scale, mask)
    loss.backward()
    return _metrics(loss, m, mask, scale)


def gradcache_step(model: CLIP, batch: dict, n_micro: int, autocast_ctx=None, loss_fn: LossFn = clip_loss) -> dict:
    """Trainer ``step_fn``: the contrastive loss ``loss_fn`` (default :func:`clip_loss`) over the
    whole batch, computed in ``n_micro`` micro-batches with an embedding cache (see the module
    docstring). With ``n_micro == 1`` it is :func:`full_batch_step`. Leaves in .grad the gradient
    of the full-batch loss."""
    if n_micro <= 1:
        return full_batch_step(model, batch, autocast_ctx, loss_fn)
    ctx = (lambda: autocast_ctx()) if autocast_ctx is not None else (lambda: torch.autocast("cpu", enabled=False))
    micro = _split(batch, n_micro)
    # (1) embed without autograd; remember the RNG state so the re-run draws the same dropout
    states, imgs, txts = [], [], []
    with torch.no_grad():
        for mb in micro:
            states.append(torch.get_rng_state())
            with ctx():
                i, t = _embed(model, mb)
            imgs.append(i.float())
            txts.append(t.float())
    img = torch.cat(imgs).requires_grad_(True)
    txt = torch.cat(txts).requires_grad_(True)
    # (2) full-batch loss on the cache: d loss / d embeddings (and the temperature's own grad)
    mask, scale = batch_mask(batch), model.scale()
    loss, m = loss_fn(img, txt, scale, mask)
    loss.backward()
    # (3) re-run each micro-batch with autograd and push the cached gradients through it
    after = torch.get_rng_state()
    start = 0
    for mb, state in zip(micro, states):
        n = len(mb["images"])
        torch.set_rng_state(state)
        with ctx():
            i, t = _embed(model, mb)
        torch.autograd.backward([i.float(), t.float()], [img.grad[start:start + n], txt.grad[start:start + n]])
        start += n
    torch.set_rng_state(after)
    return _metrics(loss, m, mask, scale)


# ----------------------------------------------------------------------------- data and encoding

def caption_key(text: str) -> str:
    """Normalised caption text (lower case, single spaces, no trailing period): exact duplicates."""
    return " ".join(text.lower().replace(".", " ").split())


class PairedCaptions:
    """Image/caption pairs for contrastive training: each draw takes one random caption per image.

    Captions are tokenised once into ``ids`` (T, L) with ``image_of`` (T,) and per-image
    ``offsets``/``counts``. ``image_keys`` (N,) long: equal for images that mean the same thing
    (default: every image its own key); ``text_keys`` (T,) long: equal for identical caption texts.
    """

    def __init__(self, images: torch.Tensor, captions: list[list[str]], tokenizer, context_length: int,
                 image_keys: torch.Tensor | None = None):
        if any(len(c) == 0 for c in captions):
            raise ValueError("every image needs at least one caption")
        self.images = images  # (N, 3, H, W) uint8
        flat = [c for cs in captions for c in cs]
        self.ids, self.pad_mask = tokenizer.batch_encode(flat, context_length)
        self.counts = torch.tensor([len(c) for c in captions])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.counts.cumsum(0)[:-1]])
        self.image_keys = torch.arange(len(images)) if image_keys is None else image_keys.long()
        index: dict[str, int] = {}
        self.text_keys = torch.tensor([index.setdefault(caption_key(c), len(index)) for c in flat])

    def __len__(self) -> int:
        return len(self.images)

    def get_batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """idx (B,) -> {images (B,3,H,W) float in [-1,1], ids (B,L), pad_mask (B,L), image_key (B,),
        text_key (B,)}; one caption per image drawn with ``generator``; L trimmed to the batch."""
        pick = (torch.rand(len(idx), generator=generator) * self.counts[idx]).long()
        t = self.offsets[idx] + pick
        ids, pad = self.ids[t], self.pad_mask[t]
        L = int((~pad).sum(dim=1).max())
        return {"images": self.images[idx].float().div(127.5).sub(1.0), "ids": ids[:, :L],
                "pad_mask": pad[:, :L], "image_key": self.image_keys[idx], "text_key": self.text_keys[t]}


@torch.no_grad()
def encode_images(model: CLIP, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> (N, E) unit vectors (eval mode restored afterwards)."""
    was, dev = model.training, next(model.parameters()).device
    model.eval()
    out = [model.encode_image(images[i:i + batch_size].to(dev).float().div(127.5).sub(1.0)).cpu()
           for i in range(0, len(images), batch_size)]
    model.train(was)
    return torch.cat(out) if out else torch.empty(0, model.cfg.embed_dim)


@torch.no_grad()
def encode_texts(model: CLIP, tokenizer, texts: list[str], batch_size: int = 1000) -> torch.Tensor:
    """list of T strings -> (T, E) unit vectors (truncated to the model's context length)."""
    was, dev = model.training, next(model.parameters()).device
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        ids, pad = tokenizer.batch_encode(texts[i:i + batch_size], model.context_length)
        out.append(model.encode_text(ids.to(dev), pad.to(dev)).cpu())
    model.train(was)
    return torch.cat(out) if out else torch.empty(0, model.cfg.embed_dim)


def build_model(model_config: dict) -> CLIP:
    """Rebuild a CLIP from the plain dict stored in a checkpoint's ``model_config``."""
    return CLIP(CLIPConfig(**model_config))


def load_clip(path) -> tuple[CLIP, Tokenizer, dict]:
    """A "clip" checkpoint file -> (model in eval mode with the EMA weights when the run kept
    them, its tokenizer, the checkpoint dict). Raises CheckpointError for another kind."""
    ck = load_checkpoint(path, expect_kind="clip")
    model = load_into(path, ck, build_model, required_extra=("tokenizer",))
    with config_errors(path, "extra['tokenizer']"):
        tok = Tokenizer.from_state_dict(ck["extra"]["tokenizer"])
    return model.eval(), tok, ck
