"""m6's gates, controls and pitfalls: what must fail the audio gates, and what a failing gate names.

Controls (:data:`CONTROLS`, measured in every run with the gates' protocol): an untrained audio
model from the candidate's own builder (bound to the same frozen CLIP), the trained model's audio
embeddings made constant or shuffled against their images and classes, and for WER a "decoder"
that always writes the training split's most frequent transcript (what a language model that
never listens would do best). Pitfalls (:data:`PITFALLS`): the temperature at its clamp, a
decoder that ignores the audio (one transcript for many utterances), padding that leaks into an
utterance's embedding, and a loss flat after warm-up -- each read from :func:`measure_symptoms`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from eval.clip_controls import derangement
from eval.clip_symptoms import logit_scale_symptoms
from eval.diagnostics import loss_drop_after_warmup
from eval.reference.audio.waves import pad
from eval.retrieval import text_to_image_recall, zero_shot_topk
from eval.wer import word_error_rate
from milestones.adapters import CANDIDATE, Implementation
from milestones.base import Control, Gate, Pitfall

UNTRAINED_SEED = 10_000  # the untrained control is built from seed UNTRAINED_SEED + --seed
CONTROL_SEED = 20_000  # the shuffled control's derangements are drawn from CONTROL_SEED + --seed
EMBED_KEYS = ("a2i_R@10", "zeroshot_top5")

GATES = (
    Gate("a2i_R@10", "audio->image recall@10: each spoken test caption a query, the test split's images the "
         "gallery (its own scene's image the answer, ties counted against it); quick: 1,000 utterances / "
         "1,000 images, chance 0.010"),
    Gate("zeroshot_top5", "zero-shot top-5 of spoken captions of held-out (colour, shape) compositions, scored "
         "among all 80 compositions by the frozen CLIP's prompt-ensemble text embeddings; quick: 1,000 "
         "utterances, chance 0.0625"),
    Gate("wer", "word error rate of greedy transcription of the spoken test captions against what was said "
         "(eval/wer.py: lower-cased, punctuation stripped, corpus-level via jiwer)", "<"),
)
CONTROLS = (
    Control("untrained model", "the candidate's own audio builder, the trained model's config, seed 10,000 + "
            "--seed, no training, bound to the same frozen CLIP, measured on the gates' own data",
            ("a2i_R@10", "zeroshot_top5", "wer")),
    Control("constant audio embedding", "every utterance (queries and zero-shot) given one embedding, the "
            "normalised mean of the trained model's embeddings of that set", EMBED_KEYS),
    Control("shuffled audio", "the trained model's embeddings with the pairing broken by fixed derangements "
            "(seed 20,000 + --seed): each utterance's answer is another image, each class scored with another "
            "class's prompts", EMBED_KEYS),
    Control("most frequent transcript", "every test utterance transcribed as the training split's most "
            "frequent caption: a decoder that writes fluent text without listening", ("wer",)),
)
PITFALLS = (
    Pitfall("temperature at its clamp", EMBED_KEYS, "logit_scale_over_clamp", lambda v: v >= 0.99,
            "the learned logit scale is {value:.3f} of its clamp: stuck at the maximum, where the clamp passes "
            "no gradient"),
    Pitfall("decoder ignores the audio", ("wer",), "distinct_transcript_share", lambda v: v < 0.1,
            "only {value:.3f} of the test utterances got a transcript of their own: the decoder writes nearly "
            "the same words whatever it hears (cross-attention unused, or the memory detached/zeroed)"),
    Pitfall("padding leaks into the embedding", EMBED_KEYS + ("wer",), "padding_leak", lambda v: v > 1e-3,
            "an utterance's embedding moved by {value:.2e} (max |difference|) when padded beside a longer one: "
            "padded frames or patches are attended to or pooled"),
    Pitfall("loss flat after warm-up", EMBED_KEYS + ("wer",), "loss_drop_after_warmup", lambda v: v < 0.05,
            "the training loss fell only {value:.3f} (relative) after warm-up: the model is not learning"),
)


@dataclass(frozen=True)
class AudioGateData:
    """What the embedding gates are computed from: zs_audio (N, E) embeddings of the zero-shot
    utterances, class_emb (C, E) prompt-ensemble class embeddings, labels (N,); queries (Q, E)
    embeddings of the test utterances, gallery (Q, E) image embeddings of their scenes (query k's
    answer is image k)."""

    zs_audio: torch.Tensor
    class_emb: torch.Tensor
    labels: torch.Tensor
    queries: torch.Tensor
    gallery: torch.Tensor


def embed_gates(d: AudioGateData, answers: torch.Tensor | None = None) -> dict[str, float]:
    """{"a2i_R@1", "a2i_R@10", "zeroshot_top1", "zeroshot_top5"} of ``d`` (cosines, ties pessimistic);
    ``answers`` (Q,) overrides each query's image (default: its own)."""
    zs = zero_shot_topk(d.zs_audio, d.class_emb, d.labels, ks=(1, 5))
    a = torch.arange(len(d.queries)) if answers is None else answers
    r = text_to_image_recall(d.queries, d.gallery, a, ks=(1, 10))
    return {"a2i_R@1": r["R@1"], "a2i_R@10": r["R@10"], "zeroshot_top1": zs["top1"], "zeroshot_top5": zs["top5"]}


