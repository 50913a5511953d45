"""Text-conditioned diffusion with classifier-free guidance (the m5 model).

Data flow::

    prompt -> Tokenizer -> ids (B, L), pad_mask (B, L)
           -> frozen CLIP text tower (m2) -> token features (B, L, Dt)   [the conditioning sequence]
    x_t (B, 3, H, W) -> space-to-depth (patch p) -> U-Net eps_theta(., t, tokens, pad_mask)
           -> depth-to-space -> eps (B, 3, H, W)

- Text encoder (:mod:`mmsys.text_conditioning`): the text tower of a CLIP trained in m2, frozen
  (no gradient, always eval mode).
  Its final-LayerNorm'd hidden states of *every* token are the cross-attention context; the
  pooled CLIP text embedding is the hidden state at <eos>, which is one of those tokens, so the
  U-Net sees it too. Padding tokens are masked out of every cross-attention softmax.
- Cross-attention lives in the U-Net blocks at the lower resolutions
  (:class:`mmsys.diffusion.unet.AttentionBlock`, Rombach et al. 2022, eq. 3): image positions are
  the queries, text tokens the keys/values.
- Global conditioning (``pooled``): the <eos> token's feature (the pooled CLIP text embedding,
  before CLIP's projection) and the mean of the caption's token features go through a small MLP
  whose output is added to the U-Net's timestep embedding, so every residual block's AdaGN sees
  the whole caption (as GLIDE and Imagen add a pooled text embedding to the timestep embedding).
  The mean matters: a briefly trained CLIP's pooled embedding knows colours well but shapes and
  positions poorly, while every word's token feature is distinct. Last layer zero-initialised.
- Position channels (``coord_channels``): two constant channels holding the x and y coordinate
  in [-1, 1] are appended to the U-Net input (CoordConv, Liu et al. 2018). Convolutions and the
  U-Net's attention carry no absolute position otherwise, and the prompts say where the object
  is ("on the left", "at the top right").
- Layout channels (``layout_channels``): a linear map of the same pooled caption features gives
  ``k`` maps at the U-Net's input resolution, appended to its input: a caption-dependent spatial
  prior ("on the left" -> mass in the left columns), learned by the diffusion loss like every
  other weight. Without it a briefly trained U-Net learned colour but not position (measured:
  position match at chance after 1,000 steps); zero-initialised.
- Space-to-depth (``patch``): the U-Net runs on ``(B, 3 p^2, H/p, W/p)`` (``F.pixel_unshuffle``)
  and its output is folded back with ``F.pixel_shuffle``: 4x less convolution work at p = 2 for
  the same receptive field (as in Hoogeboom et al. 2023, "simple diffusion"). ``patch = 1`` is
  the plain pixel-space U-Net.
- Training (Ho & Salimans 2022, alg. 1): with probability ``p_uncond`` a caption is replaced by
  the empty prompt ``""`` (tokens ``<bos> <eos>``), so one network learns the conditional and the
  unconditional noise prediction.
- Prediction target (``prediction``): "v" (default; Salimans & Ho 2022): with
  ``x_t = a x_0 + s eps`` (``a = sqrt(alpha_bar_t)``, ``s = sqrt(1 - alpha_bar_t)``) the U-Net
  predicts ``v = a eps - s x_0`` and :meth:`TextToImage.forward` returns
  ``eps = a v + s x_t``, so samplers and guidance work on eps unchanged. Loss
  ``w_t || v - v_theta ||^2`` with the Min-SNR-gamma weight ``w_t = min(SNR_t, gamma) / SNR_t``
  (Hang et al. 2023). Why not eps: ``|| eps - eps_theta ||^2 = SNR_t || x_0 - x0_theta ||^2``,
  so at high noise (SNR -> 0), the only steps where the prompt can decide *where* the object
  goes, an eps model is hardly trained to predict x_0 at all; v's weight there is
  ``SNR_t + 1 ~ 1`` (measured: an eps model trained 3,000 steps put objects wherever the
  starting noise put them, position match at chance). "eps": ``w_t || eps - eps_theta ||^2``
  (DDPM eq. 14, Min-SNR weighted).
- Sampling with classifier-free guidance (Ho & Salimans 2022, eq. 6, eps form)::

      eps = eps_uncond + s * (eps_cond - eps_uncond)

  Convention: ``s = 1`` is the plain conditional model (one forward pass, no unconditional
  branch), ``s = 0`` the unconditional model, ``s > 1`` over-emphasises the prompt. A negative
  prompt replaces the unconditional branch: ``eps = eps_neg + s (eps_cond - eps_neg)``. Works
  with the DDPM (all T steps) and DDIM samplers of :mod:`mmsys.diffusion.samplers`.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion.samplers import guided_eps, guided_model_fn, make_sampler, sample
from .diffusion.schedule import NoiseSchedule
from .data.split import to_uint8
from .diffusion.unet import UNet, UNetConfig
from .text_conditioning import EMPTY_PROMPT, TextConditioner, pooled_features


@dataclass(frozen=True)
class SamplingConfig:
    """How images are sampled from a text-to-image model: the one place of these defaults (the
    quick recipe's gate protocol; :meth:`TextToImage.sample_images`, the m5 recipe and
    ``python -m apps.generate`` all take them from here).

    Attributes:
        guidance: ``s`` in ``eps_u + s (eps_c - eps_u)`` (1 = plain conditional). Measured on the
            3,000-step quick generator, 400 test prompts (DDIM 25, eta 1): prompt match 0.877 /
            0.933 / 0.933 / 0.918 / 0.890 at s = 1 / 1.5 / 2 / 3 / 5.
        sampler: "ddim" (``steps`` steps) or "ddpm" (all T steps; ``steps`` ignored).
        steps: DDIM steps.
        eta: DDIM stochasticity (0 deterministic; 1 = DDPM-like noise on the step subsequence:
            cleaner backgrounds than eta = 0 for a briefly trained model, measured).
    """

    guidance: float = 2.0
    sampler: str = "ddim"
    steps: int = 25
    eta: float = 1.0


SAMPLING = SamplingConfig()
CHECKPOINT_KIND = "t2i"  # the ``kind`` of text-to-image checkpoint files (kept: files already written carry it)


@dataclass
class TextToImageConfig:
    """Text-to-image model. Defaults = the quick profile (32x32 embedded world).

    Attributes:
        unet: :class:`UNetConfig` fields, without ``in_ch``/``context_dim``/``image_size``
            (derived from ``patch``, the text tower width and ``image_size``).
        clip: the conditioning CLIP's ``CLIPConfig`` dict (only its text tower is built).
        image_size: generated image side (pixels); must be divisible by ``patch``.
        patch: space-to-depth factor in front of the U-Net (1 = none).
        schedule: "linear" (DDPM) or "cosine" (improved DDPM); ``T`` diffusion steps.
        p_uncond: probability of replacing a training caption by the empty prompt.
        min_snr_gamma: Min-SNR loss weighting (None = the plain MSE, e.g. DDPM eq. 14 for eps).
        prediction: "v" (the U-Net predicts v = a eps - s x_0) or "eps" (it predicts eps).
        pooled: add the projected <eos> token feature to the timestep embedding.
        coord_channels: append x/y coordinate channels to the U-Net input.
        layout_channels: caption-dependent spatial maps appended to the U-Net input (0 = none).
        word_features: append each token's standardised *input* embedding of the frozen text
            tower (its word identity, before any contextual mixing) to its contextual feature
            (context width 2 D instead of D; see :class:`TextConditioner`).
        math_attention: run attention with PyTorch's "math" SDPA kernel (on CPU its backward is
            about 2x faster than the fused kernel at these sizes; same result up to round-off).
    """

    unet: dict = field(default_factory=lambda: dict(base=64, channel_mults=(1, 2), n_res=1,
                                                    attn_resolutions=(8,), dropout=0.0, groups=8, n_heads=4))
    clip: dict = field(default_factory=dict)
    image_size: int = 32
    patch: int = 2
    schedule: str = "cosine"
    T: int = 1000
    p_uncond: float = 0.1
    min_snr_gamma: float | None = 5.0
    prediction: str = "v"
    pooled: bool = True
    coord_channels: bool = True
    layout_channels: int = 4
    word_features: bool = False
    math_attention: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unet"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["unet"].items()}
        return d


def attention_kernel(math_attention: bool):
    """Context selecting SDPA's math kernel (or nothing)."""
    if not math_attention:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def coord_grid(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(1, 2, h, w) x and y pixel-centre coordinates in [-1, 1] (x grows rightwards, y downwards)."""
    ys = (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) / w * 2 - 1
    return torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)])[None]


# ----------------------------------------------------------------------------- the model

class TextToImage(nn.Module):
    """Frozen text encoder + U-Net noise predictor + noise schedule.

    Args:
        cfg: :class:`TextToImageConfig` (``cfg.clip`` describes the text tower).
        text: a :class:`TextConditioner` (frozen CLIP text tower and its tokenizer).
    """

    def __init__(self, cfg: TextToImageConfig, text: TextConditioner):
        super().__init__()
        if cfg.prediction not in ("v", "eps"):
            raise ValueError(f"prediction must be 'v' or 'eps', got {cfg.prediction!r}")
        if cfg.image_size % cfg.patch:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by patch {cfg.patch}")
        self.cfg = cfg
        self.text = text
        self.out_ch = 3 * cfg.patch ** 2
        side = cfg.image_size // cfg.patch
        extra_ch = (2 if cfg.coord_channels else 0) + cfg.layout_channels
        ucfg = UNetConfig(**{**cfg.unet, "in_ch": self.out_ch + extra_ch,
                             "context_dim": text.context_dim, "image_size": side})
        ucfg.channel_mults, ucfg.attn_resolutions = tuple(ucfg.channel_mults), tuple(ucfg.attn_resolutions)
        self.unet = UNet(ucfg)
        self.pooled_proj = None
        if cfg.pooled:  # added to the U-Net's time embedding by a hook on its time MLP
            tdim = ucfg.time_dim or 4 * ucfg.base
            self.pooled_proj = nn.Sequential(nn.Linear(2 * text.context_dim, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
            nn.init.zeros_(self.pooled_proj[2].weight)
            nn.init.zeros_(self.pooled_proj[2].bias)
            self.unet.time_mlp.register_forward_hook(self._add_pooled)
        self.layout = None
        if cfg.layout_channels:  # pooled caption features (B, 2D) -> k maps (B, k, side, side)
            self.layout = nn.Linear(2 * text.context_dim, cfg.layout_channels * side * side)
            nn.init.zeros_(self.layout.weight)
            nn.init.zeros_(self.layout.bias)
        self._pooled = None
        with torch.device("cpu"):  # a plain CPU table, also when the model is sized up on the meta device
            self.schedule = NoiseSchedule.make(cfg.schedule, cfg.T)
        self.register_buffer("empty_ids", torch.tensor(text.tokenizer.encode(EMPTY_PROMPT)), persistent=False)

    def n_params(self) -> int:
        """Trainable parameters (U-Net, pooled projection, layout map; the text tower is frozen)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _add_pooled(self, module, inputs, output):
        """Forward hook on ``unet.time_mlp``: time embedding (B, E) + W pooled (B, D)."""
        if self._pooled is None:
            return output
        return output + self.pooled_proj(self._pooled).to(output.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta: x_t (B, 3, H, W), t (B,), context (B, L, D), mask (B, L) -> (B, 3, H, W).
        A v-model's output is turned into eps: ``eps = a v + s x_t``."""
        out = self.network_output(x, t, context, context_padding_mask)
        if self.cfg.prediction == "eps":
            return out
        a, s = self._a_s(t, x)
        return a * out.float() + s * x.float()

    def _a_s(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, s) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), each (B, 1, 1, 1) float32."""
        ab = self.schedule.alpha_bars.to(x.device)[t.long()].float().view(-1, 1, 1, 1)
        return ab.sqrt(), (1.0 - ab).sqrt()

    def network_output(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                       context_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """What the U-Net predicts (v or eps, see ``cfg.prediction``): (B, 3, H, W)."""
        p, B = self.cfg.patch, x.shape[0]
        h = F.pixel_unshuffle(x, p) if p > 1 else x
        if self.cfg.coord_channels:
            h = torch.cat([h, coord_grid(h.shape[-2], h.shape[-1], h).expand(B, -1, -1, -1)], dim=1)
        pooled = pooled_features(context, context_padding_mask)  # (B, 2D)
        if self.layout is not None:
            maps = self.layout(pooled).view(B, self.cfg.layout_channels, h.shape[-2], h.shape[-1])
            h = torch.cat([h, maps.to(h.dtype)], dim=1)
        if self.pooled_proj is not None:
            self._pooled = pooled
        try:
            with attention_kernel(self.cfg.math_attention):
                h = self.unet(h, t, context, context_padding_mask)[:, :self.out_ch]
        finally:
            self._pooled = None
        return F.pixel_shuffle(h, p) if p > 1 else h

    # -- training

    def loss(self, x0: torch.Tensor, ids: torch.Tensor, pad_mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Denoising loss on clean images x0 (B, 3, H, W) in [-1, 1] with captions ids/pad_mask
        (B, L) (conditioning dropout already applied). Uses the global torch RNG for t and eps
        (the engine reseeds it every step). Returns (scalar loss, metrics)."""
        B = x0.shape[0]
        context = self.text.encode_ids(ids, pad_mask)
        t = torch.randint(0, self.schedule.T, (B,), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.schedule.q_sample(x0, t, noise)
        if self.cfg.prediction == "v":
            a, s = self._a_s(t, x0)
            target = a * noise.float() - s * x0.float()  # v = a eps - s x_0
        else:
            target = noise.float()
        out = self.network_output(x_t, t, context, pad_mask).float()
        err = (out - target).square().mean(dim=(1, 2, 3))
        w = snr_weight(self.schedule.snr(t).float(), self.cfg.min_snr_gamma)
        return (w * err).mean(), {"mse": err.mean().detach()}

    # -- sampling

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (context (B, L, D), pad_mask (B, L))."""
        return self.text(prompts)

    @torch.no_grad()
    def sample_images(self, prompts: Sequence[str], negative: str | Sequence[str] | None = None,
                      guidance: float = SAMPLING.guidance, sampler: str = SAMPLING.sampler,
                      steps: int = SAMPLING.steps, n: int = 1,
                      generator: torch.Generator | Sequence[torch.Generator] | None = None, seed: int | None = None,
                      eta: float = SAMPLING.eta, batch_size: int = 128, bf16: bool = True, clip_x0: bool = True,
                      progress: bool = False, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Sample images for prompts with classifier-free guidance (defaults: :data:`SAMPLING`).

        Args:
            prompts: P strings; each is sampled ``n`` times (output order: prompt-major).
            negative: None (the unconditional branch is the empty prompt), one string for all,
                or one per prompt: replaces the unconditional branch.
            guidance: ``s`` in ``eps_u + s (eps_c - eps_u)``; 1 = plain conditional.
            sampler: "ddim" (``steps`` steps, ``eta``) or "ddpm" (all T steps; ``steps`` ignored).
            generator: one generator or one per output image; ``seed`` instead gives image ``i``
                its own stream seeded ``(seed, i)``, so an image depends only on its seed and prompt,
                not on the batch it is drawn in.
            batch_size: images per sampling batch (each guided forward pass holds 2x that).
            bf16: run the U-Net under bf16 autocast (sampler arithmetic stays float32).
            clip_x0: clip each step's predicted x_0 to [-1, 1] (static thresholding, as in GLIDE /
                Imagen; keeps guided samples from saturating).
            on_step: called as ``on_step(done, total)`` after every reverse step of every batch
                (a progress indicator; ``total`` = batches x steps).
        Returns:
            uint8 (P * n, 3, H, W).
        """
        prompts = [p for p in prompts for _ in range(n)]
        N = len(prompts)
        if isinstance(negative, str) or negative is None:
            negs = [EMPTY_PROMPT if negative is None else negative] * N
        else:
            negs = [q for q in negative for _ in range(n)]
            if len(negs) != N:
                raise ValueError(f"{len(negative)} negative prompts for {len(prompts) // n} prompts")
        if generator is None:
            gens = [torch.Generator().manual_seed((0 if seed is None else seed) * 1_000_003 + i) for i in range(N)]
        elif isinstance(generator, torch.Generator):
            gens = None
        else:
            gens = list(generator)
            if len(gens) != N:
                raise ValueError(f"{len(gens)} generators for {N} images")
        was = self.training
        self.eval()
        dev = next(self.unet.parameters()).device
        out, n_steps = [], steps if sampler == "ddim" else self.schedule.T
        total, done = -(-N // batch_size) * n_steps, [0]

        def step_done(*_):
            done[0] += 1
            on_step(done[0], total)
        for a in range(0, N, batch_size):
            b = min(N, a + batch_size)
            g = generator if gens is None else gens[a:b]
            out.append(self._sample(prompts[a:b], negs[a:b], guidance, sampler, steps, g, eta, bf16, progress, dev,
                                    clip_x0, step_done if on_step else None))
        self.train(was)
        x = torch.cat(out)
        return to_uint8(x).cpu()

    def _sample(self, prompts, negs, guidance, sampler, steps, generator, eta, bf16, progress, dev, clip_x0,
                on_step=None):
        """One batch through the one reverse loop (:func:`mmsys.diffusion.samplers.sample`) with
        the (guided) eps function; returns float x_0 (B, 3, H, W)."""
        B, S = len(prompts), self.cfg.image_size
        cond, cmask = self.encode(prompts)
        if guidance != 1.0:
            unc, umask = self.encode(negs)
            eps_fn = guided_model_fn(self, cond, unc, guidance, cmask, umask)
        else:
            def eps_fn(x, t):
                return self(x, t, cond, cmask)
        smp = make_sampler(self.schedule, sampler, steps if sampler == "ddim" else None, eta, clip_x0)
        return sample(eps_fn, smp, (B, 3, S, S), generator, device=dev, bf16=bf16, progress=progress, on_step=on_step)


def snr_weight(snr: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Min-SNR-gamma weight of the eps-MSE (Hang et al. 2023, eq. 9 for eps prediction):
    ``min(SNR, gamma) / SNR``; all ones when ``gamma`` is None. snr: (B,) -> (B,)."""
    if gamma is None:
        return torch.ones_like(snr)
    return snr.clamp(max=gamma) / snr


# ----------------------------------------------------------------------------- guidance from prompts

@torch.no_grad()
def guided_noise(model: TextToImage, x: torch.Tensor, t: torch.Tensor, prompts: Sequence[str], guidance: float,
                 negative: str | Sequence[str] | None = None) -> torch.Tensor:
    """The noise prediction sampling uses, from prompts: x_t (B, 3, H, W), t (B,), B prompts ->
    eps (B, 3, H, W) float32. Classifier-free guidance (Ho & Salimans 2022, eq. 6):
    ``eps_u + s (eps_c - eps_u)``, with the unconditional branch the empty prompt, or the negative
    prompt(s) (one string for all, or B) in its place; ``s = 1`` is one conditional pass."""
    cond, cmask = model.encode(prompts)
    if guidance == 1.0:
        return model(x, t, cond, cmask).float()
    negs = [EMPTY_PROMPT if negative is None else negative] * len(prompts) if negative is None or \
        isinstance(negative, str) else list(negative)
    unc, umask = model.encode(negs)
    return guided_eps(model, x, t, cond, unc, guidance, cmask, umask)


# ----------------------------------------------------------------------------- build / save / load

def build_text2image(cfg: TextToImageConfig, text_tower: nn.Module, tokenizer) -> TextToImage:
    """A fresh model around a (trained) CLIP text tower."""
    return TextToImage(cfg, TextConditioner(text_tower, tokenizer, cfg.clip.get("context_length", 32),
                                            word_features=cfg.word_features))


def from_clip(cfg: TextToImageConfig, clip: nn.Module, tokenizer) -> TextToImage:
    """A fresh model conditioned on the text tower of an m2 CLIP (a deep copy, frozen)."""
    import copy
    cfg = TextToImageConfig(**{**asdict(cfg), "clip": clip.cfg.to_dict()})
    return build_text2image(cfg, copy.deepcopy(clip.text_tower), tokenizer)


def from_checkpoint(model_config: dict, tokenizer_state: dict, weights: dict) -> TextToImage:
    """The model (eval mode) a checkpoint holds, from its parts: ``model_config``
    (:class:`TextToImageConfig` fields), ``extra["tokenizer"]`` and the weights (EMA when kept).
    Raises CheckpointError when they do not describe a model this code can build."""
    from .checkpoint import CheckpointError
    from .clip import CLIPConfig, TextTower
    from .text import Tokenizer
    try:
        cfg = TextToImageConfig(**model_config)
        model = build_text2image(cfg, TextTower(CLIPConfig(**cfg.clip)), Tokenizer.from_state_dict(tokenizer_state))
        model.load_state_dict(weights)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint does not hold a text-to-image model this code can "
                              f"build: {type(e).__name__}: {str(e)[:300]}") from e
    return model.eval()


def checkpoint_sampling(checkpoint: dict, **overrides) -> dict:
    """:class:`SamplingConfig` fields to sample a checkpoint with: what its recipe recorded
    (``extra["sampling"]``), :data:`SAMPLING` for what it does not say, and ``overrides`` that
    are not None on top (a command line's options)."""
    saved = (checkpoint.get("extra") or {}).get("sampling") or {}
    names = [f.name for f in fields(SamplingConfig)]
    return {**asdict(SAMPLING), **{k: v for k, v in saved.items() if k in names},
            **{k: v for k, v in overrides.items() if v is not None}}


def load_text2image(path, device: str = "cpu") -> tuple[TextToImage, dict]:
    """(model in eval mode (EMA weights when present), checkpoint dict) from a text-to-image
    checkpoint (kind :data:`CHECKPOINT_KIND`)."""
    from .checkpoint import eval_weights, load_checkpoint, load_into
    ck = load_checkpoint(path, expect_kind=CHECKPOINT_KIND)
    model = load_into(path, ck, lambda mc: from_checkpoint(mc, ck["extra"]["tokenizer"], eval_weights(ck)),
                      required_extra=("tokenizer",))
    return model.to(device).eval(), ck
