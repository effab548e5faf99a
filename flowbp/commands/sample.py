"""``flowbp sample``: images from any backbone's base weights, a LoRA, full fine-tuned weights or a run.

    flowbp sample --backbone sd3 --backbone-path PIPELINE --prompts P.txt --resolution 512 --out DIR
    flowbp sample --run runs/my-run --out DIR            # the run's backbone, settings and trained weights

Writes ``DIR/images/p<prompt index>_s<seed>.png`` (as ``flowbp eval`` lays out a run: ``flowbp eval --images
DIR/images --prompts DIR/prompts.txt`` scores them), ``DIR/grid.png``
(one labelled row per prompt, one column per seed), ``DIR/prompts.txt`` and ``DIR/sample.json`` (the
settings). Image k of prompt i uses seed ``SEED + k`` with its own noise, exactly as ``flowbp eval`` does, so
the same settings give the same pixels in both commands. The folder appears complete or not at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

#: Prompts sampled when none are given: the first ones of the backbone's (or the run's evaluation) set.
DEFAULT_NUM_PROMPTS = 10


def load_lora_checked(backbone: Any, path: str | Path, option: str = "--lora") -> None:
    """Load a LoRA, turning a missing, empty or unreadable file into one ``--lora`` error line."""
    lora = Path(path)
    if not lora.exists():
        raise ValueError(f"{option}: not found: {path}")
    if lora.is_dir() and not any(lora.glob("*.safetensors")):
        raise ValueError(f"{option}: {path} holds no .safetensors weights (expected run_dir/lora from `flowbp train`)")
    try:
        backbone.load_lora(lora)
    except Exception as exc:  # safetensors, peft and diffusers each raise their own types for a bad file
        message = " ".join(str(exc).split())
        raise ValueError(f"{option}: cannot load {path} as a LoRA for {backbone.name}: {message}") from exc


def load_full_weights(backbone: Any, path: str | Path, option: str = "--transformer") -> None:
    """Replace the transformer's weights by fully fine-tuned ones: ``RUN/transformer/`` (a diffusers
    ``save_pretrained`` folder, possibly sharded) or ``RUN/transformer.safetensors`` (a state dict)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    source = Path(path)
    files = sorted(source.glob("*.safetensors")) if source.is_dir() else [source]
    if not source.exists():
        raise ValueError(f"{option}: not found: {path}")
    if not files:
        raise ValueError(f"{option}: {path} holds no .safetensors weights (expected RUN/transformer)")
    state: dict[str, torch.Tensor] = {}
    try:
        for file in files:
            state.update(load_file(str(file)))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{option}: cannot read {path}: {' '.join(str(exc).split())}") from None
    model = backbone.transformer
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise ValueError(
            f"{option}: {path} does not fit the {backbone.name} transformer ({len(missing)} weights missing, "
            f"{len(unexpected)} unexpected, e.g. {example!r}); was it trained from another base?"
        )
    with torch.no_grad():
        for name, tensor in own.items():
            if tensor.shape != state[name].shape:
                shape, want = tuple(state[name].shape), tuple(tensor.shape)
                raise ValueError(f"{option}: {name} has shape {shape}, the model's is {want}")
            tensor.copy_(state[name].to(tensor.dtype))


def run_weights(run_dir: Path) -> tuple[str, Path] | None:
    """The trained weights a finished run shipped: ("lora", RUN/lora) or ("full", RUN/transformer[.safetensors])."""
    for kind, rel in (("lora", "lora"), ("full", "transformer"), ("full", "transformer.safetensors")):
        path = run_dir / rel
        if path.exists():
            return kind, path
    return None


def _open_run(run: str) -> tuple[Any, Path]:
    from flowbp.config import load_config

    run_dir = Path(run)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"--run: {run} is not a run directory (no config.yaml)")
    try:
        config = load_config(run_dir / "config.yaml")
    except ValueError as exc:
        raise ValueError(f"--run: {run_dir / 'config.yaml'}: {exc}") from None
    return config, run_dir


