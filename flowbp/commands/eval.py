"""``flowbp eval``: score a model's samples (or a folder of images) with any metrics; compare two runs.

    flowbp eval --backbone digits --prompts P.txt --metrics digit-alignment,heldout-correct --out RUN
    flowbp eval --images DIR --prompts P.txt --metrics ... --out RUN
    flowbp eval --compare RUN_A RUN_B [--out comparison.json]

Every input is checked before anything is sampled or written; the run directory appears complete or
not at all (see :func:`flowbp.evaluate.write_run`).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any


def _print_summary(metrics: dict[str, dict[str, Any]], n_prompts: int) -> None:
    from flowbp.report import fmt, fmt_ci

    width = max(len("metric"), *(len(m) for m in metrics))
    print(f"{'metric':<{width}}  {'mean':>10}  95% CI over {n_prompts} prompts")
    for name, s in metrics.items():
        print(f"{name:<{width}}  {fmt(s['mean']):>10}  {fmt_ci(s['ci95_low'], s['ci95_high'])}")


def _print_comparison(comparison: dict[str, Any]) -> None:
    from flowbp.report import fmt, fmt_ci

    metrics = comparison["metrics"]
    width = max(len("metric"), *(len(m) for m in metrics))
    print(f"A = {comparison['a']}\nB = {comparison['b']}\n{comparison['pairing']}")
    print(f"{'metric':<{width}}  {'mean A':>10}  {'mean B':>10}  {'A - B':>10}  {'95% CI':<24}  significant")
    for name, c in metrics.items():
        ci = fmt_ci(c["ci95_low"], c["ci95_high"], signed=True)
        print(
            f"{name:<{width}}  {fmt(c['mean_a']):>10}  {fmt(c['mean_b']):>10}  {fmt(c['diff'], True):>10}  "
            f"{ci:<24}  {'yes' if c['significant'] else 'no'}"
        )


def _run_compare(args: argparse.Namespace) -> int:
    from flowbp.evaluate import compare, read_scores

    run_a, run_b = args.compare
    a, b = read_scores(run_a), read_scores(run_b)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.overwrite:
        raise ValueError(f"--out: {out} exists (pass --overwrite to replace it)")
    comparison = {
        "a": run_a,
        "b": run_b,
        "pairing": "paired by prompt and seed; differences averaged within prompt; 95% Student-t over prompts",
        "metrics": compare(a, b),
    }
    _print_comparison(comparison)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(comparison, indent=2) + "\n")
        tmp.replace(out)
        print(f"wrote {out}")
    return 0


def _reward_paths(items: list[str] | None) -> dict[str, str]:
    from flowbp.rewards import available_rewards

    paths = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--reward-path: expected NAME=PATH, got {item!r}")
        if name not in available_rewards():
            raise ValueError(f"--reward-path: unknown reward {name!r}; known rewards: {', '.join(available_rewards())}")
        paths[name] = path
    return paths


def _load_backbone(args: argparse.Namespace, device: str):
    """The backbone as training builds it (resolution, weight dtype), errors naming eval's options."""
    from flowbp.commands.options import load_backbone_for_cli

    return load_backbone_for_cli(args.backbone, args.backbone_path, device, args.resolution, args.dtype)


