"""The cross-attention text decoder shared by the captioner (m3) and the speech recogniser (m6).

Data flow::

    memory (B, T, Dm)        what is being described: image tokens, or audio patch tokens,
                             with an optional padding mask (B, T) (True = ignore this token)
    ids (B, L)               <bos> w1 ... wn <eos> <pad> ...
      -> token embedding + learned position embedding (B, L, D)
      -> pre-LN blocks of [causal self-attention, cross-attention to the memory, MLP]
         (mmsys.transformer.Transformer with context_dim=Dm, causal=True)
      -> LayerNorm -> output head (tied: logits = h @ E^T, the token-embedding matrix E reused,
         Press & Wolf 2017) -> logits (B, L, V) for the next token at every position.

Training is teacher forcing (:func:`teacher_forcing_loss`): position t sees <bos> w1 .. wt and
predicts w(t+1). Inference is autoregressive on a key/value cache, so each step costs one token:
:meth:`CrossAttentionDecoder.greedy_from` and :meth:`CrossAttentionDecoder.beam_search_from`
(batched, GNMT length normalisation, end-of-sequence aware, maximum length).

A model is an encoder plus this decoder: a subclass builds its encoder, then calls
:meth:`CrossAttentionDecoder.build_decoder`, and defines ``encode(...) -> (memory,
memory_padding_mask or None)``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import Transformer
from .vit import _init

PAD_ID, BOS_ID, EOS_ID = 0, 2, 3  # mmsys.text.Tokenizer's special ids


def eval_mode(fn):
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


def _attend_mask(memory_pad: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) True = padding -> (B, 1, 1, T) True = may attend (scaled_dot_product_attention's)."""
    return None if memory_pad is None else (~memory_pad.bool())[:, None, None, :]


