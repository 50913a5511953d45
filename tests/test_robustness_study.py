"""The robustness study (issue 21, item 5): its corruptions leave level 0 clean, are deterministic,
keep uint8 (N, 3, H, W) and get monotonically further from the clean image with severity; the
command refuses bad input with exit 2; its smoke run writes the four files."""

import json

import pytest
import torch

from eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt, gaussian_blur, gaussian_noise
from studies.robustness import CURVES, ENCODERS, SMOKE_LEVELS, main


@pytest.fixture(scope="module")
def images():
    from eval.reference.data.world import WorldConfig, make_split
    return make_split("val", 16, WorldConfig(seed=0), single=True, captions=False).images


def test_severity_lists_have_five_or_more_increasing_steps():
    assert set(SEVERITIES) == {"gaussian_noise", "gaussian_blur", "jpeg"}
    for name, values in SEVERITIES.items():
        assert len(values) >= 5, name
    assert list(SEVERITIES["gaussian_noise"]) == sorted(SEVERITIES["gaussian_noise"])
    assert list(SEVERITIES["gaussian_blur"]) == sorted(SEVERITIES["gaussian_blur"])
    assert list(SEVERITIES["jpeg"]) == sorted(SEVERITIES["jpeg"], reverse=True)  # lower quality = worse


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_clean_deterministic_monotone_uint8(name, images):
    assert torch.equal(corrupt(images, name, 0), images)
    dists = []
    for level in range(1, len(SEVERITIES[name]) + 1):
        out = corrupt(images, name, level, seed=3)
        assert out.dtype == torch.uint8 and out.shape == images.shape
        assert torch.equal(out, corrupt(images, name, level, seed=3))
        dists.append((out.float() - images.float()).abs().mean().item())
    assert dists[0] > 0
    assert all(a < b for a, b in zip(dists, dists[1:])), dists


def test_zero_strength_is_identity_and_seed_matters(images):
    assert torch.equal(gaussian_noise(images, 0.0), images) and torch.equal(gaussian_blur(images, 0.0), images)
    assert not torch.equal(gaussian_noise(images, 0.1, seed=0), gaussian_noise(images, 0.1, seed=1))
    with pytest.raises(ValueError):
        corrupt(images, "fog", 1)
    with pytest.raises(ValueError):
        corrupt(images, "jpeg", 6)
    with pytest.raises(ValueError):
        corrupt(images.float(), "jpeg", 1)


def test_command_refuses_bad_input(tmp_path):
    afile = tmp_path / "a.txt"
    afile.write_text("keep")
    out = tmp_path / "out"
    for argv in (["--n-eval", "0"], ["--jobs", "0"], ["--n-bank", "5"], ["--out", str(afile)],
                 ["--n-eval", "5000", "--out", str(out)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
    assert afile.read_text() == "keep" and not out.exists()


@pytest.mark.slow
def test_smoke_run_writes_every_curve(tmp_path):
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    for f in ("robustness.json", "robustness.md", "robustness.png", "embeddings.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    record = json.loads((tmp_path / "robustness.json").read_text())
    assert record["torch_threads"] == 1 and record["recipes"] == "smoke" and record["commit"]
    assert set(record["encoders"]) == set(ENCODERS)
    for encoder, key, _ in CURVES:
        curves = record["encoders"][encoder]["curves"]
        assert set(curves) == set(CORRUPTIONS)
        for name, points in curves.items():
            assert [p["level"] for p in points] == list(SMOKE_LEVELS)
            assert all(0.0 <= p[key] <= 1.0 for p in points), (encoder, name)
    md = (tmp_path / "robustness.md").read_text()
    assert md.count("| clean |") == len(CORRUPTIONS)
