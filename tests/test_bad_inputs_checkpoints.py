"""Issue 18, bad checkpoints: an unknown model_config key, a wrong-shape or NaN weight, a
missing ``extra``, mixed key types and a model_config asking for a huge model are each one
CheckpointError line naming the file -- from every milestone loader (the grader's
``milestones.common.load_into``), from the library loaders the command lines use
(``mmsys.checkpoint.load_into``), and as exit 2 with nothing written from ``grader.py m1``
and ``python -m apps.sample``. A valid checkpoint still loads to the same weights.

The checkpoints are tiny models built here and saved with ``save_checkpoint``; no training."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmsys import captioner, clip, text2image, vit
from mmsys.checkpoint import CheckpointError, save_checkpoint
from mmsys.diffusion import ddpm
from mmsys.text import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
TOK = Tokenizer.train(["a red circle", "a blue star on the left"])
TINY_UNET = dict(base=8, channel_mults=(1, 2), n_res=1, attn_resolutions=(8,), dropout=0.0, groups=4, n_heads=2)
TINY_CLIP = dict(image_tower="vit", image_size=32, patch_size=8, vision_dim=16, vision_depth=1, vision_heads=2,
                 context_length=24, text_dim=16, text_depth=1, text_heads=2, mlp_ratio=2.0, embed_dim=16,
                 vocab_size=len(TOK))
HUGE = dict(dim=32_768, depth=64)  # the example: ~8e11 parameters


def _vit():
    mc = dict(dim=16, depth=1, n_heads=2, patch_size=8)
    return vit.ViT(vit.ViTConfig(**mc)), mc, {}, {**mc, **HUGE, "n_heads": 8}


def _clip():
    return (clip.build_model(TINY_CLIP), TINY_CLIP, {"tokenizer": TOK.state_dict()},
            {**TINY_CLIP, "text_dim": 32_768, "text_depth": 64, "vision_dim": 32_768, "vision_depth": 64})


def _captioner():
    mc = dict(vocab_size=len(TOK), enc_dim=16, enc_depth=1, enc_heads=2, dim=16, depth=1, n_heads=2)
    return (captioner.Captioner(captioner.CaptionerConfig(**mc)), mc, {"tokenizer": TOK.state_dict()},
            {**mc, **HUGE, "n_heads": 8})


def _ddpm():
    mc = ddpm.model_config(TINY_UNET, {"T": 100})
    huge = ddpm.model_config({**TINY_UNET, "base": 32_768}, {"T": 100})
    return ddpm.build_model(mc), mc, {}, huge


def _t2i():
    torch.manual_seed(0)
    model = text2image.from_clip(text2image.TextToImageConfig(unet=TINY_UNET), clip.build_model(TINY_CLIP), TOK)
    mc = model.cfg.to_dict()
    huge = {**mc, "unet": {**mc["unet"], "base": 32_768}}
    return model, mc, {"tokenizer": TOK.state_dict()}, huge


# kind -> (model builder, milestone module, loader call, library loader call)
KINDS = {
    "vit": (_vit, lambda p: __import__("milestones.m1_vit", fromlist=["x"]).load_model(p), None),
    "clip": (_clip, lambda p: __import__("milestones.m2_clip", fromlist=["x"]).load_clip(p), clip.load_clip),
    "captioner": (_captioner, lambda p: __import__("milestones.m3_caption", fromlist=["x"]).load_trained(p),
                  captioner.load_captioner),
    "ddpm": (_ddpm, lambda p: __import__("milestones.m4_ddpm", fromlist=["x"]).load_model(p), ddpm.load_ddpm),
    text2image.CHECKPOINT_KIND: (_t2i, lambda p: _m5_load(p), text2image.load_text2image),
}


def _m5_load(path):
    from milestones.base import RunContext
    from milestones.m5_text_to_image import load_text2image
    return load_text2image(path, RunContext(progress=False))


def payload(kind: str) -> dict:
    """A valid checkpoint dict of ``kind`` (a tiny model, seeded)."""
    torch.manual_seed(0)
    model, mc, extra, _ = KINDS[kind][0]()
    return copy.deepcopy({"kind": kind, "format_version": 1, "step": 1, "model": model.state_dict(),
                          "model_config": mc, "extra": extra})


def _first_float(weights: dict) -> str:
    return next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)


def unknown_key(ck, kind):
    if kind == "ddpm":
        ck["model_config"]["unet"]["bogus"] = 1  # a U-Net field
        return
    ck["model_config"]["bogus"] = 1


def unknown_top_key(ck, kind):
    ck["model_config"]["bogus"] = 1


def wrong_shape(ck, kind):
    k = _first_float(ck["model"])
    ck["model"][k] = torch.zeros(*(s + 1 for s in ck["model"][k].shape))


def nan_weight(ck, kind):
    k = _first_float(ck["model"])
    ck["model"][k] = ck["model"][k].clone().fill_(math.nan)


def missing_extra(ck, kind):
    ck["extra"] = {}


def no_extra(ck, kind):
    del ck["extra"]


def mixed_keys(ck, kind):
    ck[1] = "x"
    del ck["step"]


def mixed_weight_keys(ck, kind):
    ck["model"][7] = torch.zeros(1)


def huge(ck, kind):
    ck["model_config"] = KINDS[kind][0]()[3]


BAD = {"unknown model_config key": unknown_key, "unknown top-level model_config key": unknown_top_key,
       "wrong-shape weight": wrong_shape, "NaN weight": nan_weight, "mixed key types": mixed_keys,
       "mixed weight-name types": mixed_weight_keys, "huge model_config": huge}
NEEDS_EXTRA = ("clip", "captioner", text2image.CHECKPOINT_KIND)
CASES = [(kind, name) for kind in KINDS for name in BAD] + \
        [(kind, name) for kind in NEEDS_EXTRA for name in ("missing extra['tokenizer']", "no extra")]
BAD.update({"missing extra['tokenizer']": missing_extra, "no extra": no_extra})
EXPECT = {"unknown model_config key": "bogus", "unknown top-level model_config key": "bogus",
          "wrong-shape weight": ("wrong shape", "size mismatch"), "NaN weight": "NaN", "mixed key types": "not strings",
          "mixed weight-name types": "not strings", "huge model_config": None,
          "missing extra['tokenizer']": "tokenizer", "no extra": "extra"}


def write_bad(tmp_path: Path, kind: str, name: str) -> Path:
    ck = payload(kind)
    BAD[name](ck, kind)
    path = tmp_path / f"{kind}-{name.replace(' ', '_')}.pt"
    torch.save(ck, path)  # save_checkpoint would refuse some of these
    return path


def assert_one_line(msg: str, path: Path, expect: str | tuple | None):
    """One line, no traceback, naming ``path`` and (one of) ``expect``."""
    assert "\n" not in msg.strip() and "Traceback" not in msg, msg
    assert str(path) in msg, msg
    if expect:
        assert any(e in msg for e in ((expect,) if isinstance(expect, str) else expect)), msg


@pytest.mark.parametrize("kind,name", CASES)
def test_milestone_loader_refuses(tmp_path, kind, name):
    """Each milestone loader (the grader's reading + the seam's builders): one CheckpointError line."""
    from milestones.common import CheckpointError as GraderCheckpointError
    path = write_bad(tmp_path, kind, name)
    with pytest.raises(GraderCheckpointError) as e:
        KINDS[kind][1](path)
    assert_one_line(str(e.value), path, EXPECT[name])
    if name == "huge model_config" and kind != text2image.CHECKPOINT_KIND:
        assert "MMSYS_MAX_PARAMS" in str(e.value)  # sized up on the meta device: nothing allocated


@pytest.mark.parametrize("kind,name", [c for c in CASES if KINDS[c[0]][2] is not None])
def test_library_loader_refuses(tmp_path, kind, name):
    """The loaders the command lines use raise mmsys.checkpoint.CheckpointError, one line."""
    path = write_bad(tmp_path, kind, name)
    with pytest.raises(CheckpointError) as e:
        KINDS[kind][2](path)
    assert_one_line(str(e.value), path, EXPECT[name])


@pytest.mark.parametrize("kind", list(KINDS))
def test_valid_checkpoint_loads_the_same_weights(tmp_path, kind):
    """A good checkpoint loads through the checked path: the same tensors, EMA preferred."""
    ck = payload(kind)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in ck["model"].items()}
    ck["ema"] = {"module": ema}
    save_checkpoint(tmp_path / "ck.pt", ck)
    for load in (KINDS[kind][1], KINDS[kind][2]):
        if load is None:
            continue
        out = load(tmp_path / "ck.pt")
        model = out[0] if isinstance(out, tuple) else out
        got = model.state_dict()
        assert set(got) == set(ema) and all(torch.equal(got[k].cpu(), ema[k]) for k in ema)


def test_parameter_limit_is_stated_and_overridable(tmp_path, monkeypatch):
    """MMSYS_MAX_PARAMS lowers / raises the limit; a bad value is one line too."""
    from milestones.common import CheckpointError
    from milestones.m1_vit import load_model
    save_checkpoint(tmp_path / "ck.pt", payload("vit"))
    load_model(tmp_path / "ck.pt")
    monkeypatch.setenv("MMSYS_MAX_PARAMS", "100")
    with pytest.raises(CheckpointError, match="MMSYS_MAX_PARAMS") as e:
        load_model(tmp_path / "ck.pt")
    assert "limit of 100" in str(e.value)
    monkeypatch.setenv("MMSYS_MAX_PARAMS", "lots")
    with pytest.raises(CheckpointError, match="MMSYS_MAX_PARAMS"):
        load_model(tmp_path / "ck.pt")


def test_build_that_cannot_run_on_meta_still_loads_and_is_checked(tmp_path):
    """A build needing real tensors (``.item()``) skips the meta sizing: a good checkpoint loads,
    a wrong shape is still one line, and the real model is sized up against the limit."""
    from mmsys.checkpoint import load_into

    def build(mc):
        model = vit.ViT(vit.ViTConfig(**mc))
        float(torch.zeros(1).sum().item())  # raises on the meta device
        return model

    ck = payload("vit")
    assert torch.equal(load_into("a.pt", ck, build).cls_token, ck["model"]["cls_token"])
    wrong_shape(ck, "vit")
    with pytest.raises(CheckpointError, match="a.pt: the weights do not fit .* wrong shape: cls_token"):
        load_into("a.pt", ck, build)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMSYS_MAX_PARAMS", "1000")
        ck = payload("vit")
        ck["model"] = {}
        with pytest.raises(CheckpointError, match="asks for a model of .* limit of 1,000"):
            load_into("a.pt", ck, build)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("name", ["unknown model_config key", "wrong-shape weight", "NaN weight",
                                  "mixed key types", "huge model_config"])
@pytest.mark.integration
def test_grader_m1_exit_2_nothing_written(tmp_path, name):
    """``grader.py m1 --checkpoint BAD --skip-tests``: exit 2, one line, no traceback, no files."""
    path = write_bad(tmp_path, "vit", name)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier report")
    before = _snapshot(out)
    proc = _run([str(REPO / "grader.py"), "m1", "--checkpoint", str(path), "--skip-tests", "--out", str(out),
                 "--no-progress"], tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr and len(errors) == 1 and errors[0].startswith("grader: error:"), proc.stderr
    assert_one_line(errors[0], path, EXPECT[name])
    assert _snapshot(out) == before


@pytest.mark.integration
def test_apps_sample_exit_2(tmp_path):
    """``python -m apps.sample --checkpoint BAD``: ``error: <one line>``, exit 2, no image written."""
    path = write_bad(tmp_path, "ddpm", "NaN weight")
    proc = _run(["-m", "apps.sample", "--checkpoint", str(path), "-o", str(tmp_path / "s.png"), "-n", "2"], REPO)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "NaN" in lines[0], proc.stderr
    assert not (tmp_path / "s.png").exists()
