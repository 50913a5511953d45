"""FID from cached features (eval/fid_stats.py): equal to torchmetrics' FID on the same images,
the low-rank trace equal to torchmetrics' eigvals formula, real features cached by content."""

import json
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
    assert (i1["source"], i2["source"]) == ("computed", "cached") and torch.equal(f1, f2) and Path(i2["path"]).is_file()
    other, i3 = fs.real_features(images[:6], feat)
    assert i3["key"] != i1["key"] and torch.equal(other, f1[:6])
    feat.fn[0].weight.data.add_(1.0)  # new weights: a new key (describe() names their sha256)
    _, i4 = fs.real_features(images, feat)
    assert i4["key"] != i1["key"] and i4["source"] == "computed"
    _, i5 = fs.real_features(images, feat, cache=False)
    assert i5["source"] == "computed" and i5["path"] is None


def _ship(store: Path, key: str, feats: torch.Tensor, **extra) -> Path:
    from eval.fid import file_digest
    path = store / f"{key}.pt"
    torch.save({"feats": feats.float(), **extra}, path)
    (store / "MANIFEST.json").write_text(json.dumps({key: {"file_sha256": file_digest(path)}}))
    return path


def test_real_features_read_from_the_shipped_store_only_when_the_manifest_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSYS_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "shipped"
    store.mkdir()
    monkeypatch.setattr(fs, "SHIPPED", store)
    monkeypatch.setattr(fs, "MANIFEST", store / "MANIFEST.json")
    images = torch.randint(0, 256, (12, 3, 16, 16), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    feat = _extractor()
    want, key = fs.features(images, feat), fs.feature_key(images, feat)
    path = _ship(store, key, want)
    got, info = fs.real_features(images, feat)
    assert info["source"] == "shipped" and torch.equal(got, want.float().double())
    assert not list((tmp_path / "cache").rglob("*.pt"))  # read, nothing cached
    _, other = fs.real_features(images[:6], feat)  # other images: another key, computed
    assert other["source"] == "computed"
    torch.save({"feats": (want + 1).float(), "edited": True}, path)  # not the file the manifest names
    got, info = fs.real_features(images, feat)
    assert info["source"] == "computed" and "sha256" in info["shipped_rejected"] and torch.equal(got, want)
    _ship(store, key, want[:5])  # the manifest's file, the wrong count
    _, info = fs.real_features(images, feat)
    assert info["source"] == "cached" and "5 features, 12 images" in info["shipped_rejected"]


def test_the_committed_shipped_store_is_what_its_manifest_names():
    from eval.fid import file_digest
    manifest = json.loads(fs.MANIFEST.read_text())
    assert sorted(p.stem for p in fs.SHIPPED.glob("*.pt")) == sorted(manifest)
    for key, entry in manifest.items():
        path = fs.SHIPPED / f"{key}.pt"
        assert file_digest(path) == entry["file_sha256"], f"{path.name}: run python -m benchmarks.shipped_features --write"
        assert path.stat().st_size < 5e6 and torch.load(path, weights_only=True)["feats"].shape == (entry["n"], 2048)


@pytest.mark.slow
def test_the_shipped_features_are_the_default_worlds_and_recompute_equal():
    """Today's world and Inception weights still hit the shipped keys (else m4 on a fresh
    checkout computes them, ~210 s), and 8 recomputed features agree with the shipped ones."""
    from benchmarks.shipped_features import MAX_ABS, default_sets
    from eval.fid import FeatureExtractorMissing, InceptionPool3
    try:
        module = InceptionPool3()
    except FeatureExtractorMissing as e:
        pytest.skip(f"no Inception weights: {e}")
    for label, images in default_sets().items():
        feats, rejected = fs.shipped(fs.feature_key(images, module), len(images))
        assert feats is not None, f"{label}: {rejected or 'not shipped'}: run python -m benchmarks.shipped_features --write"
        assert float((fs.features(images[:8], module) - feats[:8]).abs().max()) <= MAX_ABS
