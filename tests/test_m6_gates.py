"""Gate honesty for m6: on embeddings and transcripts built to be right, the gates pass, and the
grader's controls (constant audio embedding, shuffled audio, the most frequent transcript) fail
every gate they stand beside at the real quick thresholds; the pitfalls' symptoms (padding that
leaks, a decoder that ignores the audio) are measured through the seam and diagnosed.

The untrained-model control is measured in every grader run (results/quick/m6/report.md); it
needs the spoken world and a trained CLIP, so it is not repeated here."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from eval.reference.data.world import make_split
from milestones import m6_audio as m6
from milestones.adapters import CANDIDATE as impl
from milestones.m6_checks import (PITFALLS, AudioGateData, constant_audio, embed_gates, most_frequent_transcript,
                                  padding_leak, shuffled_audio)

pytestmark = [pytest.mark.m6, pytest.mark.usefixtures("one_thread")]
QUICK = m6.THRESHOLDS["quick"]
GATES = {g.key: g for g in m6.MILESTONE.gates}


def passes(key, value):
    return GATES[key].passes(value, QUICK[key])


@pytest.fixture(scope="module")
def right():
    """Audio embeddings that sit near their own image and class (noise 0.3 per coordinate)."""
    g = torch.Generator().manual_seed(0)
    n, e, c = 1000, 96, 80
    gallery = F.normalize(torch.randn(n, e, generator=g), dim=-1)
    classes = F.normalize(torch.randn(c, e, generator=g), dim=-1)
    labels = torch.randint(0, c, (n,), generator=g)
    near = lambda x: F.normalize(x + 0.3 * torch.randn(x.shape, generator=g) / e ** 0.5, dim=-1)  # noqa: E731
    return AudioGateData(near(classes[labels]), classes, labels, near(gallery), gallery)


def test_right_embeddings_pass_and_embedding_controls_fail(right):
    good = embed_gates(right)
    assert passes("a2i_R@10", good["a2i_R@10"]) and passes("zeroshot_top5", good["zeroshot_top5"])
    for control in (constant_audio(right), shuffled_audio(right, 20_000)):
        assert not passes("a2i_R@10", control["a2i_R@10"]), control
        assert not passes("zeroshot_top5", control["zeroshot_top5"]), control
        assert control["a2i_R@10"] < 0.05 and control["zeroshot_top5"] < 0.15  # about chance (0.01, 0.0625)


@pytest.mark.integration
def test_most_frequent_transcript_fails_the_wer_gate():
    train, test = make_split("train", 4000), make_split("test", 1000)
    train_texts = [cs[0] for cs in train.captions]
    wer = most_frequent_transcript(train_texts, [cs[0] for cs in test.captions])
    assert not passes("wer", wer) and wer > 0.7
    assert passes("wer", 0.0)  # the right words pass
    common = Counter(train_texts).most_common(1)[0][0]
    assert common in train_texts


def tones(lengths):
    t = [torch.arange(n) / 16_000 for n in lengths]
    return [0.3 * torch.sin(2 * torch.pi * (200 + 50 * i) * x) for i, x in enumerate(t)]


CFG = dict(vocab_size=20, max_len=12, n_mels=16, patch_freq=16, patch_time=4, max_frames=256, enc_dim=32,
           enc_depth=1, enc_heads=2, embed_dim=16, dim=32, depth=1, n_heads=2)


class PaddingLeaks(type(impl)):
    """Planted bug: the embedding ignores the utterance lengths (padding is attended to and pooled)."""

    def audio_encode(self, model, waves, lengths):
        return super().audio_encode(model, waves, torch.full_like(lengths, waves.shape[1]))


def pitfall(name):
    return next(p for p in PITFALLS if p.name == name)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_padding_leak_is_zero_for_the_bundled_model_and_diagnosed_when_planted(pool):
    torch.manual_seed(0)
    model = impl.audio_build({**CFG, "pool": pool}).eval()
    waves = tones([8000, 20000, 12000])
    leak = pitfall("padding leaks into the embedding")
    honest = padding_leak(model, waves)
    assert leak.diagnose({"padding_leak": honest}) is None and honest < 1e-4
    planted = padding_leak(model, waves, PaddingLeaks(impl.package))
    assert leak.diagnose({"padding_leak": planted}) is not None, planted


def test_decoder_that_ignores_audio_is_diagnosed():
    """An untrained decoder writes one transcript whatever it hears: the symptom, measured
    through the seam on 40 different tones, names the pitfall."""
    torch.manual_seed(0)
    model = impl.audio_build(CFG).eval()
    tok = impl.tokenizer_train(["w%d" % i for i in range(16)])
    hyp = m6.transcribe(model, tok, tones([4000 + 200 * i for i in range(40)]))
    share = len(set(hyp)) / len(hyp)
    assert pitfall("decoder ignores the audio").diagnose({"distinct_transcript_share": share}) is not None, hyp[:3]
    assert pitfall("decoder ignores the audio").diagnose({"distinct_transcript_share": 0.6}) is None
