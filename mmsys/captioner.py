"""Image captioning with cross-attention (Show, Attend and Tell with transformers).

Data flow::

    image (B, 3, S, S) in [-1, 1]
      -> ViT encoder (mmsys.vit.ViT, no head): tokens (B, 1 + N, Dv)   CLS + N patch tokens,
         each carrying its learned position embedding (where in the image it is)
    caption ids (B, L)  <bos> w1 ... wn <eos> <pad> ...
      -> token embedding + learned position embedding (B, L, D)
      -> decoder: pre-LN blocks of [causal self-attention, cross-attention to the image tokens,
         MLP] (mmsys.transformer.Transformer with context_dim=Dv, causal=True)
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

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import Transformer
from .vit import ViT, ViTConfig, _init

PAD_ID, BOS_ID, EOS_ID = 0, 2, 3  # mmsys.text.Tokenizer's special ids


def _eval_mode(fn):
    """Run a method under no_grad with dropout off, restoring the train/eval mode after."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return fn(self, *args, **kwargs)
        finally:
            self.train(was_training)
    return wrapper


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


class Captioner(nn.Module):
    """ViT encoder + causal transformer decoder with cross-attention to the image tokens."""

    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViT(cfg.vit_config())
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.max_len, cfg.dim) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.decoder = Transformer(cfg.dim, cfg.depth, cfg.n_heads, cfg.mlp_ratio,
                                   context_dim=cfg.enc_dim, dropout=cfg.dropout)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.decoder.apply(_init)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        if cfg.tie_head:
            self.head.weight = self.tok_embed.weight

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "tok_embed.weight", "encoder.pos_embed", "encoder.cls_token"}

    # ------------------------------------------------------------------ teacher forcing
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in [-1, 1] -> visual tokens (B, 1 + N, Dv) (CLS first, then the
        N = (S/p)^2 patches in row-major order)."""
        return self.encoder.tokens(images)[0]

    def embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """ids (B, L) -> token + position embeddings (B, L, D) for positions start .. start+L-1."""
        L = ids.shape[1]
        if start + L > self.cfg.max_len:
            raise ValueError(f"sequence of {start + L} tokens exceeds max_len={self.cfg.max_len}")
        return self.drop(self.tok_embed(ids) + self.pos_embed[:, start:start + L])

    def decode(self, feats: torch.Tensor, ids: torch.Tensor, pad_mask: torch.Tensor | None = None,
               causal: bool = True, need_weights: bool = False):
        """feats (B, T, Dv), ids (B, L) -> (logits (B, L, V), cross weights [(B, H, L, T)] * depth).

        ``pad_mask`` (B, L) True = padding. With right padding and the causal mask, real tokens
        never see pads, so the mask only matters for ``causal=False`` (an ablation)."""
        out = self.decoder(self.embed(ids), feats, causal=causal,
                           padding_mask=None if causal else pad_mask, need_weights=need_weights)
        return self.head(out.x), out.cross_weights

    def forward(self, images: torch.Tensor, ids: torch.Tensor, pad_mask: torch.Tensor | None = None,
                causal: bool = True) -> torch.Tensor:
        """images (B, 3, S, S), ids (B, L) -> next-token logits (B, L, V): logits[:, t] scores
        token t + 1 given ids[:, :t + 1] and the image."""
        return self.decode(self.encode(images), ids, pad_mask, causal)[0]

    # ------------------------------------------------------------------ incremental decoding
    def _start_cache(self, feats: torch.Tensor) -> list[dict]:
        """Per block: the cross-attention keys/values of the image tokens (computed once) and an
        empty self-attention cache. feats (B, T, Dv)."""
        cache = []
        for blk in self.decoder.blocks:
            B, T, _ = feats.shape
            a = blk.cross
            kv = a.kv(feats).view(B, T, 2, a.n_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            cache.append({"ck": kv[0], "cv": kv[1], "k": None, "v": None})  # (B, H, T, d)
        return cache

    @staticmethod
    def _reorder_cache(cache: list[dict], index: torch.Tensor) -> list[dict]:
        return [{k: (v.index_select(0, index) if v is not None else None) for k, v in c.items()}
                for c in cache]

    def _step(self, ids_t: torch.Tensor, pos: int, cache: list[dict]) -> torch.Tensor:
        """One decoding step on the cache: ids_t (B,) = token at position ``pos`` -> log-probs of
        the next token (B, V). Updates ``cache`` in place. Equals ``decode`` on the full prefix
        (same blocks, same weights; tested), at the cost of one position."""
        x = self.embed(ids_t[:, None], start=pos)  # (B, 1, D)
        for blk, c in zip(self.decoder.blocks, cache):
            a = blk.attn
            B = x.shape[0]
            h = blk.ln1(x)
            q = a.q(h).view(B, 1, a.n_heads, a.head_dim).transpose(1, 2)
            k, v = a.kv(h).view(B, 1, 2, a.n_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            c["k"] = k if c["k"] is None else torch.cat([c["k"], k], dim=2)
            c["v"] = v if c["v"] is None else torch.cat([c["v"], v], dim=2)
            o = F.scaled_dot_product_attention(q, c["k"], c["v"])  # the past is all visible
            x = x + a.out(o.transpose(1, 2).reshape(B, 1, -1))
            a = blk.cross
            q = a.q(blk.ln_cross(x)).view(B, 1, a.n_heads, a.head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, c["ck"], c["cv"])
            x = x + a.out(o.transpose(1, 2).reshape(B, 1, -1))
            x = x + blk.mlp(blk.ln2(x))
        return self.head(self.decoder.ln_f(x))[:, 0].float().log_softmax(-1)

    @_eval_mode
    def cached_log_probs(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The incremental path end to end: images (B, 3, S, S), ids (B, L) -> next-token
        log-probs (B, L, V), one :meth:`_step` per position on the cache (what greedy and beam
        search run); equals ``forward(images, ids).log_softmax(-1)``."""
        cache = self._start_cache(self.encode(images))
        return torch.stack([self._step(ids[:, t], t, cache) for t in range(ids.shape[1])], dim=1)

    def _mask_specials(self, logp: torch.Tensor, last: bool) -> torch.Tensor:
        """Never emit <pad>/<bos>; at the last allowed step only <eos> (the maximum length)."""
        logp = logp.clone()
        if last:
            eos = logp[:, EOS_ID].clone()
            logp.fill_(float("-inf"))
            logp[:, EOS_ID] = eos
        else:
            logp[:, [PAD_ID, BOS_ID]] = float("-inf")
        return logp

    def _max_steps(self, max_len: int | None) -> int:
        n = self.cfg.max_len - 1 if max_len is None else max_len
        if not 1 <= n <= self.cfg.max_len - 1:
            raise ValueError(f"max_len must be in 1..{self.cfg.max_len - 1} generated tokens, got {n}")
        return n

    @_eval_mode
    def greedy(self, images: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        """Greedy decoding, batched. images (B, 3, S, S) -> ids (B, L): <bos> w1 .. wn <eos>,
        right-padded with <pad>; at most ``max_len`` generated tokens (the last forced <eos>)."""
        steps = self._max_steps(max_len)
        feats = self.encode(images)
        B = len(feats)
        cache = self._start_cache(feats)
        seqs = torch.full((B, 1), BOS_ID, dtype=torch.long, device=feats.device)
        done = torch.zeros(B, dtype=torch.bool, device=feats.device)
        for t in range(steps):
            logp = self._mask_specials(self._step(seqs[:, -1], t, cache), last=t == steps - 1)
            nxt = torch.where(done, PAD_ID, logp.argmax(-1))
            seqs = torch.cat([seqs, nxt[:, None]], dim=1)
            done |= nxt == EOS_ID
            if done.all():
                break
        return seqs

    @_eval_mode
    def beam_search(self, images: torch.Tensor, beam: int = 3, max_len: int | None = None,
                    alpha: float = 0.6, return_scores: bool = False):
        """Beam search, batched over images.

        Each image keeps ``beam`` live hypotheses. Per step the 2*beam best extensions are
        ranked; one ending in <eos> among the top ``beam`` is *finished* (moved out of the beam,
        scored with the GNMT length normalisation of Wu et al. 2016 eq. 14,
        ``log P(Y) / ((5 + |Y|) / 6) ** alpha``, |Y| = generated tokens incl. <eos>); the best
        ``beam`` non-<eos> extensions stay live. An image is done once it has ``beam`` finished
        hypotheses (early stopping); at ``max_len`` generated tokens every live hypothesis is
        closed with <eos>. With beam=1 this is exactly :meth:`greedy`.

        Returns:
            ids (B, L) long, the best finished hypothesis per image (<bos> .. <eos>, right-padded);
            with ``return_scores`` also the list of all finished hypotheses per image,
            ``[[(normalised score, ids list), ...] best first] * B``.
        """
        steps, K = self._max_steps(max_len), beam
        feats = self.encode(images)
        B, dev = len(feats), feats.device
        cache = self._start_cache(feats.repeat_interleave(K, dim=0))
        seqs = torch.full((B * K, 1), BOS_ID, dtype=torch.long, device=dev)
        live = torch.full((B, K), float("-inf"), device=dev)
        live[:, 0] = 0.0  # only one distinct start hypothesis
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool)
        lp = lambda n: ((5 + n) / 6) ** alpha  # noqa: E731
        for t in range(steps):
            logp = self._mask_specials(self._step(seqs[:, -1], t, cache), last=t == steps - 1)
            V = logp.shape[-1]
            cand = (live.view(B * K, 1) + logp).view(B, K * V)
            top_s, top_i = cand.topk(2 * K, dim=1)  # (B, 2K), best first
            src, tok = top_i // V, top_i % V
            is_eos = tok == EOS_ID
            # finished: <eos> candidates ranked within the top K (HF/GNMT convention)
            rank = torch.arange(2 * K, device=dev).expand(B, -1)
            new_fin = is_eos & (rank < K) & torch.isfinite(top_s) & ~done.to(dev)[:, None]
            for b, j in new_fin.nonzero().tolist():
                if len(finished[b]) < K:
                    hyp = seqs[b * K + src[b, j]].tolist() + [EOS_ID]
                    finished[b].append((top_s[b, j].item() / lp(t + 1), hyp))
            # live: the K best non-<eos> candidates (there are always >= K of them)
            order = torch.where(is_eos, 2 * K + rank, rank).argsort(dim=1)[:, :K]
            live = top_s.gather(1, order)
            beam_src = (src.gather(1, order) + torch.arange(B, device=dev)[:, None] * K).flatten()
            seqs = torch.cat([seqs[beam_src], tok.gather(1, order).flatten()[:, None]], dim=1)
            cache = self._reorder_cache(cache, beam_src)
            done = torch.tensor([len(f) >= K for f in finished])
            if done.all():
                break
        out = []
        for b in range(B):
            finished[b].sort(key=lambda h: -h[0])
            out.append(finished[b][0][1])
        ids = torch.full((B, max(map(len, out))), PAD_ID, dtype=torch.long, device=dev)
        for b, h in enumerate(out):
            ids[b, :len(h)] = torch.tensor(h)
        return (ids, finished) if return_scores else ids

    # ------------------------------------------------------------------ where it looked
    @_eval_mode
    def cross_attention(self, images: torch.Tensor, ids: torch.Tensor, layer: int | None = None
                        ) -> torch.Tensor:
        """Where the decoder looked for each generated token.

        Re-runs the (causal) decoder on the generated ids, which reproduces exactly the
        attention of generation time. Row k belongs to the token ``ids[:, k + 1]``: the query
        that predicted it sat at position k.

        Args:
            images: (B, 3, S, S); ids: (B, L) as returned by greedy/beam_search.
            layer: one decoder block, or None for the mean over blocks.
        Returns:
            (B, L - 1, g, g) attention mass on the g x g patch grid (heads averaged; the share
            given to the CLS token is left out, so a row sums to at most 1).
        """
        feats = self.encode(images)
        _, weights = self.decode(feats, ids, need_weights=True)
        w = torch.stack(weights) if layer is None else weights[layer][None]  # (n, B, H, L, T)
        w = w.float().mean(dim=(0, 2))[:, :-1, 1:]  # (B, L - 1, N): drop last query and CLS
        g = self.cfg.image_size // self.cfg.patch_size
        return w.reshape(*w.shape[:2], g, g)


def caption_loss(model: Captioner, images: torch.Tensor, ids: torch.Tensor,
                 pad_mask: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Teacher-forcing cross-entropy, averaged over real (non-pad) target tokens.

    images (B, 3, S, S); ids, pad_mask (B, k, L): k captions per image (all captions of an image
    share one encoder pass)."""
    B, k, L = ids.shape
    feats = model.encode(images).repeat_interleave(k, dim=0)  # (B*k, T, Dv)
    ids, pad_mask = ids.reshape(B * k, L), pad_mask.reshape(B * k, L)
    logits, _ = model.decode(feats, ids[:, :-1], pad_mask[:, :-1], causal=causal)
    target = ids[:, 1:].masked_fill(pad_mask[:, 1:], -100)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=-100)


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
