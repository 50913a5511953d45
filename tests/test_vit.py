"""m1 shape tests: patches, CLS/positions, encoder, head, attention maps."""

import pytest
import torch

from mmsys.vit import ViT, ViTConfig, attention_rollout, patchify

pytestmark = pytest.mark.m1
CFG = ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, n_heads=4, mlp_ratio=2.0, n_classes=10)


def test_patchify_layout():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    p = patchify(x, 8)
    assert p.shape == (2, 16, 3 * 8 * 8)
    # patch 5 = grid row 1, column 1: pixels rows 8..15, columns 8..15, channel-major inside
    assert torch.equal(p[1, 5].view(3, 8, 8), x[1, :, 8:16, 8:16])
    assert torch.equal(p[0, 3].view(3, 8, 8), x[0, :, 0:8, 24:32])
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 30, 30), 8)


def test_cls_and_positions():
    torch.manual_seed(0)
    m = ViT(CFG)
    assert m.cls_token.shape == (1, 1, 32) and m.cls_token.requires_grad
    assert m.pos_embed.shape == (1, 16 + 1, 32) and m.pos_embed.requires_grad
    tokens, _ = m.tokens(torch.randn(3, 3, 32, 32))
    assert tokens.shape == (3, 17, 32)
    # positions matter: permuting the patches changes the output (no permutation invariance)
    x = torch.randn(1, 3, 32, 32)
    shuffled = x.reshape(1, 3, 4, 8, 4, 8).flip(2).reshape(1, 3, 32, 32)  # reorder patch rows
    assert not torch.allclose(m(x), m(shuffled), atol=1e-5)


def test_output_shapes():
    m = ViT(CFG)
    assert m(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    m2 = ViT(ViTConfig(image_size=28, patch_size=7, in_channels=1, dim=32, depth=1, n_heads=2, n_classes=3))
    assert m2(torch.randn(2, 1, 28, 28)).shape == (2, 3)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = ViT(CFG)
    m(torch.randn(4, 3, 32, 32)).logsumexp(-1).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"


def test_batch_independence():
    torch.manual_seed(0)
    m = ViT(CFG).eval()
    x = torch.randn(6, 3, 32, 32)
    full = m(x)
    single = torch.cat([m(x[i:i + 1]) for i in range(6)])
    assert torch.allclose(full, single, atol=1e-5)
    # changing other images leaves image 0's output unchanged
    x2 = x.clone()
    x2[1:] = torch.randn(5, 3, 32, 32)
    assert torch.allclose(m(x2)[0], full[0], atol=1e-5)


def test_attention_maps_and_rollout():
    torch.manual_seed(0)
    m = ViT(CFG).eval()
    x = torch.randn(2, 3, 32, 32)
    w = m.attention_maps(x)
    assert len(w) == CFG.depth and w[0].shape == (2, 4, 17, 17)
    assert torch.allclose(w[0].sum(-1), torch.ones(2, 4, 17), atol=1e-5)
    # the weights path and the fused path agree
    assert torch.allclose(m.tokens(x, need_weights=True)[0], m.tokens(x)[0], atol=1e-5)
    r = attention_rollout(w)
    assert r.shape == (2, 16) and torch.allclose(r.sum(-1), torch.ones(2), atol=1e-5)


def test_rollout_golden():
    # one layer, one head, 1 CLS + 2 patches; hand-computed: 0.5*I + 0.5*A, CLS row over patches
    A = torch.tensor([[[[0.2, 0.5, 0.3], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]])
    r = attention_rollout([A])
    expected = torch.tensor([0.25, 0.15]) / 0.4
    assert torch.allclose(r[0], expected, atol=1e-6)


def test_positions_resized_for_other_image_sizes():
    torch.manual_seed(0)
    m = ViT(CFG)
    assert m.positions(16) is m.pos_embed
    p4 = m.positions(4)  # 2x2 grid from the 4x4 grid, CLS position kept
    assert p4.shape == (1, 5, 32) and torch.equal(p4[:, 0], m.pos_embed[:, 0])
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="square"):
        m.positions(5)
