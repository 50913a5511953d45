"""The m6 audio model: one AST tower that both joins the CLIP space and transcribes speech.

Data flow::

    waveform (B, T) in [-1, 1] at 16 kHz, lengths (B,) samples
      -> log-mel front end (mmsys.audio.features.LogMel): (B, n_mels, frames), per-utterance
         normalised; SpecAugment masks while training (mmsys.audio.augment)
      -> AST tower (mmsys.audio.tower.AudioTower): CLS (B, Da), patch tokens (B, N, Da) with
         their padding mask (B, N)
      -> [embedding head]  CLS -> linear -> L2-normalise: (B, E), a point in the image/text
         space of a CLIP (m2), whose towers stay frozen while audio is bound to them
      -> [transcription head]  the m3 cross-attention decoder (mmsys.decoder) over the patch
         tokens: logits (B, L, V) of the spoken words; greedy and beam-search decoding

Binding (ImageBind, Girdhar et al. 2023; CLAP, Elizalde et al. 2023): audio is pulled to the
frozen image and text embeddings of what it says with the symmetric InfoNCE loss of CLIP, once
per pair (audio-image, audio-text), with one learnable temperature. Transcription is teacher-forced
cross-entropy. :func:`audio_loss` sums them: ``(L_ai + L_at) / 2 + asr_weight * L_asr``.

The front end runs once per utterance (:meth:`AudioModel.features`) and training batches hold
features (:class:`SpokenPairs`), so the STFT is not recomputed every epoch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..clip import clip_loss, duplicate_mask
from ..decoder import PAD_ID, CrossAttentionDecoder, eval_mode, teacher_forcing_loss
from .augment import SpecAugmentConfig, spec_augment
from .features import LogMel, LogMelConfig, frame_lengths
from .tower import AudioTower, AudioTowerConfig, AudioTowerOutput
from .waves import pad


@dataclass
class AudioModelConfig:
    """Defaults: m6's quick profile (2-3 s spoken world captions on one CPU thread)."""

    vocab_size: int = 64  # set from the tokenizer (the CLIP's, shared with the text tower)
    max_len: int = 24  # decoder positions: <bos> + words + <eos>
    # front end
    n_mels: int = 40
    # AST tower: full-band patches of patch_time frames (40 ms at a 10 ms hop)
    patch_freq: int = 40
    patch_time: int = 4
    max_frames: int = 512  # 5.12 s; longer input is cropped
    enc_dim: int = 128
    enc_depth: int = 4
    enc_heads: int = 4
    enc_mlp_ratio: float = 2.0
    # embedding head: the width of the CLIP space it joins
    embed_dim: int = 96
    pool: str = "cls"  # what the embedding head reads: "cls", or "mean" of the real patch tokens
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    # transcription decoder (m3's)
    dim: int = 96
    depth: int = 2
    n_heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    tie_head: bool = True

    def front_end(self) -> LogMelConfig:
        return LogMelConfig(n_mels=self.n_mels)

    def tower(self) -> AudioTowerConfig:
        return AudioTowerConfig(n_mels=self.n_mels, patch_freq=self.patch_freq, patch_time=self.patch_time,
                                max_frames=self.max_frames, dim=self.enc_dim, depth=self.enc_depth,
                                n_heads=self.enc_heads, mlp_ratio=self.enc_mlp_ratio, dropout=self.dropout)

    def to_dict(self) -> dict:
        return asdict(self)


