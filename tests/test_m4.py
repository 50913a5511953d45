"""m4 shape tests, through the seam only: the DDPM loss (golden), the space-to-depth eps model,
seeded batched sampling, trajectories/figures, checkpoint round trip and the spec file's shape.
Fast: no real training here. (The sampling CLI: tests/test_apps_sample.py; the attribute judge:
tests/test_eval_attributes.py; FID feature caching: tests/test_eval_fid.py.)"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from eval.reference.data.split import to_uint8
from milestones import m4_ddpm as m4
from milestones.adapters import CANDIDATE as impl
from milestones.base import RunContext

pytestmark = [pytest.mark.m4, pytest.mark.usefixtures("one_thread")]
TINY_UNET = dict(base=8, channel_mults=(1, 2), n_res=1, attn_resolutions=(), dropout=0.0, groups=4)


def tiny_model(patch: int = 2, seed: int = 0, T: int = 1000):
    """A tiny eps model whose (normally zero-initialised) output is perturbed by seeded noise:
    every parameter gets seeded noise of scale 0.05 where it starts at zero."""
    mc = impl.ddpm_config(TINY_UNET, {"kind": "linear", "T": T}, patch=patch, image_size=16)
    torch.manual_seed(seed)
    model = impl.ddpm_build(mc).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model, impl.ddpm_schedule(mc), mc


# ----------------------------------------------------------------------------- loss
class _Const(torch.nn.Module):
    """Fake eps model: predicts 0.5 everywhere and records the timesteps it was given."""

    in_ch, image_size = 3, 4

    def forward(self, x, t):
        self.t = t.clone()
        return torch.full_like(x, 0.5)


def test_eps_loss_is_ddpm_simple_loss():
    s = impl.diffusion_schedule("linear", 1000)
    x0 = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model = _Const()
    torch.manual_seed(3)
    loss, m = impl.ddpm_loss(model, x0, s)
    torch.manual_seed(3)  # the same draws by hand: t ~ U{0..T-1}, then eps ~ N(0, I)
    t = torch.randint(0, 1000, (6,))
    eps = torch.randn(x0.shape)
    assert torch.equal(model.t, t)
    assert loss.item() == pytest.approx((0.5 - eps).square().mean().item(), rel=1e-6)
    assert m["mse"].item() == pytest.approx(loss.item(), rel=1e-6)
    # Min-SNR-gamma: w_t = min(SNR_t, g) / SNR_t
    torch.manual_seed(3)
    loss_w, _ = impl.ddpm_loss(model, x0, s, snr_gamma=5.0)
    ab = impl.diffusion_schedule_tables(s)["alpha_bars"][t]
    w = (ab / (1 - ab)).clamp(max=5.0) / (ab / (1 - ab))
    want = (w.float() * (0.5 - eps).square().flatten(1).mean(1)).mean()
    assert loss_w.item() == pytest.approx(want.item(), rel=1e-5)
    # planted bugs: x0 regressed instead of the noise; the model never sees t
    torch.manual_seed(3)
    bug, _ = impl.ddpm_loss(model, x0, s, target="x0")
    assert bug.item() == pytest.approx((0.5 - x0).square().mean().item(), rel=1e-6)
    torch.manual_seed(3)
    blind = m4.TimeBlind(_Const())
    impl.ddpm_loss(blind, x0, s)
    assert (blind.module.t == 0).all()


# ----------------------------------------------------------------------------- model, sampling
def test_eps_model_patch_is_a_pixel_rearrangement():
    model, _, mc = tiny_model(patch=2)
    assert mc["unet"]["in_ch"] == 12 and mc["unet"]["image_size"] == 8 and mc["patch"] == 2
    plain = impl.unet_build({k: tuple(v) if isinstance(v, list) else v for k, v in mc["unet"].items()}).eval()
    plain.load_state_dict({k.removeprefix("unet."): v for k, v in model.state_dict().items()})
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = impl.ddpm_eps(model, x, torch.tensor([5, 900]))
        folded = impl.ddpm_eps(plain, torch.nn.functional.pixel_unshuffle(x, 2), torch.tensor([5, 900]))
    assert out.shape == x.shape
    assert torch.allclose(torch.nn.functional.pixel_unshuffle(out, 2), folded, atol=1e-6)
    with pytest.raises(ValueError):
        impl.ddpm_build({**mc, "image_size": 15})


@pytest.mark.integration
def test_generate_is_seeded_and_batch_independent():
    model, s, _ = tiny_model(T=100)
    kw = dict(bf16=False, progress=False)
    a = impl.ddpm_sample_images(model, s, 4, "ddpm", seed=1, batch_size=4, **kw)
    b = impl.ddpm_sample_images(model, s, 2, "ddpm", seed=1, batch_size=1, **kw)
    c = impl.ddpm_sample_images(model, s, 2, "ddpm", seed=2, batch_size=2, **kw)
    assert a.dtype == torch.uint8 and a.shape == (4, 3, 16, 16)
    assert (a[:2].int() - b.int()).abs().max() <= 1  # same images whatever the batch (round-off)
    assert (a[:2].int() - c.int()).abs().float().mean() > 5
    d1 = impl.ddpm_sample_images(model, s, 3, "ddim", 10, eta=0.0, seed=1, **kw)
    d2 = impl.ddpm_sample_images(model, s, 3, "ddim", 10, eta=0.0, seed=1, **kw)
    assert torch.equal(d1, d2)
    with pytest.raises(ValueError):
        impl.diffusion_sampler(s, "ddpm", 50)
    assert impl.diffusion_sampler(impl.diffusion_schedule(), "ddim").timesteps[:2].tolist() == [980, 960]


@pytest.mark.integration
def test_trajectory_and_figures(tmp_path):
    from eval.diffusion_figures import bar_plot, line_plot, sample_grid, trajectory_strip
    model, s, _ = tiny_model(T=100)
    xs, x0s, ts = m4.trajectory(model, s, "ddpm", n=2, seed=0, n_frames=6)
    assert len(xs) == len(x0s) == len(ts) == 6 and ts[0] == 99 and ts[-1] == -1
    final = impl.ddpm_sample_images(model, s, 2, "ddpm", seed=0, bf16=False, progress=False)
    assert (to_uint8(xs[-1]).int() - final.int()).abs().max() <= 1  # same seeds, same samples
    paths = [trajectory_strip(xs, ts[:-1], tmp_path / "traj.png", n_samples=2, n_frames=6, predicted_x0=x0s),
             sample_grid(final, tmp_path / "grid.png", title="t"),
             line_plot({"a": ([1, 2], [3, 1])}, tmp_path / "l.png", hlines={"floor": 0.5}),
             bar_plot({"x": 1.0, "y": 10.0}, tmp_path / "b.png", logy=True, threshold=5)]
    assert all(Path(p).stat().st_size > 1000 for p in paths)


def test_checkpoint_roundtrip_through_the_engine(tmp_path):
    """The implementation's engine writes the checkpoint; the grader reads it back itself."""
    from eval.reference.data.world import make_split
    recipe = m4.replace(m4.RECIPES["quick"], n_train=32, steps=2, batch_size=8, warmup_steps=1, unet=TINY_UNET,
                        schedule=dict(kind="linear", T=20), bf16=False, channels_last=False)
    model, s, summary = m4.train(recipe, make_split("train", 32, captions=False),
                                 RunContext(out_dir=tmp_path, progress=False))
    loaded, s2, info = m4.load_model(tmp_path / "checkpoint.pt")
    assert s2.T == 20 and info["ema"] and not loaded.training and summary["steps"] == 2
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(impl.ddpm_eps(loaded, x, torch.tensor([3])), impl.ddpm_eps(model, x, torch.tensor([3])))


