"""Backbone registry: ``load_backbone(name, **kwargs)``.

Each entry is a factory ``(**kwargs) -> Backbone``; model-family modules are imported lazily so
that, e.g., the digits testbed never imports what a FLUX adapter needs.
"""

from __future__ import annotations

import importlib
from typing import Any

from flowbp.backbones.base import Backbone, VelocityFn

#: name -> "module:attribute" of a factory taking keyword arguments (``from_pretrained`` style).
BACKBONES: dict[str, str] = {
    "digits": "flowbp.backbones.digits:DigitsBackbone.from_pretrained",
}


def available_backbones() -> list[str]:
    return sorted(BACKBONES)


def load_backbone(name: str, **kwargs: Any) -> Backbone:
    """Build a registered backbone, e.g. ``load_backbone("digits", device="cpu")``."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(available_backbones())}")
    module_name, _, attr = BACKBONES[name].partition(":")
    factory: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        factory = getattr(factory, part)
    return factory(**kwargs)


__all__ = ["BACKBONES", "Backbone", "VelocityFn", "available_backbones", "load_backbone"]