def run(args: argparse.Namespace) -> int:
    if args.compare:
        return _run_compare(args)
    import torch

    from flowbp import evaluate as ev

    # ---- everything is validated before anything heavy is loaded, sampled or written
    if (args.backbone is None) == (args.images is None):
        raise ValueError("give exactly one of --backbone NAME (sample a model) or --images DIR (score a folder)")
    if args.prompts is None:
        raise ValueError("--prompts: required (a text file, one prompt per line)")
    if args.metrics is None:
        raise ValueError(f"--metrics: required (comma-separated; known: {', '.join(ev.available_metrics())})")
    for name in ("images_per_prompt", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.images is not None and (args.backbone_path or args.lora):
        raise ValueError("--backbone-path/--lora: only with --backbone (a folder of images is scored as it is)")
    prompts = ev.read_prompts(args.prompts)
    metrics = ev.parse_metrics(args.metrics)
    paths = _reward_paths(args.reward_path)
    out = Path(args.out) if args.out else Path("evals") / datetime.now().strftime("eval-%Y%m%d-%H%M%S")
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out: {out} exists (pass --overwrite to replace it)")
    baseline = ev.read_scores(args.baseline, "--baseline") if args.baseline else None
    if args.lora and not Path(args.lora).exists():
        raise ValueError(f"--lora: not found: {args.lora}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    progress = not args.no_progress
    if not progress:  # also the weight-loading bars of transformers / diffusers
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        diffusers_logging.disable_progress_bar()
    info: dict[str, Any] = {"prompts_file": str(args.prompts)}
    if args.images is not None:
        image_set = ev.read_image_folder(args.images, prompts)
        info.update({"mode": "folder", "images": str(args.images)})
    else:
        keys = ev.plan_keys(len(prompts), args.images_per_prompt, args.seed)
        image_set = ev.ImageSet(prompts, keys)
        info.update(
            {
                "mode": "model",
                "backbone": args.backbone,
                "backbone_path": args.backbone_path or "the backbone's default",
                "lora": args.lora or "none (base weights)",
                "images_per_prompt": args.images_per_prompt,
                "seed": args.seed,
                "steps": args.steps,
                "guidance": args.guidance,  # described once the backbone is loaded
                "resolution": args.resolution or "the backbone's default",
                "dtype": args.dtype or "auto",
            }
        )
    if baseline is not None:
        planned = [{"prompt_index": i, "seed": s, "prompt": prompts[i]} for i, s in image_set.keys]
        reason = ev.pairing_error(planned, baseline)
        if reason:
            raise ValueError(f"--baseline: {reason}")
        if not set(metrics) & set(baseline[0]["scores"]):
            raise ValueError(
                f"--baseline: {args.baseline} shares no metric with --metrics "
                f"(it has {', '.join(baseline[0]['scores'])})"
            )
    scorers = {m: ev.load_metric(m, paths, device) for m in metrics}

    if args.images is None:
        from flowbp.commands.sample import load_lora_checked
        from flowbp.evaluate import describe_guidance

        backbone = _load_backbone(args, device)
        info["guidance"] = describe_guidance(backbone, args.guidance)
        if args.lora:
            load_lora_checked(backbone, args.lora)
        backbone.encode_prompts(prompts[:1] + prompts[-1:])  # fail early on prompts the backbone cannot encode
        image_set.images = ev.generate(
            backbone, prompts, image_set.keys, args.steps, args.guidance, args.batch_size, progress
        )
    scores = ev.score(image_set.images, image_set.image_prompts(), scorers, args.batch_size, device, progress)
    result = ev.write_run(
        out,
        image_set,
        metrics,
        scores,
        info,
        baseline=(args.baseline, baseline) if baseline is not None else None,
        overwrite=args.overwrite,
        embed_images=args.embed_images,
    )
    s = result.summary
    print(f"wrote {out}: {s['n_images']} images of {s['n_prompts']} prompts (scores.jsonl, summary.json, "
          f"contact_sheet.png, report.html{', comparison.json' if result.comparison else ''})")
    _print_summary(s["metrics"], s["n_prompts"])
    if result.comparison is not None:
        print()
        _print_comparison(result.comparison)
    sys.stdout.flush()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score samples of a model (or a folder of images) with metrics; compare two eval runs",
        description="Score every image with every metric; write scores.jsonl, summary.json (means, 95%% CIs over "
        "prompts), images, contact_sheet.png and report.html. Or compare two runs: --compare RUN_A RUN_B.",
    )
    from flowbp.commands.options import add_model_options, add_render_options

    add_model_options(p, backbone_help="sample this backbone (e.g. digits); or score a folder with --images")
    p.add_argument("--images", help="score this folder instead: p<prompt index>_s<seed>.png files or a manifest.jsonl")
    p.add_argument("--prompts", help="prompts file, one prompt per line (the prompt index is the line number from 0)")
    p.add_argument(
        "--metrics", help="comma-separated reward specs / held-out metrics, e.g. digit-alignment,heldout-correct"
    )
    p.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt; image k uses seed SEED+k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the backbone's)")
    add_render_options(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reward-path", action="append", metavar="NAME=PATH", help="weights of a reward (repeatable)")
    p.add_argument("--baseline", metavar="RUN", help="also compare with this eval run (paired by prompt and seed)")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="only compare two eval runs: A − B")
    p.add_argument(
        "--out", help="run directory to write (default: evals/eval-<time>; with --compare: an optional JSON file)"
    )
    p.add_argument("--embed-images", action="store_true", help="embed the images in report.html (one portable file)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
