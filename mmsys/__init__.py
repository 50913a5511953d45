"""mmsys: a from-scratch multimodal deep-learning library on plain PyTorch.

Import what you need from its modules, e.g. ``from mmsys.vit import ViT``.
The library knows nothing about gates or thresholds; those live in ``milestones/``.
"""

__version__ = "0.1.0"
