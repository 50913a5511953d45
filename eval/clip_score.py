"""CLIP score of (image, caption) pairs through torchmetrics' ``CLIPScore``, using a CLIP trained
here (no hub download, no ``transformers``).

torchmetrics accepts ``model_name_or_path=fn`` with ``fn() -> (model, processor)``; the model
needs ``get_image_features(pixel_values)``, ``get_text_features(input_ids, attention_mask)`` and
``config.text_config.max_position_embeddings``; the processor is called with a list of
``(C, H, W)`` image tensors or a list of strings. :class:`TorchmetricsCLIPAdapter` provides these
on top of the mmsys CLIP interface:

- ``model.encode_image(images float (B, 3, H, W) in [-1, 1]) -> (B, D)`` (L2-normalised),
- ``model.encode_text(ids (B, L) long, pad_mask (B, L) bool, True = pad) -> (B, D)``,
- ``model.context_length: int``,
- ``tokenizer.batch_encode(texts, max_len) -> (ids (B, L) long, pad_mask (B, L) bool)``.

Images reach the processor exactly as given to ``update``: uint8 ``(C, H, W)`` in [0, 255]
(what :func:`clip_score` passes) are mapped to [-1, 1]; float images are taken as already in
[-1, 1]. Captions are tokenised to at most ``model.context_length`` tokens by our tokenizer, so
torchmetrics' own truncation never fires.

The torchmetrics score is ``max(100 * mean_i cos(img_i, txt_i), 0)``: the clamp applies to the
mean, not per pair. :func:`clip_score` returns that and the unclamped mean cosine.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from eval.reference.data.split import to_float


class CLIPProcessorAdapter:
    """The processor half: images -> ``pixel_values``, texts -> ``input_ids``/``attention_mask``.

    Args:
        tokenizer: has ``batch_encode(texts, max_len) -> (ids, pad_mask)``.
        context_length: ``max_len`` passed to the tokenizer.
        image_size: if set, images of another size are resized (bilinear, antialiased) to it.
    """

    def __init__(self, tokenizer, context_length: int, image_size: int | None = None):
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self.image_size = image_size

    def images_to_pixels(self, images) -> torch.Tensor:
        """List of ``(3, H, W)`` (or a ``(B, 3, H, W)`` tensor), uint8 or [-1,1] float ->
        float ``(B, 3, H', W')`` in [-1, 1]."""
        x = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (3, H, W) each, got batch {tuple(x.shape)}")
        x = to_float(x) if x.dtype == torch.uint8 else x.float()
        if self.image_size is not None and x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return x

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding=True, **_):
        if (images is None) == (text is None):
            raise ValueError("pass exactly one of images= or text=")
        if images is not None:
            return {"pixel_values": self.images_to_pixels(images)}
        texts = [text] if isinstance(text, str) else list(text)
        ids, pad_mask = self.tokenizer.batch_encode(texts, max_len=self.context_length)
        return {"input_ids": ids, "attention_mask": (~pad_mask.bool()).long()}


class TorchmetricsCLIPAdapter(nn.Module):
    """The model half: an mmsys CLIP seen through the Hugging Face-style interface torchmetrics
    calls. ``attention_mask`` is HF's convention (1 = token, 0 = pad), turned back into our
    ``pad_mask`` (True = pad).

    Args:
        model: mmsys CLIP (``encode_image``, ``encode_text``, ``context_length``).
        tokenizer: its tokenizer (``batch_encode``).
        image_size: optional resize target for the processor.
    Attributes:
        processor: the matching :class:`CLIPProcessorAdapter`.
    """

    def __init__(self, model: nn.Module, tokenizer, image_size: int | None = None):
        super().__init__()
        self.model = model
        length = int(model.context_length)
        self.config = SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=length))
        self.processor = CLIPProcessorAdapter(tokenizer, length, image_size)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> ``(B, D)``."""
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` ids and HF attention mask (1 = token) -> ``(B, D)``."""
        return self.model.encode_text(input_ids, attention_mask == 0)

    def as_torchmetrics_factory(self):
        """The ``model_name_or_path`` callable torchmetrics expects."""
        return lambda: (self, self.processor)


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def clip_score(model: nn.Module, tokenizer, images: torch.Tensor, captions: list[str],
               batch_size: int = 256, image_size: int | None = None) -> dict:
    """CLIP score of aligned (image, caption) pairs with torchmetrics' ``CLIPScore``.

    The model runs in eval mode without gradients on its own device (its mode is restored).

    Args:
        model: mmsys CLIP (see module docstring).
        tokenizer: its tokenizer.
        images: uint8 ``(N, 3, H, W)``.
        captions: ``N`` strings, caption ``i`` belongs to image ``i``.
        batch_size: pairs per forward pass.
        image_size: resize images to this side first (None: as given).
    Returns:
        ``{"clip_score_100": max(100 * mean cosine, 0), "mean_cosine": unclamped mean cosine in
        [-1, 1], "n": N}``. A threshold "CLIP score > 0.25" as a cosine is 25 on the first scale.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    captions = list(captions)
    if len(captions) != len(images) or not captions:
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    adapter = TorchmetricsCLIPAdapter(model, tokenizer, image_size)
    device, was_training = _device_of(model), model.training
    metric = CLIPScore(model_name_or_path=adapter.as_torchmetrics_factory()).to(device)
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                metric.update(images[i:i + batch_size].to(device), captions[i:i + batch_size])
            score = float(metric.compute().item())
    finally:
        model.train(was_training)
    n = int(metric.n_samples.item())
    return {"clip_score_100": score, "mean_cosine": float(metric.score.item()) / n / 100.0, "n": n}
