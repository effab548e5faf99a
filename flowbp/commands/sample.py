"""``flowbp sample``: a grid of samples from the base weights or a fine-tuned LoRA."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    import torch

    from flowbp.backbones import load_backbone
    from flowbp.evaluate import evaluate
    from flowbp.images import save_grid
    from flowbp.rewards import load_reward

    if args.samples < 1:
        raise ValueError(f"--samples: must be >= 1, got {args.samples}")
    if args.steps < 1:
        raise ValueError(f"--steps: must be >= 1, got {args.steps}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out: {out} exists (pass --overwrite to replace it)")
    kwargs = {"device": "cuda" if torch.cuda.is_available() else "cpu"}
    if args.backbone_path:
        kwargs["path"] = args.backbone_path
    backbone = load_backbone(args.backbone, **kwargs)
    if args.lora:
        load_lora_checked(backbone, args.lora)
    prompts = args.prompt or backbone.default_prompts()
    backbone.encode_prompts(prompts)  # clear error for prompts the backbone cannot encode
    reward = load_reward(args.reward) if args.reward else None
    result = evaluate(backbone, reward, prompts, args.samples, args.steps, args.guidance, args.seed)
    save_grid(result.images, out, rows=len(prompts))
    print(f"wrote {out} ({len(prompts)} prompts × {args.samples} samples)")
    if args.reward:
        print(f"mean {args.reward}: {float(result.rewards.mean()):.4f}")
    for key, value in result.metrics.items():
        print(f"{key}: {value:.4f}")
    return 0


def load_lora_checked(backbone, path: str) -> None:
    """Load a LoRA, turning a missing, empty or unreadable file into one ``--lora`` error line."""
    lora = Path(path)
    if not lora.exists():
        raise ValueError(f"--lora: not found: {path}")
    if lora.is_dir() and not any(lora.glob("*.safetensors")):
        raise ValueError(f"--lora: {path} holds no .safetensors weights (expected run_dir/lora from `flowbp train`)")
    try:
        backbone.load_lora(lora)
    except Exception as exc:  # safetensors, peft and diffusers each raise their own types for a bad file
        message = " ".join(str(exc).split())
        raise ValueError(f"--lora: cannot load {path} as a LoRA for {backbone.name}: {message}") from exc


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="sample a grid from base or fine-tuned weights",
        description="Draw a grid of samples (one row per prompt) from a backbone's base weights or a LoRA "
        "saved by `flowbp train`, and print the held-out metrics (and a reward's mean with --reward).",
    )
    p.add_argument("--backbone", default="digits", help="backbone name (default: digits; see `flowbp train --help`)")
    p.add_argument("--backbone-path", help="base weights directory (default: the backbone's own)")
    p.add_argument("--lora", help="LoRA directory or file saved by `flowbp train` (run_dir/lora)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; default: the backbone's prompt set)")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (one grid row per prompt)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the backbone's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--reward", help="also score the samples with this reward spec")
    p.add_argument("--out", default="samples.png", help="PNG file to write (default: samples.png)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)
