"""m6 audio model through the seam: embedding shapes and batch independence, the binding +
transcription loss against its definition, the decoder's memory padding on the cached path,
greedy = beam 1, cross-attention shapes, the training batch maker; and the WER metric on known
answers."""

import pytest
import torch
import torch.nn.functional as F

from eval.reference.audio.waves import pad
from eval.wer import word_error_rate
from milestones.adapters import CANDIDATE as impl

pytestmark = [pytest.mark.m6, pytest.mark.usefixtures("one_thread")]
CFG = dict(vocab_size=20, max_len=12, n_mels=16, patch_freq=16, patch_time=4, max_frames=128, enc_dim=32,
           enc_depth=2, enc_heads=4, embed_dim=24, dim=32, depth=2, n_heads=4)


def model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return impl.audio_build({**CFG, **kw}).eval()


def waves(lengths=(8000, 3000, 5000), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(0.3 * torch.randn(n, generator=g)).clamp(-1, 1) for n in lengths]


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_embedding_shapes_and_batch_independence(pool):
    m, ws = model(pool=pool), waves()
    batch, lengths = pad(ws)
    emb = impl.audio_encode(m, batch, lengths)
    assert emb.shape == (3, 24)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    alone = impl.audio_encode(m, ws[1][None], torch.tensor([3000]))
    assert torch.allclose(alone[0], emb[1], atol=1e-4)  # padding to 8,000 samples changes nothing
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)
    assert float(impl.audio_logit_scale(m).detach()) == pytest.approx(1 / 0.07, rel=1e-4)


