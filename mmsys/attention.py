"""Multi-head scaled dot-product attention: self, causal and cross.

One module serves every tower in mmsys (ViT, CLIP text tower, captioner decoder,
U-Net). It implements Vaswani et al. 2017, eq. 1 ``softmax(QK^T / sqrt(d)) V``
per head, and can return the attention weights for visualisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    """Multi-head attention from queries ``x`` to keys/values ``context``.

    Args:
        dim: width of the queries (and of the output).
        n_heads: number of heads; ``dim`` must be divisible by it.
        context_dim: width of the keys/values for cross-attention (default ``dim``).
        dropout: dropout on the attention weights (training only).
    """

    def __init__(self, dim: int, n_heads: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}")
        context_dim = context_dim or dim
        self.n_heads, self.head_dim, self.dropout = n_heads, dim // n_heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from ``x`` to ``context`` (``x`` itself when None).

        Args:
            x: queries ``(B, N, D)``.
            context: keys/values ``(B, M, Dc)``; ``None`` means self-attention (M = N).
            causal: position i may only attend to positions j <= i (needs M = N).
            key_padding_mask: ``(B, M)`` bool, True where a key is padding and must be ignored.
            need_weights: also return the attention weights.

        Returns:
            ``(out, weights)``: out ``(B, N, D)``; weights ``(B, H, N, M)`` or None.
        """
        context = x if context is None else context
        B, N, D = x.shape
        M = context.shape[1]
        q = self.q(x).view(B, N, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)
        k, v = self.kv(context).view(B, M, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)

        mask = None  # boolean (B|1, 1, N|1, M), True = may attend
        if key_padding_mask is not None:
            mask = (~key_padding_mask.bool())[:, None, None, :]
        if causal:
            if M != N:
                raise ValueError("causal attention needs as many keys as queries")
            tri = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()[None, None]
            mask = tri if mask is None else mask & tri

        p = self.dropout if self.training else 0.0
        if not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            weights = None
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, N, M)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.float().softmax(dim=-1).to(q.dtype)
            out = F.dropout(weights, p) @ v
        out = out.transpose(1, 2).reshape(B, N, D)
        return self.out(out), weights
