"""m6 audio tower (AST-style): shapes, patch layout, the padding mask really masks, batch
independence, determinism, parameter count. Through the m6 seam (milestones/adapters.py)."""

import pytest
import torch

from milestones.adapters import CANDIDATE as impl

pytestmark = [pytest.mark.m6, pytest.mark.usefixtures("one_thread")]
CFG = dict(n_mels=32, patch_freq=8, patch_time=8, max_frames=96, dim=32, depth=2, n_heads=4, mlp_ratio=2.0,
           dropout=0.0)


class Out:
    """The seam's (cls, tokens, padding_mask) with names."""

    def __init__(self, cls, tokens, padding_mask):
        self.cls, self.tokens, self.padding_mask = cls, tokens, padding_mask


class Tower:
    """A tower built and called through the seam (``impl.audio_tower``)."""

    def __init__(self, cfg: dict):
        self.module = impl.audio_tower_build(cfg)

    def __call__(self, feats, n_frames=None) -> Out:
        return Out(*impl.audio_tower(self.module, feats, n_frames))

    def __getattr__(self, name):
        return getattr(self.module, name)

    def train(self):
        self.module.train()
        return self


def tower(seed: int = 0) -> Tower:
    torch.manual_seed(seed)
    t = Tower(CFG)
    t.module.eval()
    return t


def patchify_spectrogram(x, p_f, p_t):
    return impl.module("audio.tower").patchify_spectrogram(x, p_f, p_t)


def feats(b: int = 2, frames: int = 70, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 32, frames, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_mask():
    out = tower()(feats(), torch.tensor([70, 20]))
    n_t = 9  # ceil(70 / 8) time patches, 4 frequency patches each
    assert out.cls.shape == (2, 32) and out.tokens.shape == (2, n_t * 4, 32)
    assert out.padding_mask.shape == (2, n_t * 4) and out.padding_mask.dtype == torch.bool
    assert not out.padding_mask[0].any()
    assert out.padding_mask[1].sum() == (n_t - 3) * 4  # frames 0..19 live in time patches 0, 1, 2
    assert not out.padding_mask[1, :12].any() and out.padding_mask[1, 12:].all()
    long = tower()(feats(1, 200))  # cropped to max_frames = 96 -> 12 time patches
    assert long.tokens.shape == (1, 12 * 4, 32)


def test_patch_layout_is_time_major():
    x = torch.arange(2 * 32 * 16, dtype=torch.float32).reshape(2, 32, 16)
    p = patchify_spectrogram(x, 8, 8)
    assert p.shape == (2, 2 * 4, 64)
    # token t * 4 + f: mel bins f*8..f*8+7 of frames t*8..t*8+7
    assert torch.equal(p[1, 1 * 4 + 2].reshape(8, 8), x[1, 16:24, 8:16])
    assert torch.equal(p[0, 3].reshape(8, 8), x[0, 24:32, 0:8])
    with pytest.raises(ValueError):
        patchify_spectrogram(torch.zeros(1, 30, 16), 8, 8)


def test_padded_frames_do_not_change_the_output():
    m, x, lengths = tower(), feats(), torch.tensor([70, 37])
    y = x.clone()
    y[1, :, 37:] = torch.randn(32, 33) * 100  # rewrite only what lies past utterance 1's end
    a, b = m(x, lengths), m(y, lengths)
    assert torch.allclose(a.cls, b.cls, atol=1e-5)
    real = ~a.padding_mask
    assert torch.allclose(a.tokens[real], b.tokens[real], atol=1e-5)
    c = m(y)  # without lengths the same frames are real, and they matter
    assert not torch.allclose(a.cls[1], c.cls[1], atol=1e-3)


def test_output_does_not_depend_on_the_batch():
    m, x = tower(), feats(2, 70)
    alone = m(x[1:, :, :37])
    together = m(x, torch.tensor([70, 37]))
    assert torch.allclose(alone.cls[0], together.cls[1], atol=1e-5)
    n = alone.tokens.shape[1]
    assert torch.allclose(alone.tokens[0], together.tokens[1, :n], atol=1e-5)


def test_deterministic_and_trainable():
    a, b = tower(3), tower(3)
    x, lengths = feats(), torch.tensor([70, 50])
    assert torch.equal(a(x, lengths).cls, b(x, lengths).cls)
    assert not torch.allclose(a(x, lengths).cls, tower(4)(x, lengths).cls)
    out = a.train()(x, lengths)
    out.cls.pow(2).sum().backward()
    assert a.patch_embed.weight.grad.abs().sum() > 0 and a.cls_token.grad.abs().sum() > 0
    assert a.pos_embed.grad[:, 9:].abs().sum() == 0  # 70 frames fill time patches 0..8; 9..11 get no gradient


def test_parameter_count():
    D, h, depth = 32, 64, 2
    block = 2 * D + (D * D + D) + (D * 2 * D + 2 * D) + (D * D + D) + 2 * D + (D * h + h) + (h * D + D)
    expected = (64 * D + D) + 12 * 4 * D + D + depth * block + 2 * D  # patches, grid, CLS, blocks, final LN
    assert sum(p.numel() for p in tower().parameters()) == expected
    default = sum(p.numel() for p in impl.audio_tower_build({}).parameters())
    assert 2.5e6 < default < 3.5e6  # dim 192, depth 6: a small AST (the paper's is 87M)
