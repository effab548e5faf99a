"""Options several commands share, defined once so that one thing has one flag name everywhere.

``--backbone NAME``, ``--backbone-path PATH`` (the config key ``backbone_path``) and ``--lora PATH`` mean the
same in ``train``, ``sample``, ``eval`` and ``plan``. Renamed flags stay accepted as hidden, deprecated
aliases that print a one-line notice (:func:`add_deprecated_alias`).
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


class _DeprecatedAlias(argparse.Action):
    """Stores into the new option's destination and says, once per use, which name to use instead."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: note: {option_string} is deprecated; use {self.new} (same meaning)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` as a hidden alias of ``new`` (same destination), with a one-line notice on stderr."""
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, help=argparse.SUPPRESS, **kwargs)


def add_model_options(
    parser: argparse.ArgumentParser,
    backbone_default: str | None = None,
    backbone_help: str = "backbone to load (digits, sd3, flux1, flux2-klein, …)",
    lora: bool = True,
) -> None:
    """``--backbone``, ``--backbone-path`` (alias ``--model``, deprecated) and, optionally, ``--lora``."""
    parser.add_argument("--backbone", default=backbone_default, metavar="NAME", help=backbone_help)
    parser.add_argument(
        "--backbone-path",
        metavar="PATH",
        help="the backbone's base weights: a diffusers pipeline folder or a cached hub id "
        "(default: the backbone's own; digits ships its weights)",
    )
    add_deprecated_alias(parser, "--model", "--backbone-path", dest="backbone_path")
    if lora:
        parser.add_argument("--lora", metavar="PATH", help="LoRA folder or file saved by `flowbp train` (RUN/lora)")


def add_render_options(parser: argparse.ArgumentParser) -> None:
    """``--resolution`` and ``--dtype`` of a real backbone."""
    parser.add_argument("--resolution", type=int, default=None, metavar="PX",
                        help="image side in pixels (default: the backbone's; digits is 16)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="weight dtype of a real backbone (default auto: float32 on CPU, bfloat16 on GPU)")


def resolve_device(name: str | None) -> str:
    """``auto``/None: CUDA when available, else the CPU; ``cuda`` without a GPU is a one-line error."""
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: 'cuda' requested but no CUDA device is available")
    return name


def load_backbone_for_cli(
    backbone: str,
    backbone_path: str | None,
    device: str,
    resolution: int | None = None,
    dtype: str | None = None,
    backbone_args: dict[str, Any] | None = None,
):
    """The backbone as training builds it (resolution, weight dtype); errors name the command's options."""
    from flowbp.backbones import available_backbones, backbone_from_config

    if backbone not in available_backbones():
        raise ValueError(f"--backbone: unknown backbone {backbone!r}; known: {', '.join(available_backbones())}")
    config = SimpleNamespace(
        backbone=backbone, backbone_path=backbone_path, backbone_args=dict(backbone_args or {}),
        resolution=resolution, dtype=dtype or "auto", finetune="lora", gradient_checkpointing=False,
        vae_gradient_checkpointing=False, offload="none",  # sampling loads the whole transformer on the device
    )
    try:
        return backbone_from_config(config, device)
    except ValueError as exc:
        message = str(exc)
        for key, option in (("backbone_path:", "--backbone-path:"), ("resolution:", "--resolution:")):
            if message.startswith(key):
                message = option + message[len(key):]
        raise ValueError(message) from None
