"""The bundled captioner's internals (not part of the seam): the tied head is one tensor, a model
that prefers <eos> finishes early, the m3 recipe follows the library's defaults, the checkpoint
round trip (``load_captioner``) and the captioning command line (``python -m apps.caption``)."""

import pytest
import torch

from mmsys.captioner import EOS_ID, CaptionerConfig, load_captioner
from mmsys.checkpoint import save_checkpoint
from mmsys.data.split import to_float
from test_captioner import TWO_CAPTIONS, V, check_hypothesis, images, overfit_two_images, tiny

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # torchvision >= 0.29 warns that its image io (write_png here) moves to torchcodec
              pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision")]


def test_tied_head_is_the_embedding():
    m = tiny()
    assert m.head.weight is m.tok_embed.weight
    untied = tiny(tie_head=False)
    assert untied.head.weight is not untied.tok_embed.weight


def test_beam_early_eos():
    m = tiny()
    x = images(3)
    # a model that prefers <eos> finishes early, and every finished hypothesis ends there
    m.head.bias = torch.nn.Parameter(torch.zeros(V))
    with torch.no_grad():
        m.head.bias[EOS_ID] = 1.0
    ids, hyps = m.beam_search(x, beam=3, max_len=12, return_scores=True)
    assert ids.shape[1] < 13
    for h in hyps:
        assert len(h) == 3
        for _, seq in h:
            check_hypothesis(seq, 12)


def test_quick_recipe_model_is_the_library_default():
    from dataclasses import asdict

    from milestones.m3_caption import RECIPES
    assert RECIPES["quick"].model == {k: v for k, v in asdict(CaptionerConfig()).items() if k != "vocab_size"}


def test_checkpoint_and_cli(tmp_path, capsys):
    """The memorised captioner reloads from its checkpoint; the CLI reads files with the training
    resize (mmsys.images.load_image) and says the captions back."""
    from torchvision.io import write_png

    from apps.caption import main

    m, tok, x8 = overfit_two_images()
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"kind": "captioner", "model": m.state_dict(),
                           "model_config": vars(m.cfg).copy(), "extra": {"tokenizer": tok.state_dict()}})
    m2, tok2 = load_captioner(path)
    assert tok2.vocab == tok.vocab and torch.equal(m2.greedy(to_float(x8), 12), m.greedy(to_float(x8), 12))
    files = []
    for i in range(2):
        files.append(tmp_path / f"img{i}.png")
        big = torch.nn.functional.interpolate(x8[i:i + 1].float(), scale_factor=3)[0].byte()
        write_png(big, str(files[-1]))  # 48x48 file, resized to 16 by the CLI
    assert main([str(f) for f in files] + ["--checkpoint", str(path)]) == 0
    printed = capsys.readouterr().out
    assert f"beam:   {TWO_CAPTIONS[0][0]}" in printed and f"greedy: {TWO_CAPTIONS[1][0]}" in printed
    # a missing checkpoint says what to run; a file that is not an image is one error line
    assert main([str(files[0]), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "python grader.py m3" in capsys.readouterr().err
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert main([str(tmp_path / "junk.png"), "--checkpoint", str(path)]) == 2
    assert "could not read an image" in capsys.readouterr().err