class CrossAttentionDecoder(nn.Module):
    """Causal transformer decoder with cross-attention to a memory; subclasses add the encoder."""

    max_len: int  # positions: <bos> + words + <eos>

    def build_decoder(self, vocab_size: int, max_len: int, dim: int, depth: int, n_heads: int,
                      mlp_ratio: float, memory_dim: int, dropout: float, tie_head: bool) -> None:
        """Create the decoder's modules (call after the encoder's, so the parameters are drawn in
        that order)."""
        self.max_len = max_len
        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.decoder = Transformer(dim, depth, n_heads, mlp_ratio, context_dim=memory_dim, dropout=dropout)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.decoder.apply(_init)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        if tie_head:
            self.head.weight = self.tok_embed.weight

    # ------------------------------------------------------------------ teacher forcing
    def embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """ids (B, L) -> token + position embeddings (B, L, D) for positions start .. start+L-1."""
        L = ids.shape[1]
        if start + L > self.max_len:
            raise ValueError(f"sequence of {start + L} tokens exceeds max_len={self.max_len}")
        return self.drop(self.tok_embed(ids) + self.pos_embed[:, start:start + L])

    def decode(self, feats: torch.Tensor, ids: torch.Tensor, pad_mask: torch.Tensor | None = None,
               causal: bool = True, need_weights: bool = False, memory_pad: torch.Tensor | None = None):
        """feats (B, T, Dm), ids (B, L) -> (logits (B, L, V), cross weights [(B, H, L, T)] * depth).

        ``pad_mask`` (B, L) True = padding. With right padding and the causal mask, real tokens
        never see pads, so it only matters for ``causal=False`` (an ablation). ``memory_pad``
        (B, T) True = a memory token to ignore (padding past the end of an utterance)."""
        out = self.decoder(self.embed(ids), feats, causal=causal, padding_mask=None if causal else pad_mask,
                           context_padding_mask=memory_pad, need_weights=need_weights)
        return self.head(out.x), out.cross_weights

    # ------------------------------------------------------------------ incremental decoding
    def _start_cache(self, feats: torch.Tensor, memory_pad: torch.Tensor | None) -> list[dict]:
        """Per block: the cross-attention keys/values of the memory (computed once), its mask and
        an empty self-attention cache. feats (B, T, Dm)."""
        cache, mask = [], _attend_mask(memory_pad)
        B, T, _ = feats.shape
        for blk in self.decoder.blocks:
            a = blk.cross
            kv = a.kv(feats).view(B, T, 2, a.n_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            cache.append({"ck": kv[0], "cv": kv[1], "cm": mask, "k": None, "v": None})  # (B, H, T, d)
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
            o = F.scaled_dot_product_attention(q, c["ck"], c["cv"], attn_mask=c["cm"])
            x = x + a.out(o.transpose(1, 2).reshape(B, 1, -1))
            x = x + blk.mlp(blk.ln2(x))
        return self.head(self.decoder.ln_f(x))[:, 0].float().log_softmax(-1)

    def cached_log_probs_from(self, feats: torch.Tensor, memory_pad: torch.Tensor | None,
                              ids: torch.Tensor) -> torch.Tensor:
        """The incremental path end to end: ids (B, L) -> next-token log-probs (B, L, V), one
        :meth:`_step` per position on the cache (what greedy and beam search run)."""
        cache = self._start_cache(feats, memory_pad)
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
        n = self.max_len - 1 if max_len is None else max_len
        if not 1 <= n <= self.max_len - 1:
            raise ValueError(f"max_len must be in 1..{self.max_len - 1} generated tokens, got {n}")
        return n

    def greedy_from(self, feats: torch.Tensor, memory_pad: torch.Tensor | None = None,
                    max_len: int | None = None) -> torch.Tensor:
        """Greedy decoding, batched. feats (B, T, Dm) -> ids (B, L): <bos> w1 .. wn <eos>,
        right-padded with <pad>; at most ``max_len`` generated tokens (the last forced <eos>)."""
        steps = self._max_steps(max_len)
        B = len(feats)
        cache = self._start_cache(feats, memory_pad)
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

    def beam_search_from(self, feats: torch.Tensor, memory_pad: torch.Tensor | None = None, beam: int = 3,
                         max_len: int | None = None, alpha: float = 0.6, return_scores: bool = False):
        """Beam search, batched over memories ``feats`` (B, T, Dm).

        Each item keeps ``beam`` live hypotheses. Per step the 2*beam best extensions are
        ranked; one ending in <eos> among the top ``beam`` is *finished* (moved out of the beam,
        scored with the GNMT length normalisation of Wu et al. 2016 eq. 14,
        ``log P(Y) / ((5 + |Y|) / 6) ** alpha``, |Y| = generated tokens incl. <eos>); the best
        ``beam`` non-<eos> extensions stay live. An item is done once it has ``beam`` finished
        hypotheses (early stopping); at ``max_len`` generated tokens every live hypothesis is
        closed with <eos>. With beam=1 this is exactly :meth:`greedy_from`.

        Returns:
            ids (B, L) long, the best finished hypothesis per item (<bos> .. <eos>, right-padded);
            with ``return_scores`` also the list of all finished hypotheses per item,
            ``[[(normalised score, ids list), ...] best first] * B``.
        """
        steps, K = self._max_steps(max_len), beam
        B, dev = len(feats), feats.device
        pad = None if memory_pad is None else memory_pad.repeat_interleave(K, dim=0)
        cache = self._start_cache(feats.repeat_interleave(K, dim=0), pad)
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

    def cross_attention_from(self, feats: torch.Tensor, memory_pad: torch.Tensor | None, ids: torch.Tensor,
                             layer: int | None = None) -> torch.Tensor:
        """Where the decoder looked for each generated token: feats (B, T, Dm), ids (B, L) (as
        decoded) -> (B, L - 1, T) attention mass over the memory tokens (heads averaged; blocks
        averaged, or block ``layer``). Re-running the causal decoder on the generated ids
        reproduces the attention of generation time; row k belongs to the token ``ids[:, k + 1]``
        (the query that predicted it sat at position k)."""
        _, weights = self.decode(feats, ids, need_weights=True, memory_pad=memory_pad)
        w = torch.stack(weights) if layer is None else weights[layer][None]  # (n, B, H, L, T)
        return w.float().mean(dim=(0, 2))[:, :-1]


def teacher_forcing_loss(model: CrossAttentionDecoder, feats: torch.Tensor, ids: torch.Tensor,
                         pad_mask: torch.Tensor, causal: bool = True,
                         memory_pad: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the next token, averaged over real (non-pad) target tokens: memory feats
    (B, T, Dm) (padding ``memory_pad`` (B, T)), ids and pad_mask (B, L) -> scalar."""
    logits, _ = model.decode(feats, ids[:, :-1], pad_mask[:, :-1], causal=causal, memory_pad=memory_pad)
    target = ids[:, 1:].masked_fill(pad_mask[:, 1:], -100)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