# ----------------------------------------------------------------------------- the spec file
def test_spec_thresholds_recipes_and_smoke_switch():
    M = m4.MILESTONE
    for profile in ("quick", "full"):
        assert {g.key for g in M.gates} == set(m4.THRESHOLDS[profile])
    assert m4.THRESHOLDS["full"]["fid_ddim50"] == 50.0 == m4.THRESHOLDS["full"]["fid_ddpm"] == m4.SPEC_FID
    assert m4.THRESHOLDS["full"]["ddim_vs_ddpm_fid_rel_diff"] == m4.SPEC_REL_DIFF == 0.10
    assert m4.THRESHOLDS["full"]["ddim_speedup"] == m4.SPEC_SPEEDUP == 15
    # quick: calibrated looser than the spec (results/calibration/m4.md); the spec's bars are spec rows
    rows = m4.spec_rows({"fid_ddim50": 136.0, "fid_ddpm": 117.0, "ddim_eta0_vs_ddpm_fid_rel_diff": 0.41,
                         "ddim_vs_ddpm_fid_rel_diff": 0.13, "ddim_speedup": 14.0}, m4.THRESHOLDS["quick"],
                        m4.RECIPES["quick"], "quick")
    status = {r["gate"]: r["status"] for r in rows}
    assert status == {"fid_ddim50": "spec gate not met", "fid_ddpm": "spec gate not met",
                      "ddim_eta0_vs_ddpm_fid_rel_diff": "spec gate not met",
                      "ddim_vs_ddpm_fid_rel_diff": "spec gate not met", "ddim_speedup": "spec gate not met"}
    assert not any(r["is_the_gate"] for r in rows)
    full = m4.RECIPES["full"]
    assert full.spaces == ("inception",) and full.eta == 0.0 and full.eta_compare is None
    assert full.n_ddim == 10_000 and full.n_ref is None and full.data == "cifar10"
    q = m4.RECIPES["quick"]
    assert q.schedule["T"] == 1000 and q.ddim_steps == 50 and q.spaces[0] == "inception" and q.eta == 0.0 and q.ema_decay
    assert M.recipe(RunContext(profile="full", smoke=True)) is m4.FULL_SMOKE
    assert M.recipe(RunContext(profile="quick")) is q and M.recipe(RunContext(profile="full")) is full
    assert "ddpm_loss" in M.interface and "diffusion_step" in M.interface
    assert all(c.proof.split(":")[0] in ("test", "gate") for c in M.criteria)
    assert asdict(q)["unet"]["base"] > 0 and math.isfinite(m4.THRESHOLDS["quick"]["fid_ddim50"])
    assert "results/calibration/m4.md" in m4.CALIBRATION and "benchmarks/calibrate.py" in m4.CALIBRATION
