"""FID from cached features (eval/fid_stats.py): equal to torchmetrics' FID on the same images,
the low-rank trace equal to torchmetrics' eigvals formula, real features cached by content."""

from pathlib import Path

import pytest
import torch
from torch import nn

from eval import fid_stats as fs
from eval.fid import FeatureAdapter, fid

pytestmark = [pytest.mark.m4, pytest.mark.usefixtures("one_thread")]


def _extractor(dim: int = 64) -> FeatureAdapter:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(dim))
    net(torch.zeros(1, 3, 16, 16))
    return FeatureAdapter(net, dim, name="test-net")


def test_frechet_matches_torchmetrics_fid_and_its_formula():
    from torchmetrics.image.fid import _compute_fid
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (90, 3, 16, 16), generator=g, dtype=torch.uint8)
    fake = (real[:40].int() + torch.randint(-60, 60, (40, 3, 16, 16), generator=g)).clamp(0, 255).to(torch.uint8)
    feat = _extractor()
    a, b = fs.Stats.of(fs.features(real, feat)), fs.Stats.of(fs.features(fake, feat))
    # 40 fake samples < 64 features: the low-rank path; 90 real > 64: torchmetrics' eigvals on the swap
    ours = fs.frechet(a, b)
    assert ours == pytest.approx(fid(real, fake, feat), rel=1e-6)
    assert ours == pytest.approx(float(_compute_fid(a.mu, a.cov, b.mu, b.cov)), rel=1e-6)
    full = fs.Stats(b.mu, b.cov, b.n)  # no factor: the plain eigvals path
    assert fs.frechet(a, full) == pytest.approx(ours, rel=1e-6)
    assert fs.frechet(a, a) == pytest.approx(0.0, abs=1e-6 * float(a.cov.trace()))


def test_real_features_cached_by_content_and_extractor(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSYS_CACHE", str(tmp_path))
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    feat = _extractor()
    f1, i1 = fs.real_features(images, feat)
    f2, i2 = fs.real_features(images, feat)
    assert not i1["cached"] and i2["cached"] and torch.equal(f1, f2) and Path(i2["path"]).is_file()
    other, i3 = fs.real_features(images[:6], feat)
    assert i3["key"] != i1["key"] and torch.equal(other, f1[:6])
    feat.fn[0].weight.data.add_(1.0)  # new weights: a new key (describe() names their sha256)
    _, i4 = fs.real_features(images, feat)
    assert i4["key"] != i1["key"] and not i4["cached"]
