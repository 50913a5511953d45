"""CLIP's loss over the global batch (mmsys.clip.global_clip_loss): two gloo ranks, each with half
the batch, give the single-process loss of the whole batch, and the gradients data parallelism
would apply (issue 22, item 2)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmsys.clip import batch_mask, clip_loss

B, E, W = 6, 8, 2


def data():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(W * B, E, generator=g), dim=-1)
    txt = F.normalize(torch.randn(W * B, E, generator=g), dim=-1)
    image_key = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 2, 9, 10, 0])  # duplicates within and across ranks
    return img, txt, image_key


def reference(masked: bool):
    img, txt, key = data()
    img, txt, scale = img.clone().requires_grad_(True), txt.clone().requires_grad_(True), torch.tensor(7.0, requires_grad=True)
    loss, _ = clip_loss(img, txt, scale, batch_mask({"image_key": key}) if masked else None)
    loss.backward()
    return loss.detach(), img.grad, txt.grad, scale.grad


def worker(r: int, port: int, masked: bool, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=r, world_size=W)
    try:
        img, txt, key = data()
        sl = slice(r * B, (r + 1) * B)
        mine_i, mine_t = img[sl].clone().requires_grad_(True), txt[sl].clone().requires_grad_(True)
        scale = torch.tensor(7.0, requires_grad=True)
        loss, _ = clip_loss(mine_i, mine_t, scale, batch_mask({"image_key": key[sl]}) if masked else None)
        loss.backward()
        out.put((r, *(t.numpy().copy() for t in (loss.detach(), mine_i.grad, mine_t.grad, scale.grad))))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
@pytest.mark.parametrize("masked", [False, True])
def test_global_loss_equals_the_concatenated_batch_gradients_included(masked):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, masked, q)) for r in range(W)]
    for p in procs:
        p.start()
    got = sorted((q.get(timeout=120) for _ in range(W)), key=lambda x: x[0])
    got = [(x[0], *map(torch.from_numpy, x[1:])) for x in got]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    loss, g_img, g_txt, g_scale = reference(masked)
    # data parallelism averages gradients over ranks: each rank's own slice gets W x its share
    torch.testing.assert_close(sum(x[1] for x in got) / W, loss)
    torch.testing.assert_close(torch.cat([x[2] for x in got]) / W, g_img)
    torch.testing.assert_close(torch.cat([x[3] for x in got]) / W, g_txt)
    torch.testing.assert_close(sum(x[4] for x in got) / W, g_scale)


# ----------------------------------------------------------------------------- sharded evaluation
N_EVAL = 7  # not a multiple of the world size: the last rank's shard is shorter


def shard_worker(r: int, port: int, out):
    from mmsys.distributed import gather_shards, shard
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=r, world_size=W)
    try:
        items = torch.arange(N_EVAL * 3, dtype=torch.float32).view(N_EVAL, 3)
        mine = shard(N_EVAL)
        out.put((r, mine.start, mine.stop, gather_shards(items[mine] * 2, N_EVAL).numpy().copy()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_evaluation_shards_gather_back_in_item_order():
    """Each rank embeds its shard of the evaluation set; every rank gets the whole result back."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=shard_worker, args=(r, port, q)) for r in range(W)]
    for p in procs:
        p.start()
    got = sorted((q.get(timeout=120) for _ in range(W)), key=lambda x: x[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [(x[1], x[2]) for x in got] == [(0, 4), (4, 7)]
    want = torch.arange(N_EVAL * 3, dtype=torch.float32).view(N_EVAL, 3) * 2
    for x in got:
        torch.testing.assert_close(torch.from_numpy(x[3]), want)
