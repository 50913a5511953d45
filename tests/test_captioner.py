"""m3 shape tests: the captioner through the seam — encoder features, decoder logits, causal mask,
cross-attention, cached decoding, greedy and beam search, caption sampling, memorising two
captions. (The bundled model's internals, its checkpoint and the CLI: test_captioner_internals.py.)"""

import math

import pytest
import torch

from milestones.adapters import CANDIDATE as impl
from milestones.common import to_float

pytestmark = [pytest.mark.m3, pytest.mark.usefixtures("one_thread")]

V = 40
SPECIAL = impl.caption_special_ids()
PAD_ID, BOS_ID, EOS_ID = SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"]
TINY = dict(vocab_size=V, max_len=16, image_size=16, patch_size=4, enc_dim=32, enc_depth=1, enc_heads=2,
            dim=32, depth=2, n_heads=2, mlp_ratio=4.0, enc_mlp_ratio=2.0, dropout=0.0, tie_head=True)


def tiny(**kw):
    torch.manual_seed(0)
    return impl.captioner_build({**TINY, **kw}).eval()


def random_ids(B, L, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, L), generator=g)
    ids[:, 0] = BOS_ID
    return ids


def images(B, seed=2, size=16):
    return torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encoder_features():
    m = tiny()
    feats = impl.captioner_encode(m, images(3))
    assert feats.shape == (3, 1 + 16, 32)  # CLS + (16/4)^2 patches
    # positional information: a uniform image has identical patches, yet its tokens differ by place
    flat = impl.captioner_encode(m, torch.zeros(1, 3, 16, 16))[0, 1:]
    assert torch.cdist(flat, flat).triu(1).max() > 1e-3
    # and the patch tokens depend on where the content is
    x = images(1)
    assert not torch.allclose(impl.captioner_encode(m, x), impl.captioner_encode(m, x.flip(-1)), atol=1e-4)


def test_decoder_logits_and_tied_head():
    m = tiny()
    ids = random_ids(2, 7)
    logits = impl.captioner_logits(m, images(2), ids, ids == PAD_ID)
    assert logits.shape == (2, 7, V) and torch.isfinite(logits).all()
    # tied output head: untying adds exactly one V x dim matrix
    untied = tiny(tie_head=False)
    n_tied = sum(p.numel() for p in m.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + V * 32
    # gradients reach every parameter through the teacher-forcing loss
    m.train()
    ids3 = random_ids(2 * 5, 7).view(2, 5, 7)
    impl.captioner_loss(m, images(2), ids3, ids3 == PAD_ID).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_causal_mask():
    m = tiny()
    x, ids = images(2), random_ids(2, 9)
    base = impl.captioner_logits(m, x, ids)
    for j in (1, 4, 8):
        changed = ids.clone()
        changed[:, j] = (changed[:, j] + 1 - 4) % (V - 4) + 4
        out = impl.captioner_logits(m, x, changed)
        # a later token never changes an earlier position's output ...
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-5)
        # ... and does change its own and later positions
        assert (out[:, j:] - base[:, j:]).abs().amax() > 1e-4
    # without the mask (the planted bug of the gate tests) earlier positions see the future
    assert (impl.captioner_logits(m, x, ids, causal=False)[:, :4] - base[:, :4]).abs().amax() > 1e-4


def test_cross_attention_shapes():
    m = tiny()
    x, ids = images(2), random_ids(2, 6)
    weights = impl.captioner_cross_weights(m, x, ids)
    assert len(weights) == 2  # one per decoder block
    for w in weights:
        assert w.shape == (2, 2, 6, 17)  # (B, heads, text positions, CLS + 16 patches)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 6))
    maps = impl.captioner_cross_attention(m, x, ids)
    assert maps.shape == (2, 5, 4, 4)  # row k: where it looked to choose token k + 1
    assert (maps >= 0).all() and (maps.sum((-1, -2)) <= 1 + 1e-5).all()
    # the text really reads the image
    logits = impl.captioner_logits(m, x, ids)
    assert (impl.captioner_logits(m, images(2, seed=9), ids) - logits).abs().amax() > 1e-4


def test_incremental_decoding_matches_forward():
    m = tiny()
    x, ids = images(3), random_ids(3, 10)
    full = impl.captioner_logits(m, x, ids).log_softmax(-1)
    steps = impl.captioner_cached_log_probs(m, x, ids)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_greedy_equals_beam1(alpha):
    m = tiny()
    x = images(6)
    g = impl.captioner_greedy(m, x, max_len=12)
    b = impl.captioner_beam_search(m, x, beam=1, max_len=12, alpha=alpha)
    assert torch.equal(g, b)
    # greedy is argmax of the forward pass at every step (teacher-forced on its own output)
    logits = impl.captioner_logits(m, x, g[:, :-1])
    logits[..., [PAD_ID, BOS_ID]] = -math.inf
    for i in range(6):
        n = int((g[i] == EOS_ID).nonzero()[0])  # eos position
        if n < 12:  # not forced by max_len
            assert torch.equal(logits[i, :n].argmax(-1), g[i, 1:n + 1])


def check_hypothesis(seq, max_len):
    """A finished hypothesis: <bos> words <eos>, no specials inside, within the maximum length."""
    assert seq[0] == BOS_ID and seq[-1] == EOS_ID and seq.count(EOS_ID) == 1
    assert PAD_ID not in seq and BOS_ID not in seq[1:] and len(seq) - 1 <= max_len


