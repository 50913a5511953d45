"""m7 shape tests: NT-Xent against a loop over anchors, the model's shapes and projection head,
MoCo's queue and momentum encoder, and the batched views against torchvision.transforms.v2."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from milestones.adapters import CANDIDATE as impl

pytestmark = [pytest.mark.m7, pytest.mark.usefixtures("one_thread")]

TINY = dict(method="simclr", encoder="vit", image_size=16, patch_size=8, dim=16, depth=1, n_heads=2, mlp_ratio=2.0,
            proj_hidden=32, proj_dim=8, temperature=0.5)


def nt_xent_by_hand(z: torch.Tensor, t: float) -> float:
    """SimCLR eq. 1, one anchor at a time: l(i, j) = -log exp(s_ij / t) / sum_{k != i} exp(s_ik / t),
    averaged over the 2N anchors (each view the anchor once, its partner the positive)."""
    n = len(z) // 2
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        s = [F.cosine_similarity(z[i], z[k], dim=0).item() / t for k in range(2 * n)]
        denom = sum(math.exp(s[k]) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(s[j]) / denom)
    return total / (2 * n)


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_golden(t):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 6, generator=g, dtype=torch.float64)
    loss, m = impl.ssl_nt_xent(z, t)
    assert loss.item() == pytest.approx(nt_xent_by_hand(z, t), rel=1e-5)
    # the positive mask: swapping one view's partner raises the loss, identical pairs give the minimum
    pairs = torch.cat([z[:5], z[:5]])
    assert impl.ssl_nt_xent(pairs, t)[1]["pos_acc"] == 1.0
    wrong = torch.cat([z[:5], z[:5].roll(1, dims=0)])
    assert impl.ssl_nt_xent(wrong, t)[0] > impl.ssl_nt_xent(pairs, t)[0]
    with pytest.raises(ValueError):
        impl.ssl_nt_xent(z[:9], t)


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_shapes_and_head(method):
    torch.manual_seed(0)
    model = impl.ssl_build({**TINY, "method": method, "queue_size": 16})
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    views = impl.ssl_views(x, torch.Generator().manual_seed(0), {})
    assert views.shape == (4, 2, 3, 16, 16) and views.dtype == torch.float32
    assert -1.0 <= views.min() and views.max() <= 1.0 + 1e-6
    loss, m = impl.ssl_loss(model, views)
    assert loss.ndim == 0 and torch.isfinite(loss) and 0 <= float(m["pos_acc"]) <= 1
    loss.backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(model.get_parameter(n).grad is not None for n in trained), "gradients reach encoder and head"
    model.eval()
    feats = impl.ssl_features(model, views[:, 0])
    assert feats.shape == (4, TINY["dim"])  # the encoder's output, before the projection head
    alone = impl.ssl_features(model, views[:1, 0])
    torch.testing.assert_close(alone, feats[:1], atol=1e-5, rtol=0)  # independent of the batch
    head = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(head) == 2 and head[0].in_features == TINY["dim"] and head[-1].out_features == TINY["proj_dim"]


def test_resnet_encoder_has_the_cifar_stem():
    model = impl.ssl_build({**TINY, "encoder": "resnet18", "image_size": 32})
    conv1 = model.encoder.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert isinstance(model.encoder.maxpool, torch.nn.Identity)
    model.eval()
    assert impl.ssl_features(model, torch.zeros(2, 3, 32, 32)).shape == (2, 512)


def test_moco_queue_and_momentum():
    torch.manual_seed(0)
    model = impl.ssl_build({**TINY, "method": "moco", "queue_size": 6, "momentum": 0.9})
    queue, ptr = impl.ssl_queue(model)
    assert queue.shape == (6, TINY["proj_dim"]) and int(ptr) == 0
    assert not any(p.requires_grad for p in model.key_encoder.parameters())
    before = queue.clone()
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    views = impl.ssl_views(x, torch.Generator().manual_seed(1), {})
    model.train()
    impl.ssl_loss(model, views)  # 4 keys enter the queue
    queue, ptr = impl.ssl_queue(model)
    assert int(ptr) == 4 and torch.equal(queue[4:], before[4:]) and not torch.equal(queue[:4], before[:4])
    impl.ssl_loss(model, views)  # 4 more wrap around: slots 4, 5, 0, 1
    queue, ptr = impl.ssl_queue(model)
    assert int(ptr) == 2 and torch.allclose(queue.norm(dim=1), torch.ones(6))
    # momentum: theta_k <- 0.9 theta_k + 0.1 theta_q
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    k0 = [p.clone() for p in model.key_encoder.parameters()]
    q = [p.clone() for p in model.encoder.parameters()]
    impl.ssl_momentum_update(model)
    for a, b, k in zip(model.key_encoder.parameters(), q, k0):
        torch.testing.assert_close(a, 0.9 * k + 0.1 * b)


def test_views_match_torchvision():
    """Each batched operation of mmsys.views against torchvision.transforms.v2.functional with the
    same per-image parameters; and the views are reproducible from the generator."""
    from mmsys import views as V
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 20, 20, generator=g)
    top, left, h, w = V.crop_boxes(6, 20, 20, g)
    assert ((h > 0) & (h <= 20) & (w > 0) & (w <= 20)).all()
    got = V.resized_crop(x, top, left, h, w, (20, 20))
    want = torch.stack([TF.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [20, 20])
                        for i in range(6)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    f, hue, sigma = V.uniform(6, 0.6, 1.4, g), V.uniform(6, -0.2, 0.2, g), V.uniform(6, 0.1, 2.0, g)
    for ours, theirs, factor in ((V.adjust_brightness, TF.adjust_brightness, f), (V.adjust_contrast, TF.adjust_contrast, f),
                                 (V.adjust_saturation, TF.adjust_saturation, f), (V.adjust_hue, TF.adjust_hue, hue)):
        want = torch.stack([theirs(x[i], float(factor[i])) for i in range(6)])
        torch.testing.assert_close(ours(x, factor), want, atol=1e-5, rtol=0)
    want = torch.stack([TF.gaussian_blur(x[i], [3, 3], [float(sigma[i])] * 2) for i in range(6)])
    torch.testing.assert_close(V.gaussian_blur(x, 3, sigma), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(V.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    u8 = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    a = impl.ssl_views(u8, torch.Generator().manual_seed(3), {"blur": 0.5})
    b = impl.ssl_views(u8, torch.Generator().manual_seed(3), {"blur": 0.5})
    assert torch.equal(a, b) and not torch.equal(a[:, 0], a[:, 1])
