"""Text conditioning for diffusion (m5): a frozen CLIP text tower turns prompts into the token
sequence the U-Net cross-attends to, and classifier-free-guidance training drops captions.

    prompts -> Tokenizer -> ids (B, L), pad_mask (B, L)  (True = pad)
            -> frozen m2 text tower -> token features (B, L, D), standardised
            [-> + each token's standardised input embedding: (B, L, 2D)]   (``word_features``)

:func:`drop_conditioning` replaces captions by the empty prompt with probability p (Ho &
Salimans 2022, alg. 1); :func:`pooled_features` gives the <eos> feature (what CLIP pools) and the
mean over real tokens, the model's global caption summary.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

EMPTY_PROMPT = ""  # the unconditional branch: tokens <bos> <eos>


def text_token_features(tower: nn.Module, ids: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    """Per-token hidden states of an m2 CLIP text tower (the sequence CLIP pools from).

    ids (B, L) long, pad_mask (B, L) bool (True = pad) -> (B, L, text_dim), final LayerNorm
    applied. Uses ``tower.token_features`` when the tower has one."""
    if hasattr(tower, "token_features"):
        return tower.token_features(ids, pad_mask)
    L = ids.shape[1]
    h = tower.token_embed(ids) + tower.pos_embed[:, :L]
    return tower.encoder(h, padding_mask=pad_mask).x


class TextConditioner(nn.Module):
    """Frozen text encoder: prompts -> (tokens (B, L, D), pad_mask (B, L)).

    Args:
        tower: an m2 ``TextTower`` (its weights are frozen here).
        tokenizer: the tokenizer the tower was trained with.
        context_length: most tokens per prompt (longer prompts are truncated, keeping <eos>).
        word_features: also return each token's input embedding (the frozen tower's
            ``token_embed`` row, standardised per feature over the vocabulary), concatenated after
            its contextual feature: ``context_dim = 2 * dim``. Why (measured on the quick
            profile's 200-step conditioning CLIP): its contextual features are position-blind;
            swapping "left" for "right" changes the <eos> feature by 0.2 (standardised units)
            and the caption mean by 0.5 of 22, while a colour word changes every token by 4-14,
            so the pooled / layout paths had no usable position signal and the U-Net left position
            at chance. The word embeddings of "left" and "right" differ as much as any two words.
    """

    def __init__(self, tower: nn.Module, tokenizer, context_length: int, word_features: bool = False):
        super().__init__()
        self.tower = tower.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self.dim = int(tower.token_embed.weight.shape[1])
        self.word_features = bool(word_features)
        self.context_dim = self.dim * (2 if self.word_features else 1)
        # per-feature standardisation of the token features (identity until fitted; saved with
        # the model): see :meth:`fit_standardisation`
        self.register_buffer("feat_mean", torch.zeros(self.dim))
        self.register_buffer("feat_std", torch.ones(self.dim))

    def train(self, mode: bool = True) -> "TextConditioner":
        """Always in eval mode: the encoder is frozen."""
        return super().train(False)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """list of B strings -> ids (B, L), pad_mask (B, L) on the module's device."""
        ids, pad = self.tokenizer.batch_encode(list(prompts), self.context_length)
        dev = self.tower.token_embed.weight.device
        return ids.to(dev), pad.to(dev)

    @torch.no_grad()
    def fit_standardisation(self, ids: torch.Tensor, pad_mask: torch.Tensor, batch_size: int = 1024) -> dict:
        """Fit ``feat_mean``, ``feat_std`` (D,) on the real (non-pad) tokens of training captions.

        Why: the final-LayerNorm'd hidden states of a briefly trained CLIP text tower share one
        large common component (every token's feature has norm ~10, while "left" and "right"
        differ by ~1), so the U-Net's cross-attention sees an almost constant context and learns
        colour only. ``z = (h - mean) / std`` (a fixed affine map of the frozen features, no
        learning) puts the differences between words on the unit scale.
        Returns {"tokens": count, "mean_norm": |mean|, "std_mean": mean of std}."""
        self.feat_mean.zero_()
        self.feat_std.fill_(1.0)
        dev = self.feat_mean.device
        s1, s2, n = torch.zeros(self.dim, dtype=torch.float64), torch.zeros(self.dim, dtype=torch.float64), 0
        for a in range(0, len(ids), batch_size):
            i, m = ids[a:a + batch_size].to(dev), pad_mask[a:a + batch_size].to(dev)
            h = text_token_features(self.tower, i, m).float()[~m].double().cpu()  # (tokens, D)
            s1, s2, n = s1 + h.sum(0), s2 + h.square().sum(0), n + len(h)
        mean = s1 / n
        std = (s2 / n - mean.square()).clamp(min=0).sqrt().clamp(min=1e-3)
        self.feat_mean.copy_(mean.float())
        self.feat_std.copy_(std.float())
        return {"tokens": n, "mean_norm": float(mean.norm()), "std_mean": float(std.mean())}

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """ids, pad_mask (B, L) -> standardised token features (B, L, context_dim) float32:
        ``(h - feat_mean) / feat_std`` (h = the tower's token features), followed with
        ``word_features`` by the standardised input embeddings of the tokens."""
        h = text_token_features(self.tower, ids, pad_mask).float()
        z = (h - self.feat_mean) / self.feat_std
        if not self.word_features:
            return z
        table = self.tower.token_embed.weight.float()  # (vocab, D), frozen
        w = (table[ids] - table.mean(0)) / table.std(0, unbiased=False).clamp(min=1e-6)
        return torch.cat([z, w], dim=-1)

    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, pad = self.tokenize(prompts)
        return self.encode_ids(ids, pad), pad


def drop_conditioning(ids: torch.Tensor, pad_mask: torch.Tensor, empty_ids: torch.Tensor, p: float,
                      generator: torch.Generator | None = None):
    """Classifier-free-guidance training: replace each caption by the empty prompt with prob. ``p``.

    Args:
        ids, pad_mask: (B, L) a batch of tokenised captions (True = pad).
        empty_ids: (l,) the empty prompt's ids (``<bos> <eos>``), l <= L.
        p: drop probability; generator: the batch's random stream.
    Returns:
        (ids (B, L), pad_mask (B, L), dropped (B,) bool).
    """
    B, L = ids.shape
    dropped = torch.rand(B, generator=generator) < p
    if dropped.any():
        row = torch.zeros(L, dtype=ids.dtype)
        row[:len(empty_ids)] = empty_ids
        ids = torch.where(dropped[:, None], row.to(ids.device)[None], ids)
        empty_pad = torch.arange(L) >= len(empty_ids)
        pad_mask = torch.where(dropped[:, None], empty_pad.to(pad_mask.device)[None], pad_mask)
    return ids, pad_mask, dropped.to(ids.device)


def pooled_features(context: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """[<eos> token, mean over real tokens] of right-padded sequences: context (B, L, D),
    pad_mask (B, L) (True = pad) -> (B, 2D). The <eos> hidden state is what CLIP's text tower
    pools (the last token when there is no mask)."""
    B, L, _ = context.shape
    keep = torch.ones(B, L, dtype=torch.bool, device=context.device) if pad_mask is None else ~pad_mask
    last = (keep.sum(dim=1) - 1).clamp(min=0)
    eos = context[torch.arange(B, device=context.device), last]
    mean = (context * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
    return torch.cat([eos, mean], dim=-1)


class CaptionedImages:
    """(image, caption) pairs for text-to-image training, with conditioning dropout.

    Captions are tokenised once; each draw picks one random caption per image and replaces it by
    the empty prompt with probability ``p_uncond``.

    Args:
        images: uint8 (N, 3, H, W); captions: per image a non-empty list of strings.
        tokenizer, context_length: the conditioning text tower's tokenizer and length.
        p_uncond: conditioning dropout probability.
    """

    def __init__(self, images: torch.Tensor, captions: list[list[str]], tokenizer, context_length: int,
                 p_uncond: float = 0.1):
        if any(len(c) == 0 for c in captions):
            raise ValueError("every image needs at least one caption")
        self.images, self.p_uncond = images, float(p_uncond)
        self.ids, self.pad_mask = tokenizer.batch_encode([c for cs in captions for c in cs], context_length)
        self.counts = torch.tensor([len(c) for c in captions])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.counts.cumsum(0)[:-1]])
        self.empty_ids = torch.tensor(tokenizer.encode(EMPTY_PROMPT))

    def __len__(self) -> int:
        return len(self.images)

    def get_batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """idx (B,) -> {images (B,3,H,W) float [-1,1], ids (B,L), pad_mask (B,L), dropped (B,) bool}."""
        pick = (torch.rand(len(idx), generator=generator) * self.counts[idx]).long()
        t = self.offsets[idx] + pick
        ids, pad = self.ids[t], self.pad_mask[t]
        ids, pad, dropped = drop_conditioning(ids, pad, self.empty_ids, self.p_uncond, generator)
        L = max(int((~pad).sum(dim=1).max()), 1)
        return {"images": self.images[idx].float().div(127.5).sub(1.0), "ids": ids[:, :L],
                "pad_mask": pad[:, :L], "dropped": dropped}


@torch.no_grad()
def cross_attention_maps(model: nn.Module, *inputs) -> list[torch.Tensor]:
    """The cross-attention weights of one forward pass ``model(*inputs)``: per U-Net attention
    block with cross-attention (:class:`mmsys.diffusion.unet.AttentionBlock`, in call order), the
    weights of image positions over text tokens (B, heads, h * w, L), h x w the block's
    resolution; each row sums to 1 and puts no weight on padding (Rombach et al. 2022, eq. 3)."""
    from .diffusion.unet import AttentionBlock
    maps, busy = [], []

    def grab(module, args, kwargs, out):
        if busy:
            return
        busy.append(True)
        try:  # the same call again, asking for the weights
            maps.append(module(*args, **{**kwargs, "need_weights": True})[1])
        finally:
            busy.clear()

    hooks = [b.cross.register_forward_hook(grab, with_kwargs=True)
             for b in model.modules() if isinstance(b, AttentionBlock) and b.cross is not None]
    try:
        model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return maps
