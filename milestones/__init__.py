"""The milestones, in order. Each module defines ``MILESTONE`` (a :class:`milestones.base.Milestone`)."""

from __future__ import annotations

import importlib
from importlib.util import find_spec

MODULES = {
    "m1": "milestones.m1_vit",
    "m2": "milestones.m2_clip",
    "m3": "milestones.m3_caption",
    "m4": "milestones.m4_ddpm",
    "m5": "milestones.m5_text_to_image",
    "m6": "milestones.m6_audio",
    "m7": "milestones.m7_ssl",
}


def available() -> list[str]:
    """Milestone ids whose spec file is present, in order."""
    return [mid for mid, mod in MODULES.items() if find_spec(mod) is not None]


def load(mid: str):
    """The ``MILESTONE`` object of milestone ``mid``."""
    return importlib.import_module(MODULES[mid]).MILESTONE
