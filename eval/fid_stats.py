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
- :func:`real_features`: the features of a real image set, keyed by the images' sha256 and the
  extractor's identity (:func:`extractor_identity`: its ``describe()``, which names the weights'
  sha256), found in the repository's shipped store (``eval/shipped_features/``: the embedded
  world's default Inception sets, :mod:`benchmarks.shipped_features`) or the machine's cache
  (``cache_dir("fid-features")``), else computed and cached: a reference costs once per machine
  at most, and nothing on a fresh checkout of the default.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

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


# The repository's read-only store of real features (float32, as the extractors compute them),
# with MANIFEST.json: per key, the image set, the file's sha256 and where it was made.
SHIPPED = Path(__file__).resolve().parent / "shipped_features"
MANIFEST = SHIPPED / "MANIFEST.json"


def extractor_identity(module: nn.Module) -> dict:
    """What an extractor computes: its ``describe()`` without ``"file"`` (where its weights lie on
    this machine; their sha256 is what identifies them), so a key is the same on every machine."""
    ident = module.describe() if hasattr(module, "describe") else {"name": type(module).__name__}
    return {k: v for k, v in ident.items() if k != "file"}


def feature_key(images: torch.Tensor, module: nn.Module) -> str:
    """The 24-hex key of ``module``'s features of ``images``: sha256 of (the images' digest, the
    extractor's identity as sorted JSON)."""
    return hashlib.sha256(json.dumps({"images": images_digest(images), "extractor": extractor_identity(module)},
                                     sort_keys=True, default=str).encode()).hexdigest()[:24]


def shipped(key: str, n: int) -> tuple[torch.Tensor | None, str | None]:
    """The shipped features of ``key`` when there are ``n`` of them and the file is the one the
    manifest names (sha256), else ``(None, why not)`` (``why`` None when nothing is shipped)."""
    from eval.fid import file_digest
    path = SHIPPED / f"{key}.pt"
    if not path.is_file():
        return None, None
    entry = json.loads(MANIFEST.read_text()).get(key) if MANIFEST.is_file() else None
    if entry is None or file_digest(path) != entry["file_sha256"]:
        return None, f"{path.name} is not the file MANIFEST.json names (sha256): not read"
    feats = torch.load(path, map_location="cpu", weights_only=True)["feats"]
    if feats.shape[0] != n:
        return None, f"{path.name} holds {feats.shape[0]} features, {n} images asked: not read"
    return feats.double(), None


def real_features(images: torch.Tensor, module: nn.Module, cache: bool = True) -> tuple[torch.Tensor, dict]:
    """The features ``(N, F)`` float64 of a real image set under ``module`` (features rather than
    statistics, so any prefix of the set is free: FIDs at several counts).

    Looked up by :func:`feature_key` in the shipped store, then in ``cache_dir("fid-features")``;
    else computed and cached there (atomic write). ``cache=False``: always computed, nothing
    read or written. Returns ``(features, info {key, source: "shipped" | "cached" | "computed",
    path[, shipped_rejected]})``."""
    from eval.reference.data.paths import atomic_torch_save, cache_dir
    key, info = feature_key(images, module), {}
    if cache:
        feats, rejected = shipped(key, len(images))
        if feats is not None:
            return feats, {"key": key, "source": "shipped", "path": str(SHIPPED / f"{key}.pt")}
        if rejected:
            info["shipped_rejected"] = rejected
    path = cache_dir("fid-features") / f"{key}.pt" if cache else None
    if path is not None and path.is_file():
        d = torch.load(path, map_location="cpu", weights_only=True)
        if d["feats"].shape[0] == len(images):
            return d["feats"], {"key": key, "source": "cached", "path": str(path), **info}
    feats = features(images, module)
    if path is not None:
        atomic_torch_save({"feats": feats, "extractor": json.dumps(extractor_identity(module), default=str)}, path)
    return feats, {"key": key, "source": "computed", "path": str(path) if path else None, **info}