def test_beam_finished_hypotheses():
    m = tiny()
    x = images(4)
    ids, hyps = impl.captioner_beam_search(m, x, beam=3, max_len=10, alpha=0.6, return_scores=True)
    assert ids.shape[0] == 4 and ids[:, 0].eq(BOS_ID).all()
    for b in range(4):
        assert 1 <= len(hyps[b]) <= 3
        scores = [s for s, _ in hyps[b]]
        assert scores == sorted(scores, reverse=True)
        best = ids[b][: ids[b].tolist().index(EOS_ID) + 1].tolist()
        assert best == hyps[b][0][1]
        for score, seq in hyps[b]:
            check_hypothesis(seq, 10)
            # golden check: the score is the GNMT-normalised log-probability of the sequence
            t = torch.tensor(seq)[None]
            logp = impl.captioner_logits(m, x[b:b + 1], t[:, :-1]).float().log_softmax(-1)[0]
            total = logp.gather(1, t[0, 1:, None]).sum().item()
            assert score == pytest.approx(total / ((5 + len(seq) - 1) / 6) ** 0.6, abs=1e-4)
    # batched == one image at a time
    for b in range(4):
        alone = impl.captioner_beam_search(m, x[b:b + 1], beam=3, max_len=10, alpha=0.6)
        n = alone.shape[1]
        assert torch.equal(alone[0], ids[b, :n]) and ids[b, n:].eq(PAD_ID).all()


def test_beam_max_length():
    m = tiny()
    x = images(3)
    # an untrained model rarely says <eos>: the maximum length closes every hypothesis with it
    ids, hyps = impl.captioner_beam_search(m, x, beam=4, max_len=3, alpha=0.6, return_scores=True)
    assert ids.shape == (3, 4)  # <bos> + 2 words + forced <eos>
    for h in hyps:
        for _, seq in h:
            check_hypothesis(seq, 3)


def test_all_captions_used():
    tok = impl.tokenizer_train(["a red circle", "a blue square on the left", "two cats"], min_freq=1)
    vocab = impl.caption_vocab(tok)
    caps = [["a red circle", "a blue square", "two cats", "a cat", "a red square"],
            ["a red circle on the left"] * 7, ["two cats"]]
    ids, count = impl.caption_encode_sets(tok, caps, max_len=8)
    assert ids.shape[:2] == (3, 7) and count.tolist() == [5, 7, 1]
    assert ids[0, 0].tolist()[:5] == [BOS_ID] + [vocab.index(w) for w in ("a", "red", "circle")] + [EOS_ID]
    assert (ids[2, 1:] == PAD_ID).all()  # missing caption slots are padding
    # one training item per (image, caption): an epoch of the engine's batches visits each once
    image, caption = impl.caption_pairs(count)
    assert len(image) == 13
    seen = torch.cat([impl.engine_batch_indices(s, 13, 4, seed=0) for s in range(4)]).tolist()[:13]
    assert sorted((int(image[j]), int(caption[j])) for j in seen) == \
        [(0, j) for j in range(5)] + [(1, j) for j in range(7)] + [(2, 0)]
    pick, pad = impl.caption_gather(ids, image[:5], caption[:5])
    assert pick.shape[:2] == (5, 1) and torch.equal(pad, pick == PAD_ID)
    assert torch.equal(pick[:, 0], ids[0, :5, :pick.shape[-1]]) and not pad[:, 0, 0].any()
    # with k captions per image the loss is the token-weighted mean over all of them
    m = tiny(vocab_size=len(tok))
    x, sub = images(2), ids[:2, :5]
    loss = impl.captioner_loss(m, x, sub, sub == PAD_ID)
    logits = torch.cat([impl.captioner_logits(m, x[i:i + 1].expand(5, -1, -1, -1), sub[i, :, :-1])
                        for i in range(2)])
    tgt = sub[:, :, 1:].reshape(10, -1)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
    torch.testing.assert_close(loss, nll[tgt != PAD_ID].mean())


TWO_CAPTIONS = [["a red circle on the left"], ["two blue squares side by side"]]


def overfit_two_images(steps: int = 60):
    """A tiny captioner trained ``steps`` AdamW steps on two 16x16 images with one caption each.
    Returns (model, tokenizer, uint8 images (2, 3, 16, 16))."""
    tok = impl.tokenizer_train((c for cs in TWO_CAPTIONS for c in cs), min_freq=1)
    m = tiny(vocab_size=len(tok)).train()
    ids, _ = impl.caption_encode_sets(tok, TWO_CAPTIONS, max_len=16)
    x8 = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    x8[0, 0, :, :8] = 255
    x8[1, 2, :, 4:] = 200
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        impl.captioner_loss(m, to_float(x8), ids, ids == PAD_ID).backward()
        opt.step()
    return m, tok, x8


def test_overfits_two_images():
    """A few optimizer steps memorise two captions; beam search and greedy both say them back."""
    m, tok, x8 = overfit_two_images()
    for ids in (impl.captioner_beam_search(m, to_float(x8), beam=2, max_len=12, alpha=0.6),
                impl.captioner_greedy(m, to_float(x8), max_len=12)):
        assert impl.caption_decode(tok, ids) == [c[0] for c in TWO_CAPTIONS]
