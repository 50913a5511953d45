"""Generic metrics on constructed inputs with known answers: classification (eval/classification),
retrieval (eval/retrieval) and CLIP score (eval/clip_score)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eval.classification import accuracy, confusion_matrix, topk_accuracy
from eval.clip_score import TorchmetricsCLIPAdapter, clip_score
from eval.retrieval import (image_to_image_topk, image_to_text_recall, recall_at_k,
                            text_to_image_recall, zero_shot_topk)

# ----------------------------------------------------------------------------- classification
LOGITS = torch.tensor([[0.1, 0.7, 0.2],     # pred 1, label 1 -> right
                       [0.5, 0.3, 0.2],     # pred 0, label 2 -> wrong; label rank 2
                       [0.2, 0.3, 0.5],     # pred 2, label 1 -> wrong; label rank 1
                       [0.6, 0.1, 0.3]])    # pred 0, label 0 -> right
LABELS = torch.tensor([1, 2, 1, 0])


def test_accuracy_from_logits_and_predictions():
    assert accuracy(LOGITS, LABELS) == 0.5
    assert accuracy(torch.tensor([1, 0, 2, 0]), LABELS) == 0.5
    with pytest.raises(ValueError):
        accuracy(LOGITS, LABELS[:3])


def test_topk_accuracy_known_values_and_pessimistic_ties():
    assert topk_accuracy(LOGITS, LABELS, 1) == 0.5
    assert topk_accuracy(LOGITS, LABELS, 2) == 0.75
    assert topk_accuracy(LOGITS, LABELS, 3) == 1.0
    flat = torch.zeros(4, 3)                         # a collapsed model: every score equal
    assert topk_accuracy(flat, LABELS, 1) == 0.0 and topk_accuracy(flat, LABELS, 3) == 1.0
    assert accuracy(flat, LABELS) == 0.25            # argmax -> class 0, one label is 0


def test_confusion_matrix_rows_are_truth():
    cm = confusion_matrix(torch.tensor([1, 0, 2, 0]), LABELS, 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]
    assert torch.equal(confusion_matrix(LOGITS, LABELS, 3), cm)
    assert cm.trace().item() / cm.sum().item() == accuracy(LOGITS, LABELS)
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([3, 0, 0, 0]), LABELS, 3)


# ----------------------------------------------------------------------------- retrieval
SIM = torch.tensor([[0.9, 0.1, 0.5],
                    [0.2, 0.3, 0.8],
                    [0.4, 0.6, 0.1]])


def test_recall_at_k_with_index_positives():
    r = recall_at_k(SIM, torch.tensor([0, 0, 2]), ks=(1, 2, 3))
    # ranks: q0 -> 0, q1 (0.2 below 0.3, 0.8) -> 2, q2 (0.1 below 0.4, 0.6) -> 2
    assert r["R@1"] == pytest.approx(1 / 3) and r["R@2"] == pytest.approx(1 / 3)
    assert r["R@3"] == 1.0 and r["median_rank"] == 3.0 and r["n_queries"] == 3


def test_recall_at_k_with_several_positives_uses_the_best():
    pos = torch.tensor([[True, False, False], [True, True, False], [False, False, True]])
    r = recall_at_k(SIM, pos, ks=(1, 2))
    assert r["R@1"] == pytest.approx(1 / 3) and r["R@2"] == pytest.approx(2 / 3)   # q1 -> rank 1


def test_recall_identity_permutation_and_collapse():
    e = torch.eye(6)
    assert text_to_image_recall(e, e, torch.arange(6), ks=(1,))["R@1"] == 1.0
    perm = torch.tensor([0, 2, 1, 3, 5, 4])                 # fixed points: 0 and 3
    r = text_to_image_recall(e, e[perm], torch.arange(6), ks=(1,))
    assert r["R@1"] == pytest.approx(2 / 6)
    r = text_to_image_recall(e, e[perm], perm.argsort(), ks=(1,))   # correct pairing -> perfect
    assert r["R@1"] == 1.0
    same = torch.ones(5, 4)                                 # collapsed embeddings: all ties
    assert recall_at_k(same @ same.T, torch.arange(5), ks=(1, 4, 5)) == {
        "R@1": 0.0, "R@4": 0.0, "R@5": 1.0, "median_rank": 5.0, "n_queries": 5}


def _pairs():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.6, 0.8], [1.0, 0.1], [0.9, 0.1], [1.0, 0.3]])
    return images, texts, torch.tensor([0, 0, 1, 1])


def test_image_to_text_any_correct_caption_counts():
    images, texts, t2i = _pairs()
    # image 0: best caption t1 (own) -> rank 0; image 1: own captions t2 (0.110), t3 (0.287)
    # are beaten by t0 (0.8) -> rank 1
    r = image_to_text_recall(images, texts, t2i, ks=(1, 2))
    assert r == {"R@1": 0.5, "R@2": 1.0, "median_rank": 1.5, "n_queries": 2}
    scaled = image_to_text_recall(images * 7, texts * 0.1, t2i, ks=(1, 2))    # normalised inside
    assert scaled == r


def test_text_to_image_and_chunking():
    images, texts, t2i = _pairs()
    r = text_to_image_recall(texts, images, t2i, ks=(1, 2))
    assert r["R@1"] == 0.25 and r["R@2"] == 1.0             # only t1 finds its image first
    g = torch.Generator().manual_seed(0)
    t, i = torch.randn(50, 8, generator=g), torch.randn(20, 8, generator=g)
    idx = torch.randint(0, 20, (50,), generator=g)
    assert text_to_image_recall(t, i, idx, chunk=7) == text_to_image_recall(t, i, idx)


def test_zero_shot_topk():
    classes = torch.eye(3)
    imgs = torch.tensor([[0.9, 0.5, 0.1], [0.1, 0.2, 0.9], [0.3, 0.25, 0.2]])
    r = zero_shot_topk(imgs, classes, torch.tensor([1, 2, 2]), ks=(1, 2))
    assert r == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3), "n_queries": 3}


def test_image_to_image_precision_excludes_the_query():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 0])
    # neighbours: a -> b,d,c   b -> a,d,c   c -> d,b,a   d -> c,b,a
    r = image_to_image_topk(emb, labels, ks=(1, 2, 3))
    assert r["P@1"] == 0.5 and r["P@2"] == 0.625
    assert r["P@3"] == pytest.approx((2 / 3 + 2 / 3 + 0 + 2 / 3) / 4)
    assert image_to_image_topk(emb, labels, ks=(1,), chunk=3) == {"P@1": 0.5, "n_queries": 4}
    with pytest.raises(ValueError):
        image_to_image_topk(emb, labels, ks=(4,))


def test_constant_embeddings_cannot_score_by_tie_order():
    """Issue 23: a constant embedding (every image the same vector) gets no recall from the order
    its ties happen to be broken in: wherever the correct item sits in the gallery (first, last,
    spread), every wrong item tied with it ranks above it."""
    g = torch.Generator().manual_seed(0)
    texts = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    const = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=-1).expand(20, 8)
    for t2i in (torch.zeros(40, dtype=torch.long), torch.full((40,), 19), torch.arange(40) % 20):
        r = text_to_image_recall(texts, const, t2i, ks=(1, 10, 19, 20))
        assert (r["R@1"], r["R@10"], r["R@19"], r["R@20"], r["median_rank"]) == (0.0, 0.0, 0.0, 1.0, 20.0)
    r = image_to_text_recall(const, texts[:1].expand(40, 8), torch.arange(40) % 20, ks=(1, 10))  # captions equal too
    assert r["R@1"] == 0.0 and r["R@10"] == 0.0
    # zero-shot: every class prompt the same embedding -> no image has its class in a top-k < C
    labels = torch.arange(40) % 10
    assert zero_shot_topk(texts, const[:10], labels, ks=(1, 5, 9, 10)) == {
        "top1": 0.0, "top5": 0.0, "top9": 0.0, "top10": 1.0, "n_queries": 40}
    # image->image: all embeddings equal -> images of another label first (a stable sort by
    # index alone would give query 0 its neighbour 1, of its own label, at P@1 = 1)
    r = image_to_image_topk(torch.ones(4, 3), torch.tensor([0, 0, 1, 1]), ks=(1, 2, 3))
    assert r["P@1"] == 0.0 and r["P@2"] == 0.0 and r["P@3"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- CLIP score
S = 1 / math.sqrt(2)
VOCAB = {"right": 1, "up": 2, "left": 3}


class FakeTokenizer:
    """Word -> id; pads with 0 to the longest caption; truncates to max_len."""

    def __init__(self):
        self.max_lens = []

    def batch_encode(self, texts, max_len):
        self.max_lens.append(max_len)
        seqs = [[VOCAB[w] for w in t.split()][:max_len] for t in texts]
        length = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (length - len(s)) for s in seqs])
        return ids, ids == 0


class FakeCLIP(nn.Module):
    """Image embedding = normalised first two red pixels; text = normalised mean word vector.

    The pad id has a huge vector, so ignoring the pad mask would change every answer.
    """

    context_length = 4

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.tensor([[0.0, -100.0], [1, 0], [0, 1], [-1, 0]]))
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode_image(self, x):
        return F.normalize(x[:, 0, 0, :2], dim=-1)

    def encode_text(self, ids, pad_mask):
        keep = (~pad_mask).float()[..., None]
        return F.normalize((self.table[ids] * keep).sum(1) / keep.sum(1), dim=-1)


def img(p0: int, p1: int) -> torch.Tensor:
    x = torch.zeros(3, 2, 2, dtype=torch.uint8)
    x[0, 0, 0], x[0, 0, 1] = p0, p1
    return x


A, B = img(255, 255), img(0, 255)          # directions (1, 1)/sqrt2 and (-1, 1)/sqrt2


def test_clip_score_matches_hand_cosines_with_clamp_on_the_mean():
    model, tok = FakeCLIP(), FakeTokenizer()
    model.train()
    images = torch.stack([A, A, B, A])
    captions = ["up", "right", "right", "right up"]      # cosines s, s, -s, 1
    r = clip_score(model, tok, images, captions, batch_size=3)
    mean = (S + S - S + 1) / 4
    assert r["mean_cosine"] == pytest.approx(mean, abs=1e-6)
    assert r["clip_score_100"] == pytest.approx(100 * mean, abs=1e-4)   # not mean of clamped
    assert r["n"] == 4 and model.training and set(tok.max_lens) == {4}
    neg = clip_score(model, tok, torch.stack([B, B, A]), ["right", "right", "left"])
    assert neg["clip_score_100"] == 0.0 and neg["mean_cosine"] == pytest.approx(-S, abs=1e-6)


def test_clip_adapter_interface_and_truncation():
    model, tok = FakeCLIP(), FakeTokenizer()
    adapter = TorchmetricsCLIPAdapter(model, tok)
    assert adapter.config.text_config.max_position_embeddings == 4
    batch = adapter.processor(text=["right up up up up up", "left"], return_tensors="pt", padding=True)
    assert batch["input_ids"].tolist() == [[1, 2, 2, 2], [3, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    feats = adapter.get_text_features(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(feats, F.normalize(torch.tensor([[1.0, 3.0], [-1.0, 0.0]]), dim=-1))
    px = adapter.processor(images=[A, B])["pixel_values"]
    assert px.dtype == torch.float32 and px[0, 0, 0, :2].tolist() == [1.0, 1.0]
    assert px[1, 0, 0, :2].tolist() == [-1.0, 1.0] and px[0, 1].eq(-1).all()
    with pytest.raises(ValueError):
        clip_score(model, tok, torch.stack([A, B]), ["right"])