def test_transcription_shapes_memory_padding_and_beam_one():
    m, ws = model(), waves()
    batch, lengths = pad(ws)
    greedy = impl.audio_transcribe(m, batch, lengths, max_len=8)
    assert greedy.shape[0] == 3 and greedy.shape[1] <= 9 and (greedy[:, 0] == 2).all()  # <bos> first
    assert torch.equal(impl.audio_transcribe(m, batch, lengths, beam=1, max_len=8), greedy)
    beam = impl.audio_transcribe(m, batch, lengths, beam=3, max_len=8)
    assert beam.shape[0] == 3
    alone = impl.audio_transcribe(m, ws[1][None], torch.tensor([3000]), max_len=8)
    assert alone[0].tolist() == greedy[1, :alone.shape[1]].tolist()  # the padding is masked
    # the cached one-token-at-a-time path equals teacher forcing, with a padded memory
    feats, memory_pad = m.encode(batch, lengths)
    assert memory_pad[1].any() and not memory_pad[0].any()
    ids = torch.randint(4, 20, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tf = m.decode(feats, ids, memory_pad=memory_pad)[0].log_softmax(-1)
        cached = m.cached_log_probs_from(feats, memory_pad, ids)
    assert torch.allclose(tf, cached, atol=1e-4)
    att = impl.audio_cross_attention(m, batch, lengths, greedy)
    assert att.shape == (3, greedy.shape[1] - 1, memory_pad.shape[1])
    assert torch.allclose(att.sum(-1), torch.ones(att.shape[:2]), atol=1e-4)
    n_real = int((~memory_pad[1]).sum())
    assert att[1, :, n_real:].abs().max() == 0  # no attention past the end of utterance 1


def batch_of(m, n: int = 4, seed: int = 0) -> tuple[dict, object]:
    g = torch.Generator().manual_seed(seed)
    img, txt = F.normalize(torch.randn(n, 24, generator=g), dim=-1), F.normalize(torch.randn(n, 24, generator=g), dim=-1)
    ids = torch.zeros(n, 12, dtype=torch.long)
    for i in range(n):
        k = 3 + i % 3
        ids[i, 0], ids[i, 1:k + 1], ids[i, k + 1] = 2, torch.randint(4, 20, (k,), generator=g), 3
    pairs = impl.audio_pairs(m, waves([4000 + 700 * i for i in range(n)], seed), img, txt, ids,
                             torch.tensor([0, 1, 0, 2][:n]))
    return pairs.get_batch(torch.arange(n), torch.Generator().manual_seed(3)), pairs


def test_pairs_batch_shapes():
    m = model()
    batch, pairs = batch_of(m)
    assert len(pairs) == 4
    assert batch["feats"].shape[:2] == (4, 16) and batch["n_frames"].tolist() == [1 + (4000 + 700 * i) // 160 for i in range(4)]
    assert batch["feats"].shape[2] == int(batch["n_frames"].max())
    assert batch["ids"].shape == batch["pad_mask"].shape == (4, 7)  # trimmed to the longest transcript
    assert batch["image_emb"].shape == batch["text_emb"].shape == (4, 24)


def test_loss_equals_its_definition_and_trains_every_part():
    m = model().train()
    m.cfg.dropout = 0.0
    batch, _ = batch_of(m)
    loss, logs = impl.audio_loss(m, batch, 0.5)
    out = m.listen(batch["feats"], batch["n_frames"])
    a = F.normalize(m.proj(out.cls), dim=-1)  # pool 'cls' (the default)
    s = m.scale()
    same = batch["key"][:, None] == batch["key"][None, :]
    mask = same & ~torch.eye(4, dtype=torch.bool)
    assert mask.any()  # utterances 0 and 2 share a key: masked out of each other's denominators

    def nce(x, y):
        logits = (s * x @ y.T).masked_fill(mask, float("-inf"))
        return (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2

    logits = m.decode(out.tokens, batch["ids"][:, :-1], memory_pad=out.padding_mask)[0]
    target = batch["ids"][:, 1:].masked_fill(batch["pad_mask"][:, 1:], -100)
    ce = F.cross_entropy(logits.reshape(-1, 20), target.reshape(-1), ignore_index=-100)
    expected = (nce(a, batch["image_emb"]) + nce(a, batch["text_emb"])) / 2 + 0.5 * ce
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(logs["loss_asr"]) == pytest.approx(float(ce.detach()), rel=1e-5)
    loss.backward()
    for name in ("tower.patch_embed.weight", "proj.weight", "log_scale", "tok_embed.weight",
                 "decoder.blocks.0.cross.kv.weight"):
        assert dict(m.named_parameters())[name].grad.abs().sum() > 0, name


def test_word_error_rate_known_answers():
    r = word_error_rate(["a red circle", "the big dog"], ["a red", "The big, big dog!"])
    assert r["wer"] == pytest.approx(2 / 6) and r["deletions"] == 1 and r["insertions"] == 1
    assert r["n_words"] == 6 and r["sentence_error_rate"] == 1.0
    assert word_error_rate(["a b c"], [""])["wer"] == 1.0
    assert word_error_rate(["a b"], ["a b c d e"])["wer"] == 1.5  # insertions can exceed 1
    assert word_error_rate(["one two"], ["one two"])["wer"] == 0.0
    with pytest.raises(ValueError):
        word_error_rate(["a"], ["a", "b"])


def test_speech_attention_figure(tmp_path):
    from eval.audio_figures import speech_attention_figure
    m, ws = model(), waves()
    batch, lengths = pad(ws)
    ids = impl.audio_transcribe(m, batch, lengths, max_len=6)
    att = impl.audio_cross_attention(m, batch, lengths, ids)
    feats, n = m.features(batch, lengths)
    vocab = ["<pad>", "<unk>", "<bos>", "<eos>"] + [f"w{i}" for i in range(16)]
    path = speech_attention_figure([feats[b, :, :int(n[b])] for b in range(3)], ids, att, tmp_path / "a.png",
                                   vocab=vocab, transcripts=["x"] * 3, hypotheses=["y"] * 3, eos_id=3, pad_id=0,
                                   patch_time=CFG["patch_time"])
    from PIL import Image
    assert Image.open(path).size[0] > 500
