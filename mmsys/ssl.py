"""Self-supervised image representations: SimCLR (Chen et al. 2020) and MoCo v2 (He et al. 2020;
Chen et al. 2020b), on the mmsys ViT or a torchvision ResNet built from scratch.

    cfg = SSLConfig(method="simclr")
    model = SSLModel(cfg)
    pairs = two_views(images, generator)            # mmsys.views: (B, 2, 3, H, W)
    loss, metrics = model.loss(pairs)               # NT-Xent over the 2B views (SimCLR eq. 1)
    feats = model.features(images)                  # (B, feature_dim): what a linear probe reads

The representation is the encoder's output ``h`` (the ViT's final CLS token, the ResNet's pooled
features); the projection head ``g`` (a 2-layer MLP, SimCLR sec. 2.1) maps it to ``z`` where the
contrastive loss is taken, and is thrown away after training.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .views import stack_views
from .vit import ViT, ViTConfig


@dataclass
class SSLConfig:
    method: str = "simclr"  # "simclr" (in-batch negatives) or "moco" (momentum encoder + queue)
    encoder: str = "vit"  # "vit" (mmsys.vit, CLS features), "resnet18" or "resnet50" (torchvision, no weights)
    image_size: int = 32
    # ViT encoder
    patch_size: int = 8
    dim: int = 128
    depth: int = 4
    n_heads: int = 4
    mlp_ratio: float = 2.0
    pool: str = "mean"  # the ViT's representation: "mean" of its patch tokens or its "cls" token
    # projection head h -> z (SimCLR: hidden 2048, out 128 at full size)
    proj_hidden: int = 2048
    proj_dim: int = 128
    temperature: float = 0.5  # tau of NT-Xent / InfoNCE (SimCLR CIFAR 0.5; MoCo v2 0.2)
    # MoCo v2
    queue_size: int = 4096  # negatives kept from earlier batches (K)
    momentum: float = 0.99  # key encoder: theta_k <- m theta_k + (1 - m) theta_q


# ----------------------------------------------------------------------------- encoders


def build_encoder(cfg: SSLConfig) -> tuple[nn.Module, int]:
    """The encoder ``f`` and its feature width: images (B, 3, S, S) in [-1, 1] -> (B, width) (the
    ViT's CLS token; :class:`SSLModel` pools its tokens as ``cfg.pool`` says)."""
    if cfg.encoder == "vit":
        vit = ViT(ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, dim=cfg.dim, depth=cfg.depth,
                            n_heads=cfg.n_heads, mlp_ratio=cfg.mlp_ratio, n_classes=0))
        return vit, cfg.dim
    if cfg.encoder in ("resnet18", "resnet50"):
        return resnet(cfg.encoder, small_images=cfg.image_size <= 64)
    raise ValueError(f"unknown encoder {cfg.encoder!r}: choose vit, resnet18 or resnet50")


def resnet(name: str, small_images: bool) -> tuple[nn.Module, int]:
    """torchvision's ResNet-18/50 with random weights and no classifier; for small images the
    CIFAR stem of SimCLR's appendix B.9 (a 3x3 stride-1 first convolution, no max-pool)."""
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if small_images:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


class ProjectionHead(nn.Sequential):
    """g(h) = W2 ReLU(BN(W1 h)): (B, width) -> (B, proj_dim) (SimCLR sec. 2.1, with batch norm as
    in its code and MoCo v2)."""

    def __init__(self, width: int, hidden: int, out: int):
        super().__init__(nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))


# ----------------------------------------------------------------------------- losses


