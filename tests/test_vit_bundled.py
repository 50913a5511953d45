"""The bundled ViT's internals (not part of the seam, so not m1 shape tests): the resized
position grid and the attention-weights path."""

import pytest
import torch

from mmsys.vit import ViT, ViTConfig

CFG = ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, n_heads=4, mlp_ratio=2.0, n_classes=10)


def test_patchify_refuses_indivisible_images():
    from mmsys.vit import patchify
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 30, 30), 8)


def test_weights_path_matches_the_fused_path():
    torch.manual_seed(0)
    m = ViT(CFG).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(m.tokens(x, need_weights=True)[0], m.tokens(x)[0], atol=1e-5)


def test_positions_resized_for_other_image_sizes():
    torch.manual_seed(0)
    m = ViT(CFG)
    assert m.positions(16) is m.pos_embed
    p4 = m.positions(4)  # 2x2 grid from the 4x4 grid, CLS position kept
    assert p4.shape == (1, 5, 32) and torch.equal(p4[:, 0], m.pos_embed[:, 0])
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="square"):
        m.positions(5)
