"""The retrieval command line (``python -m apps.retrieve``) over the bundled CLIP, and the m2
COCO path end to end on a small copy (the full profile's smoke recipe, then a CLI query)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apps.retrieve import main
from mmsys.checkpoint import save_checkpoint
from mmsys.clip import CLIP, CLIPConfig
from mmsys.text import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def untrained_checkpoint(path: Path, index: dict) -> Path:
    """A tiny untrained "clip" checkpoint whose retrieval index is ``index``."""
    tok = Tokenizer.train(["a red circle on the left", "a blue square"])
    torch.manual_seed(0)
    cfg = CLIPConfig(vocab_size=len(tok), context_length=16, patch_size=8, vision_dim=32, vision_depth=2,
                     vision_heads=2, text_dim=32, text_depth=2, text_heads=2, embed_dim=24)
    save_checkpoint(path, {"kind": "clip", "model": CLIP(cfg).state_dict(), "model_config": cfg.to_dict(),
                           "extra": {"tokenizer": tok.state_dict(), "index": index}})
    return path


@pytest.mark.integration
def test_retrieve_cli_missing_checkpoint_is_clear(tmp_path, repo_env):
    r = subprocess.run([sys.executable, "-m", "apps.retrieve", "a red circle", "--checkpoint",
                        str(tmp_path / "none.pt")], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env=repo_env)
    assert r.returncode == 2 and "no CLIP checkpoint" in r.stderr
    r = subprocess.run([sys.executable, "-m", "apps.retrieve", "a red circle"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120, env=repo_env)
    if not (REPO / "runs/m2/checkpoint.pt").exists():
        assert r.returncode == 2 and "python grader.py m2" in r.stderr


@pytest.mark.integration
def test_retrieve_cli_writes_grid(tmp_path):
    ckpt = untrained_checkpoint(tmp_path / "checkpoint.pt", {"dataset": "world", "split": "test", "n": 64})
    out = tmp_path / "grid.png"
    assert main(["a red circle on the left", "-k", "4", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and (tmp_path / "index" / "world-flat" / "meta.json").is_file()
    out2 = tmp_path / "grid2.png"
    assert main(["--image", "test:3", "-k", "3", "--checkpoint", str(ckpt), "--out", str(out2)]) == 0
    assert out2.is_file()


@pytest.mark.slow
def test_coco_path_end_to_end_on_coco_mini(tmp_path):
    """The full profile's smoke recipe on coco-mini: load COCO-format captions, train a few
    GradCache steps, evaluate retrieval on val2017 and zero-shot on CIFAR-10, save a checkpoint
    and query it with the retrieval CLI."""
    from eval.reference.data.paths import shared_data_root
    from milestones import m2_clip as m2
    from milestones.base import RunContext
    root = shared_data_root()
    if root is None or not (root / "coco-mini" / "annotations" / "captions_train2017.json").is_file() \
            or not (root / "cifar10").is_dir():
        pytest.skip("coco-mini or cifar10 not available (../shared/data)")
    result = m2.MILESTONE.run(RunContext(profile="full", smoke=True, out_dir=tmp_path / "run", progress=False))
    train, val, cifar, held = result.datasets
    assert train["n_images"] == 80 - 16 and held["n_images"] == 16 and val["n_images"] == 159
    assert cifar["n_images"] == 10_000 and result.validation["split"] == held["name"]
    assert result.info["training"]["steps"] == m2.SMOKE_RECIPES["full"].steps
    assert result.metrics["n_gallery_images"] == 159 and 0 <= result.metrics["t2i_R@10"] <= 1
    assert 0 <= result.metrics["zeroshot_top5"] <= 1 and Path(result.checkpoint).is_file()
    out = tmp_path / "q.png"
    assert main(["a man riding a horse", "-k", "5", "--checkpoint", result.checkpoint, "--out", str(out)]) == 0
    assert out.is_file()
