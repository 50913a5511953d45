"""Image captioning with cross-attention (Show, Attend and Tell with transformers).

Data flow::

    image (B, 3, S, S) in [-1, 1]
      -> ViT encoder (mmsys.vit.ViT, no head): tokens (B, 1 + N, Dv)   CLS + N patch tokens,
         each carrying its learned position embedding (where in the image it is)
    caption ids (B, L)  <bos> w1 ... wn <eos> <pad> ...
      -> token embedding + learned position embedding (B, L, D)
      -> decoder (mmsys.decoder.CrossAttentionDecoder, shared with m6's speech recogniser):
         pre-LN blocks of [causal self-attention, cross-attention to the image tokens, MLP]
      -> LayerNorm -> output head (tied: logits = h @ E^T, the token-embedding matrix E reused,
         Press & Wolf 2017) -> logits (B, L, V) for the next token at every position.

Training is teacher forcing: position t sees <bos> w1 .. wt and predicts w(t+1) (cross-entropy,
padding ignored). Inference is autoregressive: :meth:`Captioner.greedy` and
:meth:`Captioner.beam_search` (batched, length-normalised, end-of-sequence aware, maximum length),
both on a key/value cache so each step costs one token, not the whole prefix.
:meth:`Captioner.cross_attention` gives, for every generated token, where in the image the
decoder looked when it chose that token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decoder import BOS_ID, EOS_ID, PAD_ID, CrossAttentionDecoder, eval_mode, teacher_forcing_loss  # noqa: F401
from .vit import ViT, ViTConfig


@dataclass
class CaptionerConfig:
    """Defaults suit 32x32 world scenes (m3's quick profile, whose recipe spells out every field)."""

    vocab_size: int = 64  # set from the tokenizer
    max_len: int = 24  # positions: <bos> + words + <eos>
    # image encoder (a ViT without classification head)
    image_size: int = 32
    patch_size: int = 8  # 4 x 4 patches: 16 image tokens + CLS (4x cheaper than 4-pixel patches)
    enc_dim: int = 128
    enc_depth: int = 4
    enc_heads: int = 4
    enc_mlp_ratio: float = 2.0
    # text decoder
    dim: int = 128
    depth: int = 2
    n_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # the quick run is far from overfitting
    tie_head: bool = True  # output head shares the token-embedding matrix

    def vit_config(self) -> ViTConfig:
        return ViTConfig(image_size=self.image_size, patch_size=self.patch_size, dim=self.enc_dim,
                         depth=self.enc_depth, n_heads=self.enc_heads, mlp_ratio=self.enc_mlp_ratio,
                         n_classes=0, dropout=self.dropout)


class Captioner(CrossAttentionDecoder):
    """ViT encoder + causal transformer decoder with cross-attention to the image tokens
    (:class:`mmsys.decoder.CrossAttentionDecoder`)."""

    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViT(cfg.vit_config())
        self.build_decoder(cfg.vocab_size, cfg.max_len, cfg.dim, cfg.depth, cfg.n_heads, cfg.mlp_ratio,
                           memory_dim=cfg.enc_dim, dropout=cfg.dropout, tie_head=cfg.tie_head)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "tok_embed.weight", "encoder.pos_embed", "encoder.cls_token"}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in [-1, 1] -> visual tokens (B, 1 + N, Dv) (CLS first, then the
        N = (S/p)^2 patches in row-major order)."""
        return self.encoder.tokens(images)[0]

    def forward(self, images: torch.Tensor, ids: torch.Tensor, pad_mask: torch.Tensor | None = None,
                causal: bool = True) -> torch.Tensor:
        """images (B, 3, S, S), ids (B, L) -> next-token logits (B, L, V): logits[:, t] scores
        token t + 1 given ids[:, :t + 1] and the image."""
        return self.decode(self.encode(images), ids, pad_mask, causal)[0]

    @eval_mode
    def cached_log_probs(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S), ids (B, L) -> next-token log-probs (B, L, V) on the key/value
        cache (what greedy and beam search run); equals ``forward(images, ids).log_softmax(-1)``."""
        return self.cached_log_probs_from(self.encode(images), None, ids)

    @eval_mode
    def greedy(self, images: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        """Greedy decoding: images (B, 3, S, S) -> ids (B, L) (:meth:`greedy_from`)."""
        return self.greedy_from(self.encode(images), None, max_len)

    @eval_mode
    def beam_search(self, images: torch.Tensor, beam: int = 3, max_len: int | None = None,
                    alpha: float = 0.6, return_scores: bool = False):
        """Beam search: images (B, 3, S, S) -> ids (B, L) [, scores] (:meth:`beam_search_from`)."""
        return self.beam_search_from(self.encode(images), None, beam, max_len, alpha, return_scores)

    @eval_mode
    def cross_attention(self, images: torch.Tensor, ids: torch.Tensor, layer: int | None = None
                        ) -> torch.Tensor:
        """Where the decoder looked for each generated token: images (B, 3, S, S), ids (B, L) as
        returned by greedy/beam_search -> (B, L - 1, g, g) attention mass on the g x g patch grid
        (heads averaged, blocks averaged or block ``layer``; the share given to the CLS token is
        left out, so a row sums to at most 1). Row k belongs to the token ``ids[:, k + 1]``."""
        w = self.cross_attention_from(self.encode(images), None, ids, layer)[:, :, 1:]  # drop CLS
        g = self.cfg.image_size // self.cfg.patch_size
        return w.reshape(*w.shape[:2], g, g)


def caption_loss(model: Captioner, images: torch.Tensor, ids: torch.Tensor,
                 pad_mask: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Teacher-forcing cross-entropy, averaged over real (non-pad) target tokens.

    images (B, 3, S, S); ids, pad_mask (B, k, L): k captions per image (all captions of an image
    share one encoder pass)."""
    B, k, L = ids.shape
    feats = model.encode(images).repeat_interleave(k, dim=0)  # (B*k, T, Dv)
    return teacher_forcing_loss(model, feats, ids.reshape(B * k, L), pad_mask.reshape(B * k, L), causal)


# ---------------------------------------------------------------------- caption sets as tensors
def encode_caption_sets(tokenizer, captions: list[list[str]], max_len: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise every reference caption of every image.

    Args:
        tokenizer: an :class:`mmsys.text.Tokenizer`.
        captions: per image its list of captions (lists may differ in length, e.g. COCO 5-7).
        max_len: longest id sequence kept (<bos> .. <eos>, longer captions truncated).
    Returns:
        ids (N, C, L) long, right-padded with <pad> (C = most captions of any image; missing
        slots are all <pad>), and count (N,) long: how many captions each image has.
    """
    C = max(map(len, captions))
    seqs = [[tokenizer.encode(c, max_len) for c in caps] for caps in captions]
    L = max(len(s) for caps in seqs for s in caps)
    ids = torch.full((len(seqs), C, L), PAD_ID, dtype=torch.long)
    for i, caps in enumerate(seqs):
        for j, s in enumerate(caps):
            ids[i, j, :len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(c) for c in captions])


def caption_pairs(count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (image, caption) pair as a training item, so an epoch uses every caption of every
    image once. count (N,) -> image index (M,), caption index (M,) with M = count.sum()."""
    image = torch.repeat_interleave(torch.arange(len(count)), count)
    first = torch.cumsum(count, 0) - count  # index of each image's first pair
    return image, torch.arange(len(image)) - first[image]


def gather_captions(ids: torch.Tensor, image: torch.Tensor, caption: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption ``caption[j]`` of image ``image[j]``: ids (N, C, L) -> ids (b, 1, L'), pad_mask
    (b, 1, L') (True = padding), trimmed to the longest caption drawn (the (B, k, L) layout of
    :func:`caption_loss` with k = 1)."""
    pick = ids[image, caption]
    L = int((pick != PAD_ID).sum(-1).max())
    pick = pick[:, None, :L]
    return pick, pick == PAD_ID


def load_captioner(path, map_location: str = "cpu"):
    """A trained captioner and its tokenizer from a checkpoint written by the training engine
    (kind "captioner", tokenizer state in ``extra["tokenizer"]``; EMA weights when present).
    Raises :class:`mmsys.checkpoint.CheckpointError` when the file is missing or unusable."""
    from .checkpoint import config_errors, load_checkpoint, load_into
    from .text import Tokenizer
    ck = load_checkpoint(path, expect_kind="captioner", required=("model_config", "extra"),
                         map_location=map_location)
    model = load_into(path, ck, lambda mc: Captioner(CaptionerConfig(**mc)), required_extra=("tokenizer",))
    with config_errors(path, "extra['tokenizer']"):
        tok = Tokenizer.from_state_dict(ck["extra"]["tokenizer"])
    return model.eval(), tok