def nt_xent(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, dict]:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (eq. 1) over 2N views.

    Args:
        z: ``(2N, D)`` projections; rows ``i`` and ``N + i`` are the two views of one image.
    Returns:
        (0-d loss: the mean over all 2N anchors of -log softmax of the positive among the other
        2N - 1 views, cosine similarity / tau), {"pos_acc": share of anchors whose positive is
        the most similar view}.
    """
    n2 = len(z)
    if n2 % 2:
        raise ValueError(f"nt_xent needs an even number of views (2N), got {n2}")
    z = F.normalize(z.float(), dim=-1)
    sim = z @ z.t() / temperature  # (2N, 2N)
    sim = sim.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))  # k != i
    positive = torch.arange(n2, device=z.device).roll(n2 // 2)  # i <-> N + i
    loss = F.cross_entropy(sim, positive)
    return loss, {"pos_acc": (sim.argmax(1) == positive).float().mean()}


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> tuple[torch.Tensor, dict]:
    """MoCo's InfoNCE (He et al. 2020, eq. 1): each query ``q`` (B, D) against its key ``k``
    (B, D) (the positive) and the ``queue`` (K, D) of earlier keys (negatives); all unit vectors.
    Returns (0-d loss, {"pos_acc"})."""
    pos = (q * k).sum(1, keepdim=True)  # (B, 1)
    neg = q @ queue.t()  # (B, K)
    logits = torch.cat([pos, neg], dim=1) / temperature
    target = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target), {"pos_acc": (logits.argmax(1) == 0).float().mean()}


# ----------------------------------------------------------------------------- models


class SSLModel(nn.Module):
    """Encoder f + projection head g, trained by SimCLR or MoCo v2 (``cfg.method``).

    MoCo keeps a key encoder and head (an exponential moving average of f and g, never trained
    by gradients) and a FIFO queue of their keys, as buffers: they are in the state dict, so a
    resumed run continues with the same queue."""

    def __init__(self, cfg: SSLConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.feature_dim = build_encoder(cfg)
        self.head = ProjectionHead(self.feature_dim, cfg.proj_hidden, cfg.proj_dim)
        if cfg.method == "moco":
            self.key_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self.key_head = copy.deepcopy(self.head).requires_grad_(False)
            self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        elif cfg.method != "simclr":
            raise ValueError(f"unknown method {cfg.method!r}: choose simclr or moco")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in [-1, 1] -> the representation h (B, feature_dim)."""
        return self._pooled(self.encoder, images)

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """images -> z = g(h) (B, proj_dim), not normalised."""
        return self.head(self.features(images))

    def _pooled(self, encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if isinstance(encoder, ViT) and self.cfg.pool == "mean":
            return encoder.tokens(images)[0][:, 1:].mean(1)
        return encoder(images)

    def loss(self, pairs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """pairs (B, 2, 3, S, S), the two views of each image -> (0-d loss, metrics)."""
        views = stack_views(pairs)  # (2B, ...): rows i and B + i
        if self.cfg.method == "simclr":
            return nt_xent(self.project(views), self.cfg.temperature)
        return self._moco_loss(views)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for the key encoder and head (MoCo eq. 2);
        batch-norm statistics copied."""
        m = self.cfg.momentum
        for q_mod, k_mod in ((self.encoder, self.key_encoder), (self.head, self.key_head)):
            for pq, pk in zip(q_mod.parameters(), k_mod.parameters()):
                pk.mul_(m).add_(pq.detach(), alpha=1 - m)
            for bq, bk in zip(q_mod.buffers(), k_mod.buffers()):
                bk.copy_(bq)

    def _moco_loss(self, views: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Symmetrised MoCo v2: each view is a query against the other's key; the keys then
        replace the oldest entries of the queue."""
        B = len(views) // 2
        if self.training:
            self.momentum_update()
        q = F.normalize(self.project(views).float(), dim=1)
        with torch.no_grad():
            k = F.normalize(self.key_head(self._pooled(self.key_encoder, views)).float(), dim=1)
        k = k.roll(B, dims=0)  # view i's positive key is the other view of its image
        loss, metrics = info_nce(q, k, self.queue.clone(), self.cfg.temperature)
        if self.training:
            self.enqueue(k[:B])
        return loss, metrics

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (n, D) over the oldest queue entries (FIFO, wrapping around)."""
        K, n = len(self.queue), len(keys)
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % K
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % K)
