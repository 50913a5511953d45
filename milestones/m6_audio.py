"""m6 — audio, the third modality: spoken captions bound to the image/text space, and transcribed.

Acceptance: a log-mel front end written on ``torch.stft`` (checked against librosa), SpecAugment,
and an AST-style transformer tower over spectrogram patches. The tower is bound to a CLIP's frozen
image and text towers (m2's, trained first in the same run) with the symmetric InfoNCE loss once
per pair (audio-image, audio-text; ImageBind/CLAP), and it feeds m3's cross-attention decoder,
which transcribes the speech (greedy and beam). Audio -> image retrieval and zero-shot audio
classification work on the spoken world, zero-shot on the held-out (colour, shape) compositions
it never heard; word error rate via jiwer.

The data (quick): the embedded world's captions spoken by espeak-ng with several voices, speeds
and pitches, 20 dB of white noise, 16 kHz (:mod:`mmsys.data.speech`, the grader's copy); the same
splits and held-out compositions as the images.

What the implementation must provide: the m6 section of :mod:`milestones.adapters` (and m2's,
whose CLIP it binds to).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from eval.audio_figures import speech_attention_figure
from eval.clip_figures import retrieval_grid
from eval.reference.audio.waves import pad
from eval.reference.data.speech import make_speech_split, spoken_transcripts
from eval.reference.data.world import WorldConfig, composition_label
from eval.validation import record
from eval.wer import word_error_rate
from milestones.adapters import CANDIDATE, Implementation
from milestones.base import Criterion, Milestone, RunContext, RunResult
from milestones.common import config_errors, load_into, read_checkpoint, train_config, world_split
from milestones.m2_clip import (RECIPES as M2_RECIPES, M2Recipe, class_embeddings, composition_names, embed_images,
                                embed_texts, load_clip, train_clip, world_image_keys)
from milestones.m6_checks import (CONTROL_SEED, CONTROLS, GATES, PITFALLS, AudioGateData, constant_audio,
                                  embed_gates, measure_symptoms, most_frequent_transcript, shuffled_audio,
                                  untrained_audio)

# ------------------------------------------------------------------ thresholds (the one place)
THRESHOLDS = {
    # Chance: a2i R@10 of 1,000 images 0.010; zero-shot top-5 among 80 compositions 0.0625.
    # Calibrated (results/calibration/m6.md: (seed, world seed) = (0,0), (1,1), (2,2), rule: at
    # least max(3 sd, 2 %) beyond the worst honest run, beyond the best control); first set by hand
    # to 0.10 / 0.20 / 0.60 before any run, which the rule did not allow for the first two:
    # a2i R@10 0.169 / 0.215 / 0.245 (sd 0.038): 0.05 is 3.1 sd below the worst; best control 0.017;
    # top-5 0.271 / 0.303 / 0.376 (sd 0.054): 0.109 is 3.0 sd below the worst, but only 0.007 above
    # the best control (a constant embedding, 0.102: the held-out classes nearest one vector), a
    # thin side: more training (a longer quick run) is what would widen it;
    # WER 0.489 / 0.490 / 0.453 (sd 0.021): 0.56 is 3.3 sd above the worst; best control 0.81 (the
    # most frequent transcript).
    # Calibrated again at 9a7649e (2026-12-08, AVX-512 CPU, one thread per run, two at a time; the
    # same recipe; why run (0, 0) moved from 0.169 to 0.202 since 7e1fc20 was not traced: code in
    # between, or the CPU's kernel level, which 7e1fc20's reports do not record): a2i R@10 0.202 /
    # 0.227 / 0.168 (rule met, 4.0 sd); top-5 0.342 / 0.216 / 0.412 (sd 0.099) and run (2, 2)
    # FAILS: its shuffled-audio control scores 0.13 > 0.109 (the derangement scores each class
    # with another class's prompts; where that class shares a colour or a shape, a model that
    # hears either may rank it high: a likely reason, not measured), so no top-5 threshold meets
    # the rule; WER 0.461 / 0.501 / 0.476: 0.56 is 2.9 sd above the worst (the rule
    # wants 0.5628). Unchanged: the recipe is what must change (chosen on validation, then
    # calibrated), not the bar; results/calibration/m6.md.
    "quick": {"a2i_R@10": 0.05, "zeroshot_top5": 0.109, "wer": 0.56},
}
POINTS = {"a2i_R@10": 4, "zeroshot_top5": 3, "wer": 3}


# ------------------------------------------------------------------ training recipes
@dataclass
class M6Recipe:
    # the CLIP audio is bound to: m2's quick recipe, shortened (zero-shot and retrieval come out a
    # little lower than m2's; the audio gates are measured against this CLIP's own towers)
    clip: M2Recipe = field(default_factory=lambda: replace(M2_RECIPES["quick"], steps=300))
    n_train: int = 4000  # spoken training captions
    n_test: int = 1000
    n_heldout: int = 1000
    n_val: int = 500  # what recipes are chosen on (benchmarks/m6_recipe.py)
    model: dict = field(default_factory=lambda: dict(patch_time=8, enc_dim=96, enc_depth=3, pool="mean",
                                                     max_len=24))
    # benchmarks/m6_recipe.py on val: at equal samples seen, 1600 x 32 beat 800 x 64; 1,200 steps
    # left zero-shot too close to its controls across seeds (top-5 0.237 / 0.164, best control 0.099)
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    bf16: bool = False
    asr_weight: float = 1.0  # transcript cross-entropy beside the two InfoNCE terms
    max_minutes: float | None = None


RECIPES = {"quick": M6Recipe()}
SMOKE_RECIPES = {"quick": replace(RECIPES["quick"], clip=replace(M2_RECIPES["quick"], n_train=2000, steps=6,
                                                                  batch_size=32, warmup_steps=2),
                                  n_train=128, n_test=64, n_heldout=64, n_val=32, steps=6, batch_size=16,
                                  warmup_steps=2)}


# ------------------------------------------------------------------ embedding and transcription
@torch.no_grad()
def embed_audio(model, waves: list[torch.Tensor], impl: Implementation = CANDIDATE, batch: int = 100) -> torch.Tensor:
    """N waveforms -> (N, E) unit vectors on the CPU, ``batch`` at a time (zero-padded; each
    utterance's embedding must not depend on its batch)."""
    dev = next(model.parameters()).device
    return torch.cat([impl.audio_encode(model, *(t.to(dev) for t in pad(waves[i:i + batch]))).cpu()
                      for i in range(0, len(waves), batch)])


@torch.no_grad()
def transcribe(model, tok, waves: list[torch.Tensor], impl: Implementation = CANDIDATE, beam: int = 1,
               batch: int = 100) -> list[str]:
    """N waveforms -> N transcripts (greedy at ``beam=1``), decoded by the tokenizer."""
    dev, out = next(model.parameters()).device, []
    for i in range(0, len(waves), batch):
        ids = impl.audio_transcribe(model, *(t.to(dev) for t in pad(waves[i:i + batch])), beam=beam)
        out += [impl.tokenizer_decode(tok, s) for s in ids.cpu().tolist()]
    return out


def gate_data(model, zs_waves: list[torch.Tensor], zs_labels: torch.Tensor, query_waves: list[torch.Tensor],
              gallery: torch.Tensor, classifier: torch.Tensor, impl: Implementation = CANDIDATE) -> AudioGateData:
    """The embedding gates' inputs for ``model`` (see :class:`AudioGateData`): ``gallery`` (Q, E)
    and ``classifier`` (C, E) come from the frozen CLIP, computed once per run."""
    return AudioGateData(embed_audio(model, zs_waves, impl), classifier, zs_labels,
                         embed_audio(model, query_waves, impl), gallery)


def validation_data(model, clip, val, classifier, impl: Implementation = CANDIDATE) -> AudioGateData:
    """The embedding gates' inputs on the validation split: retrieval among its own images,
    zero-shot on its single-object utterances (seen compositions: the held-out ones are test's)."""
    single = val.meta["scenes"]["n_objects"] == 1
    return gate_data(model, [w for w, s in zip(val.waves, single) if s], composition_label(val.meta["scenes"])[single],
                     val.waves, embed_images(clip, val.meta["world"].images), classifier, impl)


def evaluate(model, tok, test, heldout, gallery, classifier, impl: Implementation = CANDIDATE):
    """-> (gate metrics and more, gate data, test hypotheses); ``gallery`` = the CLIP's
    embeddings of the test split's images."""
    d = gate_data(model, heldout.waves, composition_label(heldout.meta["scenes"]), test.waves, gallery, classifier,
                  impl)
    hyp = transcribe(model, tok, test.waves, impl)
    w = word_error_rate(test.transcripts, hyp)
    metrics = {**embed_gates(d), "wer": w["wer"], "sentence_error_rate": w["sentence_error_rate"],
               "wer_substitutions": w["substitutions"], "wer_deletions": w["deletions"],
               "wer_insertions": w["insertions"], "wer_reference_words": w["n_words"]}
    return metrics, d, hyp


# ------------------------------------------------------------------ training
def audio_model_config(recipe: M6Recipe, tok) -> dict:
    return {**recipe.model, "vocab_size": len(tok)}


def train_audio(recipe: M6Recipe, clip, tok, train, ctx: RunContext, extra: dict, impl: Implementation = CANDIDATE):
    """Bind ``impl``'s audio model to ``clip``'s frozen towers on the spoken ``train`` split.
    Returns (model in eval mode, model config, trainer summary)."""
    config = audio_model_config(recipe, tok)
    torch.manual_seed(ctx.seed)
    model = impl.audio_build(config)
    world = train.meta["world"]
    ids, _ = impl.clip_tokenize(tok, train.transcripts, config["max_len"])  # <bos> .. <eos>, padded
    pairs = impl.audio_pairs(model, train.waves, embed_images(clip, world.images),
                             embed_texts(clip, tok, train.transcripts), ids, world_image_keys(world.meta["scenes"]))
    cfg = train_config(recipe, ctx, log_every=25)
    trainer = impl.trainer(model, cfg, loss_fn=lambda m, b: impl.audio_loss(m, b, recipe.asr_weight),
                           data_size=len(pairs), get_batch=pairs.get_batch, kind="audio", model_config=config,
                           extra={"tokenizer": impl.tokenizer_state(tok), **extra})
    summary = trainer.fit()
    return trainer.eval_model().eval(), config, summary


def load_audio(path, impl: Implementation = CANDIDATE):
    """(audio model in eval mode, clip, tok, checkpoint) from an m6 checkpoint, whose
    ``extra["clip_checkpoint"]`` names the CLIP it was bound to (relative to its own folder)."""
    ck = read_checkpoint(path, "audio")
    model = load_into(path, ck, impl.audio_build, required_extra=("tokenizer", "clip_checkpoint"))
    with config_errors(path, "extra['clip_checkpoint']"):
        clip, tok, _ = load_clip(Path(path).parent / ck["extra"]["clip_checkpoint"], impl=impl)
    return model.eval(), clip, tok, ck


# ------------------------------------------------------------------ figures
def make_figures(model, config: dict, tok, test, d: AudioGateData, hyp: list[str], ctx: RunContext,
                 impl: Implementation = CANDIDATE, n: int = 6, k: int = 5) -> list[str]:
    """The log-mel with per-word cross-attention of 3 test utterances, and an audio -> image
    retrieval grid of ``n`` test utterances (top ``k``; green: its own image, gold: a scene that
    means the same, red: another)."""
    from eval.reference.audio.features import LogMel, LogMelConfig, frame_lengths
    w, lengths = pad(test.waves[:3])
    ids = impl.audio_transcribe(model, w, lengths)
    att = impl.audio_cross_attention(model, w, lengths, ids)
    with torch.no_grad():  # what is drawn: the grader's own log-mel of the same waves
        feats, frames = LogMel(LogMelConfig(n_mels=config.get("n_mels", 40)))(w, lengths), frame_lengths(lengths)
    special = impl.tokenizer_special_ids(tok)
    names = {i: f"<{name}>" for name, i in special.items()}
    vocab = [names.get(i) or impl.tokenizer_decode(tok, [i]) for i in range(len(tok))]
    fig1 = speech_attention_figure([feats[b, :, : int(frames[b])] for b in range(len(w))], ids, att,
                                   ctx.path("speech_attention.png"), vocab=vocab, transcripts=test.transcripts[:3],
                                   hypotheses=hyp[:3], eos_id=special["eos"], pad_id=special["pad"],
                                   patch_time=int(config["patch_time"]))
    sim = d.queries[:n] @ d.gallery.T
    top = sim.topk(k, dim=1)
    keys = world_image_keys(test.meta["scenes"])
    correct = torch.where(top.indices == torch.arange(n)[:, None], 2,
                          (keys[top.indices] == keys[:n, None]).long())
    fig2 = retrieval_grid([f"said: {t}" for t in test.transcripts[:n]], test.meta["world"].images[top.indices],
                          ctx.path("audio_retrieval_grid.png"), correct=correct, scores=top.values,
                          title="spoken caption -> image retrieval")
    return [str(fig1), str(fig2)]


# ------------------------------------------------------------------ the milestone
BINDING = ("Audio is bound to a CLIP trained first in this run with m2's quick recipe, whose image and text "
           "towers stay frozen: loss = (InfoNCE(audio, image) + InfoNCE(audio, text)) / 2 + asr_weight x "
           "teacher-forced transcript cross-entropy; utterances of scenes with the same canonical description are "
           "masked as duplicates.")


class M6(Milestone):
    id = "m6"
    checkpoint_kind = "audio"
    title = "Audio: spoken captions in the image/text space, and speech recognition"
    marker = "m6"
    test_files = ("tests/test_audio_features.py", "tests/test_audio_tower.py", "tests/test_audio_model.py",
                  "tests/test_m6_gates.py")
    criteria = (
        Criterion("log-mel front end on torch.stft matches librosa's melspectrogram",
                  "test:tests/test_audio_features.py"),
        Criterion("AST tower over spectrogram patches: shapes, padding masked",
                  "test:tests/test_audio_tower.py"),
        Criterion("audio loss equals its definition (two InfoNCE terms + transcript CE, duplicates masked)",
                  "test:tests/test_audio_model.py"),
        Criterion("the controls fail the gates; a padding leak and a deaf decoder are diagnosed",
                  "test:tests/test_m6_gates.py"),
        Criterion("audio -> image recall@10 on the spoken test split", "gate:a2i_R@10"),
        Criterion("zero-shot audio classification on held-out compositions", "gate:zeroshot_top5"),
        Criterion("speech recognition word error rate", "gate:wer"),
    )
    gates = GATES
    controls = CONTROLS
    pitfalls = PITFALLS
    thresholds = THRESHOLDS
    points = POINTS
    recipes = RECIPES
    smoke_recipes = SMOKE_RECIPES
    data_needed = {"quick": "none (embedded world, spoken by espeak-ng: apt-get install -y espeak-ng)",
                   "full": "not written yet: it needs real speech paired with images (spoken COCO captions), which "
                           "is not here; mmsys.data.audio_folder already reads LibriSpeech-style folders"}

    def run(self, ctx: RunContext) -> RunResult:
        return run_quick(ctx, self.recipe(ctx))


def speech_split(ctx: RunContext, split: str, n: int):
    return make_speech_split(split, n, world=WorldConfig(seed=ctx.split_world_seed(split)))


def run_quick(ctx: RunContext, recipe: M6Recipe) -> RunResult:
    """Train a CLIP, then bind and train the audio model (or load ``ctx.checkpoint``); measure on
    the spoken world."""
    t0 = time.perf_counter()
    test, heldout = speech_split(ctx, "test", recipe.n_test), speech_split(ctx, "heldout", recipe.n_heldout)
    train = None if ctx.checkpoint else speech_split(ctx, "train", recipe.n_train)
    splits = [s for s in (train, test, heldout) if s is not None]
    ctx.log("data: " + ", ".join(f"{s.name} {len(s)}" for s in splits) + f" ({time.perf_counter() - t0:.1f} s)")
    info: dict = {"binding": BINDING}
    if ctx.checkpoint:
        model, clip, tok, ck = load_audio(ctx.checkpoint)
        config, summary, ckpt = ck["model_config"], None, str(ctx.checkpoint)
        info["loaded_step"] = ck.get("step")
    else:
        t1 = time.perf_counter()
        clip_dir = ctx.out_dir / "clip"
        clip, tok, clip_summary = train_clip(recipe.clip, world_split(ctx, "train", recipe.clip.n_train), ctx.seed,
                                             clip_dir, ctx.progress, ctx.device)
        info["clip_training"] = {k: clip_summary.get(k) for k in ("steps", "wall_s", "temperature", "final_metrics")}
        ctx.log(f"CLIP trained ({time.perf_counter() - t1:.0f} s); binding audio to its frozen towers")
        t1 = time.perf_counter()
        model, config, summary = train_audio(recipe, clip, tok, train, ctx, {"clip_checkpoint": "clip/checkpoint.pt"})
        summary["train_call_s"] = time.perf_counter() - t1
        info["training"] = summary
        ckpt = str(ctx.path("checkpoint.pt"))
    classifier = class_embeddings(clip, tok, composition_names())
    gallery = embed_images(clip, test.meta["world"].images)  # frozen: shared by the model and its controls
    t1 = time.perf_counter()
    metrics, d, hyp = evaluate(model, tok, test, heldout, gallery, classifier)
    info["eval_s"] = time.perf_counter() - t1
    ctx.log(f"a2i R@10 {metrics['a2i_R@10']:.3f}, zero-shot top-5 {metrics['zeroshot_top5']:.3f}, "
            f"WER {metrics['wer']:.3f}")
    # controls, with the gates' protocol
    t1 = time.perf_counter()
    fresh = untrained_audio(config, ctx.seed, ctx.device)
    fm, _, fresh_hyp = evaluate(fresh, tok, test, heldout, gallery, classifier)
    train_texts = (train.transcripts if train is not None
                   else spoken_transcripts("train", recipe.n_train, world=WorldConfig(seed=ctx.world_seed)))
    controls = {"untrained model": {k: fm[k] for k in ("a2i_R@10", "zeroshot_top5", "wer")},
                "constant audio embedding": constant_audio(d),
                "shuffled audio": shuffled_audio(d, CONTROL_SEED + ctx.seed),
                "most frequent transcript": {"wer": most_frequent_transcript(train_texts, test.transcripts)}}
    for name, values in controls.items():
        ctx.log(f"control {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    symptoms = measure_symptoms(model, fresh, config, hyp, test.waves[:50], summary, recipe.warmup_steps)
    info["controls_s"] = time.perf_counter() - t1
    info["examples"] = [{"said": t, "heard": h} for t, h in zip(test.transcripts[:8], hyp[:8])]
    info["untrained_examples"] = fresh_hyp[:3]
    info["zeroshot_protocol"] = (f"{len(heldout)} spoken held-out single-object captions, classes = all 80 (colour, "
                                 f"shape) compositions, the frozen CLIP's prompt ensemble")
    figs = make_figures(model, config, tok, test, d, hyp, ctx)
    validation = {}
    if recipe.n_val:  # after every gate number
        val = speech_split(ctx, "val", recipe.n_val)
        splits.append(val)
        vd = validation_data(model, clip, val, classifier)
        vm = embed_gates(vd)
        vw = word_error_rate(val.transcripts, transcribe(model, tok, val.waves))["wer"]
        validation = record(val.name, len(val), {"val_a2i_R@10": vm["a2i_R@10"], "val_zeroshot_top5": vm["zeroshot_top5"],
                                                 "val_wer": vw},
                            f"retrieval among its {len(val)} images, zero-shot on its {len(vd.labels)} "
                            f"single-object utterances among all 80 compositions (seen ones), greedy WER")
        ctx.log("validation: " + ", ".join(f"{k} {v:.3f}" for k, v in validation["metrics"].items()))
    datasets = [s.summary() for s in splits]
    return RunResult(metrics=metrics, info=info, datasets=datasets, checkpoint=ckpt,
                     config={"recipe": asdict(recipe), "profile": "quick", "model": config}, figures=figs,
                     controls=controls, symptoms=symptoms, validation=validation)


MILESTONE = M6()
