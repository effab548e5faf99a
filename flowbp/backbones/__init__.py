"""Backbone registry: ``load_backbone(name, **kwargs)``.

Each entry is a factory ``(**kwargs) -> Backbone``; model-family modules are imported lazily so
that, e.g., the digits testbed never imports what a FLUX adapter needs.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from flowbp.backbones.base import Backbone, VelocityFn

#: name -> "module:attribute" of a factory taking keyword arguments (``from_pretrained`` style).
BACKBONES: dict[str, str] = {
    "digits": "flowbp.backbones.digits:DigitsBackbone.from_pretrained",
    "sd3": "flowbp.backbones.sd3:SD3Backbone.from_pretrained",
    "flux1": "flowbp.backbones.flux1:Flux1Backbone.from_pretrained",
    "flux2-klein": "flowbp.backbones.flux2_klein:Flux2KleinBackbone.from_pretrained",
    "flux2": "flowbp.backbones.flux2:Flux2Backbone.from_pretrained",
    "qwen-image": "flowbp.backbones.qwen_image:QwenImageBackbone.from_pretrained",
    "z-image": "flowbp.backbones.z_image:ZImageBackbone.from_pretrained",
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


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto``: float32 on the CPU (exact, and CPU bf16 is slow), bfloat16 on an accelerator."""
    if name == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    return _DTYPES[name]


def backbone_from_config(config: Any, device: torch.device | str) -> Backbone:
    """Build the configured backbone (a :class:`~flowbp.config.TrainConfig`); errors name the config key.

    Real (diffusers) backbones get the resolution, the weight dtype (full fine-tuning keeps the
    transformer in float32 master weights; autocast is accelerate's ``mixed_precision``), gradient
    checkpointing and ``backbone_args``; the digits testbed is 16×16 and float32.
    """
    kwargs: dict[str, Any] = {"device": device, **config.backbone_args}
    if config.backbone_path is not None:
        kwargs["path"] = config.backbone_path
    if config.backbone == "digits":
        if config.resolution not in (None, 16):
            raise ValueError(f"resolution: the digits backbone is 16×16, got {config.resolution}")
    else:
        kwargs.update(
            resolution=config.resolution,
            dtype=resolve_dtype(config.dtype, device),
            transformer_dtype=torch.float32 if config.finetune == "full" else None,
            gradient_checkpointing=config.gradient_checkpointing,
            vae_gradient_checkpointing=config.vae_gradient_checkpointing,
        )
        if config.finetune == "lora" and config.offload in ("base", "all"):
            kwargs["transformer_device"] = "cpu"  # streamed: its linear weights never go to the device
    try:
        return load_backbone(config.backbone, **kwargs)
    except FileNotFoundError as exc:
        raise ValueError(f"backbone_path: {exc}") from exc
    except TypeError as exc:  # an unknown key in backbone_args
        raise ValueError(f"backbone_args: {exc}") from exc


__all__ = [
    "BACKBONES",
    "Backbone",
    "VelocityFn",
    "available_backbones",
    "backbone_from_config",
    "load_backbone",
    "resolve_dtype",
]
