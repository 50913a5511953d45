"""Pre-LayerNorm transformer blocks and stacks, shared by every tower in mmsys.

A block is ``x + SelfAttn(LN(x))`` [+ ``x + CrossAttn(LN(x), context)``] ``+ MLP(LN(x))``
(the pre-LN arrangement of Xiong et al. 2020, which trains without warm-up tricks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import MultiHeadAttention


class MLP(nn.Sequential):
    """Position-wise feed-forward network ``(B, N, D) -> (B, N, D)``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))


@dataclass
class BlockOutput:
    """What a block or stack returns: the features and, when asked, attention weights."""

    x: torch.Tensor  # (B, N, D)
    self_weights: list[torch.Tensor]  # per block: (B, H, N, N)
    cross_weights: list[torch.Tensor]  # per block: (B, H, N, M)


class Block(nn.Module):
    """One pre-LN transformer block; cross-attention is present iff ``context_dim`` is given."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, n_heads, dropout=dropout)
        self.cross = None
        if context_dim is not None:
            self.ln_cross = nn.LayerNorm(dim)
            self.cross = MultiHeadAttention(dim, n_heads, context_dim=context_dim, dropout=dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, context=None, *, causal=False, padding_mask=None, context_padding_mask=None,
                need_weights=False):
        """x: (B, N, D); context: (B, M, Dc) for cross-attention; masks: (B, N) / (B, M) bool,
        True = padding. Returns ``(x, self_weights, cross_weights)`` (weights None unless asked)."""
        h, w_self = self.attn(self.ln1(x), causal=causal, key_padding_mask=padding_mask,
                              need_weights=need_weights)
        x = x + self.drop(h)
        w_cross = None
        if self.cross is not None:
            if context is None:
                raise ValueError("this block has cross-attention and needs a context")
            h, w_cross = self.cross(self.ln_cross(x), context, key_padding_mask=context_padding_mask,
                                    need_weights=need_weights)
            x = x + self.drop(h)
        x = x + self.mlp(self.ln2(x))
        return x, w_self, w_cross


class Transformer(nn.Module):
    """A stack of ``depth`` blocks followed by a final LayerNorm."""

    def __init__(self, dim: int, depth: int, n_heads: int, mlp_ratio: float = 4.0,
                 context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, n_heads, mlp_ratio, context_dim, dropout) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, x, context=None, *, causal=False, padding_mask=None, context_padding_mask=None,
                need_weights=False) -> BlockOutput:
        """x: (B, N, D) -> BlockOutput with x (B, N, D) and per-block weights when asked."""
        selfs, crosses = [], []
        for block in self.blocks:
            x, ws, wc = block(x, context, causal=causal, padding_mask=padding_mask,
                              context_padding_mask=context_padding_mask, need_weights=need_weights)
            if need_weights:
                selfs.append(ws)
                if wc is not None:
                    crosses.append(wc)
        return BlockOutput(self.ln_f(x), selfs, crosses)