class AudioModel(CrossAttentionDecoder):
    """Front end + AST tower, with an embedding head (the CLIP space) and a transcription decoder."""

    def __init__(self, cfg: AudioModelConfig = AudioModelConfig()):
        super().__init__()
        self.cfg = cfg
        self.front = LogMel(cfg.front_end())
        self.tower = AudioTower(cfg.tower())
        self.proj = nn.Linear(cfg.enc_dim, cfg.embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.enc_dim ** -0.5)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.build_decoder(cfg.vocab_size, cfg.max_len, cfg.dim, cfg.depth, cfg.n_heads, cfg.mlp_ratio,
                           memory_dim=cfg.enc_dim, dropout=cfg.dropout, tie_head=cfg.tie_head)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "tok_embed.weight", "tower.pos_embed", "tower.cls_token", "log_scale"}

    # ------------------------------------------------------------------ front end and tower
    @torch.no_grad()
    def features(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """waves (B, T) zero-padded, lengths (B,) samples -> log-mel (B, n_mels, 1 + T // hop)
        and frame counts (B,)."""
        return self.front(waves, lengths), frame_lengths(lengths, self.front.cfg.hop)

    def listen(self, feats: torch.Tensor, n_frames: torch.Tensor) -> AudioTowerOutput:
        """Log-mel (B, n_mels, F), frame counts (B,) -> the tower's CLS, tokens and padding mask."""
        return self.tower(feats, n_frames)

    def project(self, out: AudioTowerOutput) -> torch.Tensor:
        """The tower's output -> (B, E) unit vectors in the CLIP space: its CLS, or the mean of its
        real patch tokens (``cfg.pool``), through the linear head."""
        if self.cfg.pool == "mean":
            real = (~out.padding_mask).unsqueeze(-1).to(out.tokens.dtype)  # (B, N, 1)
            h = (out.tokens * real).sum(1) / real.sum(1).clamp(min=1.0)
        else:
            h = out.cls
        return F.normalize(self.proj(h), dim=-1)

    def scale(self) -> torch.Tensor:
        """The logit scale exp(t) = 1 / temperature, clamped at ``max_logit_scale``."""
        return self.log_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    # ------------------------------------------------------------------ from waveforms
    def encode_audio(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """waves (B, T), lengths (B,) -> (B, E) unit vectors (what retrieval compares)."""
        return self.project(self.listen(*self.features(waves, lengths)))

    def encode(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """waves (B, T), lengths (B,) -> the decoder's memory: patch tokens (B, N, Da) and their
        padding mask (B, N) (True = past the end of the utterance)."""
        out = self.listen(*self.features(waves, lengths))
        return out.tokens, out.padding_mask

    @eval_mode
    def greedy(self, waves: torch.Tensor, lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        """Transcribe greedily: waves (B, T), lengths (B,) -> ids (B, L) <bos> .. <eos>, padded."""
        return self.greedy_from(*self.encode(waves, lengths), max_len=max_len)

    @eval_mode
    def beam_search(self, waves: torch.Tensor, lengths: torch.Tensor, beam: int = 3, max_len: int | None = None,
                    alpha: float = 0.6) -> torch.Tensor:
        """Transcribe with beam search (GNMT length normalisation): -> ids (B, L)."""
        return self.beam_search_from(*self.encode(waves, lengths), beam=beam, max_len=max_len, alpha=alpha)

    @eval_mode
    def cross_attention(self, waves: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Where in time the decoder listened for each token: ids (B, L) as decoded -> (B, L - 1,
        time patches) attention mass (heads, blocks and frequency patches summed/averaged); row k
        belongs to ``ids[:, k + 1]``; time patch j covers frames ``j * patch_time ...``."""
        w = self.cross_attention_from(*self.encode(waves, lengths), ids)  # (B, L - 1, N)
        f = self.cfg.n_mels // self.cfg.patch_freq
        return w.reshape(*w.shape[:2], -1, f).sum(-1)


def build_model(config: dict) -> AudioModel:
    """An :class:`AudioModel` from its config dict (:class:`AudioModelConfig` fields)."""
    return AudioModel(AudioModelConfig(**config))


def load_audio_model(path) -> tuple[AudioModel, dict]:
    """An "audio" checkpoint file -> (model in eval mode, EMA weights when the run kept them; the
    checkpoint dict, whose ``extra["clip_checkpoint"]`` names the CLIP it was bound to, relative
    to the checkpoint's folder). Raises CheckpointError for another kind."""
    from ..checkpoint import load_checkpoint, load_into
    ck = load_checkpoint(path, expect_kind="audio")
    model = load_into(path, ck, build_model, required_extra=("tokenizer", "clip_checkpoint"))
    return model.eval(), ck


# ---------------------------------------------------------------------- training
ASR_WEIGHT = 1.0  # weight of the transcription cross-entropy against the binding loss


def audio_loss(model: AudioModel, batch: dict, asr_weight: float = ASR_WEIGHT) -> tuple[torch.Tensor, dict]:
    """The training loss of one :class:`SpokenPairs` batch -> (scalar, metrics).

    ``(clip_loss(a, image) + clip_loss(a, text)) / 2 + asr_weight * CE``: symmetric InfoNCE per
    pair against the frozen image and text embeddings (known duplicates masked out of the
    denominators when the batch has ``key``), and teacher-forced cross-entropy of the transcript."""
    out = model.listen(batch["feats"], batch["n_frames"])
    a = model.project(out)
    scale = model.scale()
    mask = duplicate_mask(batch["key"]) if "key" in batch else None
    l_img, m_img = clip_loss(a, batch["image_emb"], scale, mask)
    l_txt, m_txt = clip_loss(a, batch["text_emb"], scale, mask)
    l_asr = teacher_forcing_loss(model, out.tokens, batch["ids"], batch["pad_mask"], memory_pad=out.padding_mask)
    loss = (l_img + l_txt) / 2 + asr_weight * l_asr
    return loss, {"loss_audio_image": l_img.detach(), "loss_audio_text": l_txt.detach(), "loss_asr": l_asr.detach(),
                  "acc_a2i": m_img["acc_i2t"], "acc_a2t": m_txt["acc_i2t"], "logit_scale": scale.detach()}


class SpokenPairs:
    """Utterances with what they must match: features computed once by ``model``'s front end.

    Args:
        model: the :class:`AudioModel` whose front end makes the features (no gradient).
        waves: per utterance a (T_i,) float tensor in [-1, 1].
        image_emb, text_emb: (N, E) frozen targets: the CLIP embedding of the scene spoken about
            and of the transcript.
        ids: (N, L) transcript token ids <bos> .. <eos>, right-padded with <pad>.
        keys: optional (N,) long, equal for utterances that mean the same thing (masked as
            duplicates in the loss).
        augment: SpecAugment policy for training batches (None: none).
    """

    def __init__(self, model: AudioModel, waves: list[torch.Tensor], image_emb: torch.Tensor, text_emb: torch.Tensor,
                 ids: torch.Tensor, keys: torch.Tensor | None = None,
                 augment: SpecAugmentConfig | None = SpecAugmentConfig(), batch_size: int = 64):
        n = len(waves)
        if not (len(image_emb) == len(text_emb) == len(ids) == n):
            raise ValueError(f"{n} utterances but {len(image_emb)} image, {len(text_emb)} text targets, "
                             f"{len(ids)} transcripts")
        self.feats: list[torch.Tensor] = [None] * n  # per utterance (n_mels, F_i) float16
        order = sorted(range(n), key=lambda i: len(waves[i]))  # similar lengths pad little
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            w, lengths = pad([waves[i] for i in idx])
            f, nf = model.features(w, lengths)
            for j, i in enumerate(idx):
                self.feats[i] = f[j, :, : int(nf[j])].half()
        self.n_frames = torch.tensor([f.shape[1] for f in self.feats])
        self.image_emb, self.text_emb, self.ids, self.keys, self.augment = image_emb, text_emb, ids, keys, augment

    def __len__(self) -> int:
        return len(self.feats)

    def get_batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """idx (B,) -> {feats (B, n_mels, F) float (zero-padded, SpecAugment-masked when
        training), n_frames (B,), image_emb (B, E), text_emb (B, E), ids (B, L), pad_mask (B, L)
        [, key (B,)]}; F and L trimmed to the batch."""
        idx = idx.tolist() if torch.is_tensor(idx) else list(idx)
        n = self.n_frames[idx]
        feats = torch.zeros(len(idx), self.feats[idx[0]].shape[0], int(n.max()))
        for j, i in enumerate(idx):
            feats[j, :, : self.feats[i].shape[1]] = self.feats[i].float()
        if self.augment is not None:
            g = generator if generator is not None else torch.Generator().manual_seed(0)
            feats = spec_augment(feats, g, self.augment, n)
        ids = self.ids[idx]
        L = int((ids != PAD_ID).sum(1).max())
        batch = {"feats": feats, "n_frames": n, "image_emb": self.image_emb[idx], "text_emb": self.text_emb[idx],
                 "ids": ids[:, :L], "pad_mask": ids[:, :L] == PAD_ID}
        if self.keys is not None:
            batch["key"] = self.keys[idx]
        return batch