def _prompts(args: argparse.Namespace, config: Any | None, backbone: Any) -> list[str]:
    from flowbp.evaluate import read_prompts

    if args.prompt and args.prompts:
        raise ValueError("--prompt/--prompts: give prompts one way (repeated --prompt TEXT or --prompts FILE)")
    if args.prompt:
        return list(args.prompt)
    if args.prompts:
        return read_prompts(args.prompts)
    if config is not None and config.eval_prompts_file is not None:
        return read_prompts(config.eval_prompts_file, "eval_prompts_file")[:DEFAULT_NUM_PROMPTS]
    return list(backbone.default_prompts())[:DEFAULT_NUM_PROMPTS]


def run(args: argparse.Namespace) -> int:
    from flowbp import evaluate as ev
    from flowbp.commands.options import load_backbone_for_cli, resolve_device
    from flowbp.evaluate import describe_guidance

    # ---- options first: nothing is loaded or written before they are all valid
    for name in ("images_per_prompt", "steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    if args.resolution is not None and args.resolution < 1:
        raise ValueError(f"--resolution: must be >= 1, got {args.resolution}")
    if args.guidance is not None and args.guidance < 1:
        raise ValueError(f"--guidance: must be >= 1 (1 = no guidance), got {args.guidance}")
    if args.lora and args.transformer:
        raise ValueError("--lora/--transformer: give one set of trained weights, not both")
    out = Path(args.out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not args.overwrite:
        raise ValueError(f"--out: {out} exists (pass --overwrite to replace it)")
    if args.prompts is not None:
        ev.read_prompts(args.prompts)  # a missing or empty file is an error before any model loads
    metrics = ev.parse_metrics(args.reward) if args.reward else []

    config, weights = None, None
    if args.run is not None:
        config, run_dir = _open_run(args.run)
        if args.backbone is not None and args.backbone != config.backbone:
            raise ValueError(f"--backbone: {args.backbone!r} differs from the run's backbone {config.backbone!r}")
        if args.lora or args.transformer:
            raise ValueError("--run: takes the run's own trained weights; do not combine it with --lora/--transformer")
        weights = run_weights(run_dir)
        if weights is None:
            raise ValueError(
                f"--run: {run_dir} has no trained weights yet (RUN/lora or RUN/transformer appear when training "
                "finishes); finish it with `flowbp train --resume` first"
            )
    elif args.lora:
        weights = ("lora", Path(args.lora))
    elif args.transformer:
        weights = ("full", Path(args.transformer))
    if weights is not None and not weights[1].exists():
        option = "--lora" if args.lora else "--transformer"
        raise ValueError(f"{option}: not found: {weights[1]}")

    backbone_name = args.backbone or (config.backbone if config else "digits")
    path = args.backbone_path or (config.backbone_path if config else None)
    resolution = args.resolution or (config.resolution if config else None)
    dtype = args.dtype or (config.dtype if config else "auto")
    guidance = args.guidance if args.guidance is not None else (config.guidance_scale if config else None)
    steps = args.steps or (config.num_inference_steps if config else 25)
    device = resolve_device(args.device)

    # ---- the model
    backbone = load_backbone_for_cli(
        backbone_name, path, device, resolution, dtype, config.backbone_args if config else None
    )
    if weights is not None:
        option = "--run" if args.run else ("--lora" if weights[0] == "lora" else "--transformer")
        if weights[0] == "lora":
            load_lora_checked(backbone, weights[1], option)
        else:
            load_full_weights(backbone, weights[1], option)
    prompts = _prompts(args, config, backbone)
    backbone.encode_prompts(prompts)  # clear error for prompts the backbone cannot encode
    scorers = {m: ev.load_metric(m, None, device) for m in metrics}

    # ---- sample, score, write
    keys = ev.plan_keys(len(prompts), args.images_per_prompt, args.seed)
    total = len(keys)
    print(f"sampling {total} images ({len(prompts)} prompts × {args.images_per_prompt}, {steps} steps) on {device}",
          file=sys.stderr, flush=True)
    images = ev.generate(backbone, prompts, keys, steps, guidance, args.batch_size, progress=not args.no_progress)
    scores = ev.score(images, [prompts[i] for i, _ in keys], scorers, args.batch_size, device) if scorers else {}
    settings = {
        "backbone": backbone_name,
        "backbone_path": path or "the backbone's default",
        "weights": f"{weights[0]}: {weights[1]}" if weights else "base (no fine-tuning)",
        "run": args.run,
        "steps": steps,
        "guidance": describe_guidance(backbone, guidance),
        "resolution": int(images[0].shape[-1]),
        "seed": args.seed,
        "images_per_prompt": args.images_per_prompt,
        "device": device,
    }
    _write(out, prompts, keys, images, scores, settings, args.overwrite)
    print(f"wrote {out}: {total} images (images/p<prompt>_s<seed>.png), grid.png, prompts.txt, sample.json")
    if scores:
        from flowbp.commands.eval import _print_summary

        records = [{"prompt_index": i, "scores": {m: scores[m][k] for m in metrics}} for k, (i, _) in enumerate(keys)]
        _print_summary(ev.summarize(records, metrics), len(prompts))
    return 0


def _write(
    out: Path,
    prompts: list[str],
    keys: list[tuple[int, int]],
    images: list[Any],
    scores: dict[str, list[float]],
    settings: dict[str, Any],
    overwrite: bool,
) -> None:
    """Write into a hidden sibling, then rename it into place: the folder is complete or absent."""
    import os
    import shutil
    import uuid

    from PIL import Image

    from flowbp.evaluate import IMAGES_DIR, image_name
    from flowbp.images import labelled_grid

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / IMAGES_DIR).mkdir()
        for (i, s), img in zip(keys, images, strict=True):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp / IMAGES_DIR / image_name(i, s))
        per_prompt = len(keys) // len(prompts)
        seeds = [s for _, s in keys[:per_prompt]]
        weights = settings["weights"]
        caption = f"{settings['backbone']} · {weights} · {settings['steps']} steps · guidance {settings['guidance']}"
        labelled_grid(images, len(prompts), prompts, [f"seed {s}" for s in seeds], caption).save(tmp / "grid.png")
        (tmp / "prompts.txt").write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
        record = {**settings, "prompts": prompts, "images": [f"{IMAGES_DIR}/{image_name(i, s)}" for i, s in keys]}
        if scores:
            record["scores"] = scores
        (tmp / "sample.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise ValueError(f"--out: {out} exists (pass --overwrite to replace it)")
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def register(subparsers: argparse._SubParsersAction) -> None:
    from flowbp.commands.options import add_deprecated_alias, add_model_options, add_render_options

    p = subparsers.add_parser(
        "sample",
        help="sample images (and a labelled grid) from any backbone, a LoRA, full weights or a run",
        description=__doc__.split("\n\n")[0] + " Writes p<prompt index>_s<seed>.png files, a labelled grid.png, "
        "prompts.txt and sample.json into --out.",
    )
    add_model_options(p, backbone_help="backbone to sample (default digits, or the --run's)")
    p.add_argument("--transformer", metavar="PATH",
                   help="fully fine-tuned weights: RUN/transformer (diffusers folder) or RUN/transformer.safetensors")
    p.add_argument("--run", metavar="RUN_DIR",
                   help="a finished training run: its backbone, settings and trained weights (flags override)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts", metavar="FILE",
                   help=f"prompts file, one per line (default: the first {DEFAULT_NUM_PROMPTS} of the backbone's set)")
    p.add_argument("--images-per-prompt", type=int, default=4, metavar="N",
                   help="images per prompt, one grid column each; image k uses seed SEED+k (default 4)")
    add_deprecated_alias(p, "--samples", "--images-per-prompt", dest="images_per_prompt", type=int)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 25, or the run's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the run's, else the backbone's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image of every prompt (default 0)")
    add_render_options(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to sample (default auto: CUDA when available)")
    p.add_argument("--batch-size", type=int, default=8, help="images per sampling batch (default 8)")
    p.add_argument("--reward", metavar="SPEC", help="also score the images with this reward spec (mean, 95%% CI)")
    p.add_argument("--out", default="samples", metavar="DIR", help="output folder (default ./samples)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
