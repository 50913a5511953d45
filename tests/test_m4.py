"""m4 pieces: the eps loss (golden), the space-to-depth eps model, seeded batched sampling, the
sample CLI on a tiny checkpoint, the AttributeNet judge (API, reading order, cache), FID feature
caching, trajectories/figures and the spec file's shape. Fast: no real training here."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from milestones import m4_ddpm as m4
from mmsys import attributes as attr
from mmsys import sample as smp
from mmsys.checkpoint import save_checkpoint
from mmsys.diffusion.schedule import NoiseSchedule
from mmsys.diffusion.unet import UNetConfig

pytestmark = [pytest.mark.m4, pytest.mark.usefixtures("one_thread")]
TINY_UNET = dict(base=8, channel_mults=(1, 2), n_res=1, attn_resolutions=(), dropout=0.0, groups=4)


def tiny_model(patch: int = 2, seed: int = 0, T: int = 1000) -> tuple[smp.EpsModel, NoiseSchedule, dict]:
    """A tiny eps model whose (normally zero-initialised) output layer is seeded noise."""
    mc = smp.model_config(TINY_UNET, {"kind": "linear", "T": T}, patch=patch, image_size=16)
    torch.manual_seed(seed)
    model = smp.build_model(mc).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.unet.conv_out.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model, smp.build_schedule(mc["schedule"]), mc


# ----------------------------------------------------------------------------- loss
class _Const(torch.nn.Module):
    """Fake eps model: predicts 0.5 everywhere and records the timesteps it was given."""

    def forward(self, x, t):
        self.t = t.clone()
        return torch.full_like(x, 0.5)


def test_eps_loss_is_ddpm_simple_loss():
    s = NoiseSchedule.linear()
    x0 = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model = _Const()
    torch.manual_seed(3)
    loss, m = m4.eps_loss(model, x0, s)
    torch.manual_seed(3)  # the same draws by hand: t ~ U{0..T-1}, then eps ~ N(0, I)
    t = torch.randint(0, 1000, (6,))
    eps = torch.randn(x0.shape)
    assert torch.equal(model.t, t)
    assert loss.item() == pytest.approx((0.5 - eps).square().mean().item(), rel=1e-6)
    assert m["mse"].item() == pytest.approx(loss.item(), rel=1e-6)
    # Min-SNR-gamma: w_t = min(SNR_t, g) / SNR_t
    torch.manual_seed(3)
    loss_w, _ = m4.eps_loss(model, x0, s, snr_gamma=5.0)
    ab = s.alpha_bars[t]
    w = (ab / (1 - ab)).clamp(max=5.0) / (ab / (1 - ab))
    want = (w.float() * (0.5 - eps).square().flatten(1).mean(1)).mean()
    assert loss_w.item() == pytest.approx(want.item(), rel=1e-5)
    # planted bugs: x0 regressed instead of the noise; the model never sees t
    torch.manual_seed(3)
    bug, _ = m4.eps_loss(model, x0, s, bug="x0_target")
    assert bug.item() == pytest.approx((0.5 - x0).square().mean().item(), rel=1e-6)
    torch.manual_seed(3)
    m4.eps_loss(model, x0, s, bug="no_time")
    assert (model.t == 0).all()


def test_snr_weight_golden():
    s = NoiseSchedule.linear()
    # SNR at t = 999 is alpha_bar / (1 - alpha_bar) = 4.0358e-5 / (1 - 4.0358e-5)
    assert s.snr(torch.tensor([999])).item() == pytest.approx(4.0360e-5, rel=1e-3)
    assert s.snr(torch.tensor([0])).item() == pytest.approx(0.9999 / 1e-4, rel=1e-6)


# ----------------------------------------------------------------------------- model, sampling
def test_eps_model_patch_is_a_pixel_rearrangement():
    model, _, mc = tiny_model(patch=2)
    assert mc["unet"]["in_ch"] == 12 and mc["unet"]["image_size"] == 8 and mc["patch"] == 2
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([5, 900]))
        folded = model.unet(torch.nn.functional.pixel_unshuffle(x, 2), torch.tensor([5, 900]))
    assert out.shape == x.shape
    assert torch.allclose(torch.nn.functional.pixel_unshuffle(out, 2), folded, atol=1e-6)
    with pytest.raises(ValueError):
        smp.EpsModel(UNetConfig(in_ch=3, image_size=16), patch=2, image_size=16)


def test_generate_is_seeded_and_batch_independent():
    model, s, _ = tiny_model(T=100)
    a = smp.generate(model, s, 4, "ddpm", seed=1, batch_size=4, bf16=False, progress=False)
    b = smp.generate(model, s, 2, "ddpm", seed=1, batch_size=1, bf16=False, progress=False)
    c = smp.generate(model, s, 2, "ddpm", seed=2, batch_size=2, bf16=False, progress=False)
    assert a.dtype == torch.uint8 and a.shape == (4, 3, 16, 16)
    assert (a[:2].int() - b.int()).abs().max() <= 1  # same images whatever the batch (round-off)
    assert (a[:2].int() - c.int()).abs().float().mean() > 5
    d1 = smp.generate(model, s, 3, "ddim", 10, eta=0.0, seed=1, bf16=False, progress=False)
    d2 = smp.generate(model, s, 3, "ddim", 10, eta=0.0, seed=1, bf16=False, progress=False)
    assert torch.equal(d1, d2)
    with pytest.raises(ValueError):
        smp.make_sampler(s, "ddpm", 50)
    assert smp.make_sampler(NoiseSchedule.linear(), "ddim").timesteps[:2].tolist() == [980, 960]


def test_trajectory_and_figures(tmp_path):
    from eval.diffusion_figures import bar_plot, line_plot, sample_grid, trajectory_strip
    model, s, _ = tiny_model(T=100)
    xs, x0s, ts = m4.trajectory(model, s, "ddpm", n=2, seed=0, n_frames=6)
    assert len(xs) == len(x0s) == len(ts) == 6 and ts[0] == 99 and ts[-1] == -1
    final = smp.generate(model, s, 2, "ddpm", seed=0, bf16=False, channels_last=False, progress=False)
    assert (smp.to_uint8(xs[-1]).int() - final.int()).abs().max() <= 1  # same seeds, same samples
    paths = [trajectory_strip(xs, ts[:-1], tmp_path / "traj.png", n_samples=2, n_frames=6, predicted_x0=x0s),
             sample_grid(final, tmp_path / "grid.png", title="t"),
             line_plot({"a": ([1, 2], [3, 1])}, tmp_path / "l.png", hlines={"floor": 0.5}),
             bar_plot({"x": 1.0, "y": 10.0}, tmp_path / "b.png", logy=True, threshold=5)]
    assert all(Path(p).stat().st_size > 1000 for p in paths)


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model, _, mc = tiny_model(T=20)
    ema = {"decay": 0.9, "num_updates": 1, "module": model.state_dict()}
    path = tmp_path_factory.mktemp("ck") / "checkpoint.pt"
    save_checkpoint(path, {"kind": smp.KIND, "step": 1, "model": model.state_dict(), "ema": ema,
                           "model_config": mc})
    return path


def test_load_ddpm_roundtrip(tiny_checkpoint):
    model, s, info = smp.load_ddpm(tiny_checkpoint)
    assert s.T == 20 and info["ema"] and not model.training
    ref, _, _ = tiny_model(T=20)
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(model(x, torch.tensor([3])), ref(x, torch.tensor([3])))


def test_sample_cli(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["--checkpoint", str(tiny_checkpoint), "--sampler", "ddim", "--steps", "5", "-n", "6", "--seed", "0",
            "-o", str(out), "--no-progress", "--save-tensor", str(tmp_path / "x.pt")]
    assert smp.main(args) == 0
    assert out.stat().st_size > 100 and "wrote" in capsys.readouterr().out
    x = torch.load(tmp_path / "x.pt")
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.uint8
    assert smp.main(args) == 2 and "--force" in capsys.readouterr().err  # never overwrites silently
    assert smp.main(args + ["--force"]) == 0
    assert smp.main(["--checkpoint", str(tiny_checkpoint), "--sampler", "ddpm", "-n", "2", "-o",
                     str(tmp_path / "p.png"), "--no-progress"]) == 0
    assert smp.main(["--checkpoint", str(tiny_checkpoint), "--sampler", "ddpm", "--steps", "5", "-o",
                     str(tmp_path / "q.png")]) == 2
    assert "all T=20 steps" in capsys.readouterr().err
    assert smp.main(["--checkpoint", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "z.png")]) == 2
    err = capsys.readouterr().err
    assert "python grader.py m4" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- the judge
def test_scene_targets_reading_order():
    scenes = {"n_objects": torch.tensor([1, 2, 2]),
              "shape": torch.tensor([[3, 0], [1, 2], [4, 5]]), "colour": torch.tensor([[1, 0], [2, 3], [4, 5]]),
              "size": torch.tensor([[0, 0], [1, 0], [0, 1]]),
              "col": torch.tensor([[2, 0], [2, 0], [1, 1]]), "row": torch.tensor([[1, 0], [1, 1], [2, 0]])}
    y = attr.scene_targets(scenes)
    assert y["n_objects"].tolist() == [0, 1, 1]
    # scene 1: B (col 0) is left of A (col 2) -> B first; scene 2: B (row 0) above A -> B first
    assert y["shape"].tolist() == [3, 2, 5] and y["second_shape"].tolist() == [-1, 1, 4]
    assert y["col"].tolist() == [2, 0, 1] and y["second_col"].tolist() == [-1, 2, 1]
    assert y["row"].tolist() == [1, 1, 0] and y["second_row"].tolist() == [-1, 1, 2]


def test_attribute_net_api_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSYS_CACHE", str(tmp_path))
    cfg = attr.AttributeConfig(n_train=256, n_test=64, steps=3, batch_size=64, warmup_steps=1)
    model, info = attr.load_or_train(cfg, progress=False)
    assert info["trained_now"] and Path(info["path"]).parent == tmp_path / "judges"
    assert Path(info["path"]).name == f"attributes-{attr.recipe_hash(cfg)}.pt" and len(info["sha256"]) == 64
    assert set(info["test_accuracies"]) >= {"single/shape", "single/colour", "mixed/n_objects", "two/second_shape"}
    again, info2 = attr.load_or_train(cfg, progress=False)
    assert not info2["trained_now"] and info2["sha256"] == info["sha256"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert attr.recipe_hash(cfg) != attr.recipe_hash(attr.AttributeConfig())
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    from mmsys.data.split import to_float
    feats = attr.AttributeFeatures(model)(to_float(images))
    assert feats.shape == (5, cfg.feature_dim) and (feats >= 0).all()
    pred = attr.predict_attributes(model, images)
    assert set(pred) == {"n_objects"} | set(attr.HEADS) | {f"second_{k}" for k in attr.HEADS}
    assert all(v.shape == (5,) and v.dtype == torch.long for v in pred.values())
    assert set(pred["n_objects"].tolist()) <= {1, 2} and (pred["shape"] < 10).all() and (pred["colour"] < 8).all()


def test_cached_features_compute_once():
    calls = []

    class F(torch.nn.Module):
        num_features = 2

        def forward(self, x):
            calls.append(len(x))
            return x.float().flatten(1)[:, :2].double()

    cf = m4.CachedFeatures(F())
    x = torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8)
    assert torch.equal(cf(x), cf(x.clone())) and calls == [4]
    cf(x[:2])
    assert calls == [4, 2]


# ----------------------------------------------------------------------------- the spec file
def test_spec_thresholds_recipes_and_smoke_switch(monkeypatch):
    M = m4.MILESTONE
    for profile in ("quick", "full"):
        assert {g.key for g in M.gates} == set(m4.THRESHOLDS[profile])
    assert m4.THRESHOLDS["full"]["fid_ddim50"] == 50.0
    assert m4.THRESHOLDS["quick"]["ddim_vs_ddpm_fid_rel_diff"] == 0.10 and m4.THRESHOLDS["quick"]["ddim_speedup"] == 15
    full = m4.RECIPES["full"]
    assert full.feature == "inception" and full.n_ddim == 10_000 and full.n_ref is None and full.data == "cifar10"
    q = m4.RECIPES["quick"]
    assert q.schedule["T"] == 1000 and q.ddim_steps == 50 and q.feature == "attributes" and q.ema_decay
    monkeypatch.setenv("MMSYS_M4_FULL_SMOKE", "1")
    assert m4.recipe_for("full") is m4.FULL_SMOKE and m4.recipe_for("quick") is q
    monkeypatch.setenv("MMSYS_M4_FULL_SMOKE", "0")
    assert m4.recipe_for("full") is full
    assert "mmsys.sample" in M.interface and all(c.proof.split(":")[0] in ("test", "gate") for c in M.criteria)
    assert asdict(q)["unet"]["base"] > 0 and math.isfinite(m4.THRESHOLDS["quick"]["fid_ddim50"])
