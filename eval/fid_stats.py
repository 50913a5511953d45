"""FID from feature statistics: features computed once per image set, any number of distances.

:func:`eval.fid.fid` runs torchmetrics end to end (features of both sets for every distance).
When one generated set is compared at several sample counts, against several references, or
in two feature spaces, computing its features once is what makes an Inception FID affordable
on a CPU (TF-2015 Inception at 299x299 costs ~0.3 s per image on one thread). Here:

- :func:`features`: ``(N, F)`` float64 features of uint8 images, in batches;
- :class:`Stats`: mean ``(F,)`` and sample covariance ``(F, F)`` (N - 1), float64;
- :func:`frechet`: the distance between two :class:`Stats`, torchmetrics' formula
  (``torchmetrics.image.fid._compute_fid``: ``||mu1-mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2))``),
  so a value equals :func:`eval.fid.fid` on the same images (tests/test_eval_fid_stats.py); the
  trace term from a low-rank factor when a set has fewer samples than features (fast and exact);
- :func:`real_features`: the features of a real image set, cached on disk under
  ``cache_dir("fid-features")`` keyed by the images' sha256 and the extractor's identity (its
  ``describe()``, which names the weights' sha256), so the reference costs once per machine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Stats:
    """Gaussian statistics of features: ``mu`` (F,), ``cov`` (F, F) float64, ``n`` samples, and
    (when built from features) ``centered`` ``(n, F)``, the low-rank factor of ``cov``."""

    mu: torch.Tensor
    cov: torch.Tensor
    n: int
    centered: torch.Tensor | None = None

    @staticmethod
    def of(feats: torch.Tensor) -> "Stats":
        """feats ``(N, F)``, N >= 2 -> mean and unbiased covariance (float64)."""
        if feats.ndim != 2 or len(feats) < 2:
            raise ValueError(f"need (N >= 2, F) features, got {tuple(feats.shape)}")
        f = feats.double()
        mu = f.mean(0)
        c = f - mu
        return Stats(mu, c.T @ c / (len(f) - 1), len(f), c)


@torch.no_grad()
def features(images: torch.Tensor, module: nn.Module, batch_size: int = 100) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> ``(N, F)`` float64, the module in eval mode (mode restored)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    was = module.training
    module.eval()
    try:
        return torch.cat([module(images[i:i + batch_size]).double() for i in range(0, len(images), batch_size)])
    finally:
        module.train(was)


def _trace_sqrt_product(a: Stats, b: Stats) -> torch.Tensor:
    """tr sqrt(S_a S_b). With ``b``'s factor X (n x F, n - 1 < F; S_b = X^T X / (n - 1)) the
    non-zero eigenvalues of S_a S_b are those of the symmetric n x n matrix X S_a X^T / (n - 1):
    the same value as torchmetrics' ``eigvals(S_a @ S_b)``, from an n x n ``eigvalsh`` (exact
    PSD arithmetic, and ~100x cheaper for 2048-d features and a few hundred samples)."""
    for p, q in ((a, b), (b, a)):
        if q.centered is not None and q.n - 1 < len(q.mu):
            x = q.centered
            return torch.linalg.eigvalsh(x @ p.cov @ x.T / (q.n - 1)).clamp_min(0).sqrt().sum()
    return torch.linalg.eigvals(a.cov @ b.cov).sqrt().real.sum()


def frechet(a: Stats, b: Stats) -> float:
    """Frechet distance between two feature Gaussians, float64: torchmetrics' formula
    (``torchmetrics.image.fid._compute_fid``: ``||mu_a - mu_b||^2 + tr(S_a + S_b) - 2 tr sqrt(S_a
    S_b)``), the trace term from a low-rank factor when one set has fewer samples than features."""
    return float(((a.mu - b.mu).square().sum() + a.cov.trace() + b.cov.trace() - 2 * _trace_sqrt_product(a, b)).item())


def fid_features(real: Stats | torch.Tensor, fake: torch.Tensor) -> float:
    """FID of fake features ``(M, F)`` against real statistics (or real features ``(N, F)``)."""
    return frechet(real if isinstance(real, Stats) else Stats.of(real), Stats.of(fake))


def images_digest(images: torch.Tensor) -> str:
    """sha256 of a uint8 image tensor's shape and bytes."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()


def real_features(images: torch.Tensor, module: nn.Module, cache: bool = True) -> tuple[torch.Tensor, dict]:
    """The features ``(N, F)`` float64 of a real image set under ``module``, cached on disk
    (features rather than statistics, so any prefix of the set is free: FIDs at several counts).

    Key: sha256 of (images digest, ``module.describe()`` as sorted JSON). File
    ``cache_dir("fid-features")/<key>.pt`` (atomic write). Returns ``(features, info {key,
    cached, path})``."""
    from eval.reference.data.paths import atomic_torch_save, cache_dir
    ident = module.describe() if hasattr(module, "describe") else {"name": type(module).__name__}
    key = hashlib.sha256(json.dumps({"images": images_digest(images), "extractor": ident},
                                    sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = cache_dir("fid-features") / f"{key}.pt" if cache else None
    if path is not None and path.is_file():
        d = torch.load(path, map_location="cpu", weights_only=True)
        if d["feats"].shape[0] == len(images):
            return d["feats"], {"key": key, "cached": True, "path": str(path)}
    feats = features(images, module)
    if path is not None:
        atomic_torch_save({"feats": feats, "extractor": json.dumps(ident, default=str)}, path)
    return feats, {"key": key, "cached": False, "path": str(path) if path else None}