def constant_audio(d: AudioGateData) -> dict[str, float]:
    """The embedding gates with every utterance given its set's normalised mean embedding."""
    def const(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float().mean(dim=0), dim=-1).expand(len(x), -1)
    return embed_gates(replace(d, zs_audio=const(d.zs_audio), queries=const(d.queries)))


def shuffled_audio(d: AudioGateData, seed: int) -> dict[str, float]:
    """The embedding gates with the pairing deranged (answers and classes)."""
    g = torch.Generator().manual_seed(seed)
    classes, images = derangement(len(d.class_emb), g), derangement(len(d.gallery), g)
    return embed_gates(replace(d, class_emb=d.class_emb[classes]), answers=images)


def most_frequent_transcript(train_transcripts: list[str], references: list[str]) -> float:
    """WER of writing the training split's most frequent transcript for every reference."""
    common = Counter(train_transcripts).most_common(1)[0][0]
    return word_error_rate(references, [common] * len(references))["wer"]


def untrained_audio(config: dict, seed: int, device: str = "cpu", impl: Implementation = CANDIDATE):
    """``impl``'s audio model built from ``config`` with seed ``UNTRAINED_SEED + seed``, in eval
    mode (the global RNG state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNTRAINED_SEED + seed)
        return impl.audio_build(config).to(device).eval()


@torch.no_grad()
def padding_leak(model, waves: list[torch.Tensor], impl: Implementation = CANDIDATE) -> float:
    """Max |embedding difference| of the shortest of ``waves`` embedded alone and beside the longest
    (padded to its length): 0 when padding is masked everywhere."""
    order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
    short, long = waves[order[0]], waves[order[-1]]
    alone = impl.audio_encode(model, *pad([short]))
    beside = impl.audio_encode(model, *pad([short, long]))[:1]
    return float((alone - beside).abs().max())


def measure_symptoms(model, fresh, config: dict, hypotheses: list[str], waves: list[torch.Tensor],
                     summary: dict | None, warmup_steps: int, impl: Implementation = CANDIDATE) -> dict[str, float]:
    """The numbers :data:`PITFALLS` read: the logit scale against its clamp and ``fresh``'s, the
    share of distinct transcripts among ``hypotheses`` (the test utterances'), the padding leak
    on ``waves``, and for a model trained in this run the loss drop after warm-up."""
    clamp = float(config.get("max_logit_scale", 100.0))
    out = logit_scale_symptoms(float(impl.audio_logit_scale(model).detach()),
                               float(impl.audio_logit_scale(fresh).detach()), clamp)
    out["distinct_transcript_share"] = len(set(hypotheses)) / max(len(hypotheses), 1)
    out["padding_leak"] = padding_leak(model, waves, impl)
    drop = loss_drop_after_warmup(summary["loss_curve"], warmup_steps) if summary and summary.get("loss_curve") else None
    if drop is not None and math.isfinite(drop):
        out["loss_drop_after_warmup"] = drop
    return out
