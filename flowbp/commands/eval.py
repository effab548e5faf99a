"""``flowbp eval``: score a model's samples (or a folder of images) with any metrics; compare two runs.

    flowbp eval --backbone digits --prompts P.txt --metrics digit-alignment,heldout-correct --out RUN
    flowbp eval --images DIR --prompts P.txt --metrics ... --out RUN
    flowbp eval --compare RUN_A RUN_B [--out comparison.json]
    flowbp eval --suite paper --backbone sd3 [--lora RUN/lora] [--judge-url http://HOST:PORT/v1] --out RUN
    flowbp eval --table RUN_BASE RUN_A RUN_B [--baseline RUN_BASE] [--out table.md]
    flowbp eval --suite geneval --backbone NAME [--geneval-detector DIR --geneval-clip DIR] --out RUN

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
    width = max(len("metric"), *(len(m) for m in metrics))
    print(f"{'metric':<{width}}  {'mean':>10}  95% CI over {n_prompts} prompts")
    for name, s in metrics.items():
        missing = f"  ({s['n_missing']} of {s['n_images'] + s['n_missing']} missing)" if s.get("n_missing") else ""
        if s["mean"] is None:
            print(f"{name:<{width}}  {'missing':>10}{missing}")
            continue
        print(f"{name:<{width}}  {s['mean']:>10.4f}  [{s['ci95_low']:.4f}, {s['ci95_high']:.4f}]{missing}")


def _print_comparison(comparison: dict[str, Any]) -> None:
    metrics = comparison["metrics"]
    width = max(len("metric"), *(len(m) for m in metrics))
    print(f"A = {comparison['a']}\nB = {comparison['b']}\n{comparison['pairing']}")
    print(f"{'metric':<{width}}  {'mean A':>10}  {'mean B':>10}  {'A - B':>10}  {'95% CI':<22}  significant")
    for name, c in metrics.items():
        if c["diff"] is None:  # no image scored on both sides (a judge without parsable answers)
            print(f"{name:<{width}}  {'missing':>10}")
            continue
        ci = f"[{c['ci95_low']:+.4f}, {c['ci95_high']:+.4f}]"
        print(
            f"{name:<{width}}  {c['mean_a']:>10.4f}  {c['mean_b']:>10.4f}  {c['diff']:>+10.4f}  {ci:<22}  "
            f"{'yes' if c['significant'] else 'no'}"
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
    from flowbp.rewards import available_judges, available_rewards

    known = [*available_rewards(), *available_judges()]
    paths = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--reward-path: expected NAME=PATH, got {item!r}")
        if name not in known:
            raise ValueError(f"--reward-path: unknown reward {name!r}; known rewards: {', '.join(sorted(known))}")
        paths[name] = path
    return paths


def _load_backbone(args: argparse.Namespace, device: str):
    """The backbone as training builds it (resolution, weight dtype), errors naming eval's options."""
    from types import SimpleNamespace

    from flowbp.backbones import available_backbones, backbone_from_config

    if args.backbone not in available_backbones():
        raise ValueError(f"--backbone: unknown backbone {args.backbone!r}; known: {', '.join(available_backbones())}")
    config = SimpleNamespace(
        backbone=args.backbone, backbone_path=args.model, backbone_args={}, resolution=args.resolution,
        dtype=args.dtype, finetune="lora", gradient_checkpointing=False, vae_gradient_checkpointing=False,
    )
    try:
        return backbone_from_config(config, device)
    except ValueError as exc:
        message = str(exc)
        for key, option in (("backbone_path:", "--model:"), ("resolution:", "--resolution:")):
            if message.startswith(key):
                message = option + message[len(key):]
        raise ValueError(message) from None


#: What a plain ``flowbp eval`` uses when an option is not given (a suite sets its own).
DEFAULTS = {"images_per_prompt": 1, "seed": 0, "steps": 25}


def _apply_suite(args: argparse.Namespace) -> dict[str, Any]:
    """Fill the options a suite fixes (prompts, seeds, images per prompt, steps, guidance, resolution) where the
    user gave none; returns what summary.json records about the suite (including any option overridden)."""
    from flowbp.suites import SUITES

    suite = SUITES[args.suite]
    if args.metrics is not None:
        raise ValueError(
            f"--metrics: --suite {suite.name} scores its own metrics ({', '.join(suite.metrics())}); drop one of them"
        )
    wanted: dict[str, Any] = {"prompts": str(suite.prompts), "images_per_prompt": suite.images_per_prompt,
                              "seed": suite.seed}
    note = None
    if args.backbone is not None:
        if args.backbone in suite.sampling:
            steps, guidance = suite.sampling[args.backbone]
            wanted.update({"steps": steps, "guidance": guidance, "resolution": suite.resolution})
        else:
            note = (f"{args.backbone} is not one of the paper's backbones ({', '.join(suite.sampling)}): its own "
                    "default steps, guidance and resolution are used")
    overridden = {}
    for key, value in wanted.items():
        given = getattr(args, key)
        if given is None:
            setattr(args, key, value)
        elif given != value and not (key == "prompts" and Path(given) == Path(value)):
            overridden[key] = {"suite": value, "given": given}
    info: dict[str, Any] = {"suite": suite.name}
    if overridden:
        info["suite_overridden"] = overridden
        print(f"--suite {suite.name}: overridden by options: "
              + ", ".join(f"{k} {v['given']} (suite: {v['suite']})" for k, v in overridden.items()))
    if note:
        info["suite_note"] = note
        print(f"--suite {suite.name}: {note}")
    return info


def run(args: argparse.Namespace) -> int:
    if args.compare:
        return _run_compare(args)
    if args.table:
        return _run_table(args)
    import torch

    from flowbp import evaluate as ev

    # ---- everything is validated before anything heavy is loaded, sampled or written
    if (args.backbone is None) == (args.images is None):
        raise ValueError("give exactly one of --backbone NAME (sample a model) or --images DIR (score a folder)")
    geneval_meta = None
    if args.suite == "geneval":  # its own prompts (or a GenEval metadata .jsonl as --prompts), 4 images per prompt
        from flowbp.geneval import suite as geneval_suite

        geneval_meta = geneval_suite.read_metadata(args.prompts)
        if args.images_per_prompt is None:
            args.images_per_prompt = geneval_suite.IMAGES_PER_PROMPT
    table_suite = args.suite if geneval_meta is None else None  # a suite of reward metrics (paper)
    suite_info = _apply_suite(args) if table_suite else {}
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.prompts is None and geneval_meta is None:
        raise ValueError("--prompts: required (a text file, one prompt per line)")
    if args.metrics is None and not args.suite:
        raise ValueError(f"--metrics: required (comma-separated; known: {', '.join(ev.available_metrics())})")
    for name in ("images_per_prompt", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.images is not None and (args.model or args.lora):
        raise ValueError("--model/--lora: only with --backbone (a folder of images is scored as it is)")
    prompts = [m["prompt"] for m in geneval_meta] if geneval_meta is not None else ev.read_prompts(args.prompts)
    if table_suite:
        from flowbp.suites import SUITES

        metrics = SUITES[table_suite].metrics()
    else:
        metrics = ev.parse_metrics(args.metrics) if args.metrics is not None else []
    paths = _reward_paths(args.reward_path)
    judge = {"url": args.judge_url, "model": args.judge_model}
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
    info: dict[str, Any] = {**suite_info, "prompts_file": str(args.prompts)}
    if geneval_meta is not None:
        from flowbp.geneval.prompts import METADATA_FILE

        info.update({"suite": args.suite, "prompts_file": str(args.prompts or METADATA_FILE)})
    if args.images is not None and geneval_meta is not None and geneval_suite.is_official_layout(Path(args.images)):
        image_set = geneval_suite.read_official_folder(Path(args.images), geneval_meta)
        info.update({"mode": "folder", "images": str(args.images)})
    elif args.images is not None:
        image_set = ev.read_image_folder(args.images, prompts)
        info.update({"mode": "folder", "images": str(args.images)})
    else:
        keys = ev.plan_keys(len(prompts), args.images_per_prompt, args.seed)
        image_set = ev.ImageSet(prompts, keys)
        info.update(
            {
                "mode": "model",
                "backbone": args.backbone,
                "model": args.model,
                "lora": args.lora,
                "images_per_prompt": args.images_per_prompt,
                "seed": args.seed,
                "steps": args.steps,
                "guidance": args.guidance,
                "resolution": args.resolution,
                "dtype": args.dtype,
            }
        )
    if baseline is not None:
        planned = [{"prompt_index": i, "seed": s, "prompt": prompts[i]} for i, s in image_set.keys]
        reason = ev.pairing_error(planned, baseline)
        if reason:
            raise ValueError(f"--baseline: {reason}")
        own = set(metrics) | ({geneval_suite.METRIC} if geneval_meta is not None else set())
        if not own & set(baseline[0]["scores"]):
            raise ValueError(
                f"--baseline: {args.baseline} shares no metric with --metrics "
                f"(it has {', '.join(baseline[0]['scores'])})"
            )
    if table_suite:
        # every metric is loaded (weights read, judge server asked) before sampling; the unavailable are skipped
        from flowbp.suites import preflight

        scorers, skipped = preflight(metrics, lambda m: ev.load_metric(m, paths, device, judge))
        if not scorers:
            raise ValueError(f"--suite {args.suite}: no metric is available (each skipped above)")
        metrics = [m for m in metrics if m in scorers]
        info["skipped_metrics"] = skipped
        if baseline is not None and not set(metrics) & set(baseline[0]["scores"]):
            raise ValueError(f"--baseline: {args.baseline} shares no available metric with --suite {args.suite}")
    else:
        scorers = {m: ev.load_metric(m, paths, device, judge) for m in metrics}
    geneval_scorer = None
    if geneval_meta is not None:  # weights checked before anything is sampled
        from flowbp.geneval.score import load_scorer

        geneval_scorer = load_scorer(args.geneval_detector, args.geneval_clip, device)

    if args.images is None:
        backbone = _load_backbone(args, device)
        if args.lora:
            backbone.load_lora(args.lora)
        backbone.encode_prompts(prompts[:1] + prompts[-1:])  # fail early on prompts the backbone cannot encode
        image_set.images = ev.generate(
            backbone, prompts, image_set.keys, args.steps, args.guidance, args.batch_size, progress
        )
    answers: dict[str, list[str | None]] = {}
    scores = ev.score(
        image_set.images, image_set.image_prompts(), scorers, args.batch_size, device, progress, answers=answers
    )
    extra_files: dict[str, str] = {}
    if geneval_scorer is not None:
        correct, geneval_summary, extra_files = geneval_suite.score(image_set, geneval_meta, geneval_scorer, progress)
        scores = {geneval_suite.METRIC: correct, **scores}
        metrics = [geneval_suite.METRIC, *metrics]
        info["geneval"] = geneval_summary
    if table_suite:
        extra_files["suite_table.md"] = _suite_table(
            args, out, ev, image_set, metrics, scores, answers, baseline, info["skipped_metrics"]
        )
    result = ev.write_run(
        out,
        image_set,
        metrics,
        scores,
        info,
        baseline=(args.baseline, baseline) if baseline is not None else None,
        overwrite=args.overwrite,
        embed_images=args.embed_images,
        answers=answers,
        extra_files=extra_files,
    )
    s = result.summary
    print(f"wrote {out}: {s['n_images']} images of {s['n_prompts']} prompts (scores.jsonl, summary.json, "
          f"contact_sheet.png, report.html{', comparison.json' if result.comparison else ''})")
    _print_summary(s["metrics"], s["n_prompts"])
    if result.comparison is not None:
        print()
        _print_comparison(result.comparison)
    if geneval_scorer is not None:
        print()
        geneval_suite.print_summary(info["geneval"])
    if "suite_table.md" in extra_files:
        print(f"\n{out / 'suite_table.md'}:\n{extra_files['suite_table.md']}", end="")
    sys.stdout.flush()
    return 0


def _suite_table(args, out, ev, image_set, metrics, scores, answers, baseline, skipped) -> str:
    """The suite's table (suite_table.md): this model's row, the baseline's row and their paired differences."""
    from flowbp.suites import SUITES, table

    records = ev.records_of(image_set, scores, answers)
    rows = [(out.name, ev.summarize(records, metrics))]
    comparisons = []
    if baseline is not None:
        shared = [m for m in metrics if all(m in r["scores"] for r in baseline)]
        rows.append((Path(args.baseline).name, ev.summarize(baseline, shared)))
        metrics_ab = ev.compare(records, baseline, "--baseline")
        comparisons = [{"a": out.name, "b": Path(args.baseline).name, "metrics": metrics_ab}]
    return table(SUITES[args.suite], rows, skipped, comparisons)


def _run_table(args: argparse.Namespace) -> int:
    """``--table RUN ...``: one row per finished run in the suite's column order (+ differences vs --baseline)."""
    from flowbp import evaluate as ev
    from flowbp.suites import SUITES, table

    if args.suite == "geneval":
        raise ValueError("--table: for --suite paper; a GenEval run's summary is RUN/geneval.json")
    suite = SUITES[args.suite or "paper"]
    rows, comparisons, skipped = [], [], {}
    base = ev.read_scores(args.baseline, "--baseline") if args.baseline else None
    for run_dir in args.table:
        records = ev.read_scores(run_dir, "--table")
        summary_file = Path(run_dir) / ev.SUMMARY_FILE
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        skipped.update(summary.get("skipped_metrics", {}))
        scored = [m for m in suite.metrics() if all(m in r["scores"] for r in records)]
        rows.append((Path(run_dir).name, ev.summarize(records, scored)))
        if base is not None and Path(run_dir).resolve() != Path(args.baseline).resolve():
            metrics_ab = ev.compare(records, base, "--baseline")
            comparisons.append({"a": Path(run_dir).name, "b": Path(args.baseline).name, "metrics": metrics_ab})
    text = table(suite, rows, skipped, comparisons)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise ValueError(f"--out: {out} exists (pass --overwrite to replace it)")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score samples of a model (or a folder of images) with metrics; compare two eval runs",
        description="Score every image with every metric; write scores.jsonl, summary.json (means, 95% CIs over "
        "prompts), images, contact_sheet.png and report.html. Or compare two runs: --compare RUN_A RUN_B.",
    )
    p.add_argument("--backbone", help="sample this backbone (e.g. digits)")
    p.add_argument("--model", help="the backbone's weights: directory or hub id (default: the backbone's own)")
    p.add_argument("--lora", help="LoRA directory or file saved by `flowbp train` (RUN/lora)")
    p.add_argument("--images", help="score this folder instead: p<prompt index>_s<seed>.png files or a manifest.jsonl")
    p.add_argument("--prompts", help="prompts file, one prompt per line (the prompt index is the line number from 0)")
    p.add_argument(
        "--metrics", help="comma-separated reward specs / held-out metrics, e.g. digit-alignment,heldout-correct"
    )
    p.add_argument(
        "--images-per-prompt", type=int, default=None,
        help="images per prompt; image k uses seed SEED+k (default 1; 4 with --suite geneval)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed of image 0 of every prompt (default 0)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 25)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the backbone's)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the backbone's)")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="weight dtype of a real backbone (auto: float32 on CPU, bfloat16 on GPU)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="images sampled and scored per batch (default 16)")
    p.add_argument("--reward-path", action="append", metavar="NAME=PATH", help="weights of a reward (repeatable)")
    p.add_argument(
        "--suite", choices=["paper", "geneval"],
        help="paper: the FlowBP paper's HPDv2 table (400 prompts, seed 42, its steps/guidance per backbone; "
        "HPSv2.1, PickScore, ImageReward, UR-Align, UR-IQ, HPSv3 when available); other options override it. "
        "geneval: its 553 prompts, 4 images each, Mask2Former + CLIP verdicts (--metrics optional; --prompts may "
        "name a GenEval metadata .jsonl; --images may be GenEval's <N>/samples/<k>.png layout)",
    )
    p.add_argument("--geneval-detector", metavar="DIR",
                   help="GenEval detector: a transformers Mask2Former COCO-instance folder or a folder with "
                   "mmdet's mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth "
                   "(default $FLOWBP_REWARD_DIR/geneval-detector, then the hub cache)")
    p.add_argument("--geneval-clip", metavar="DIR", help="GenEval colour classifier: a CLIP ViT-L/14 folder "
                   "(default $FLOWBP_REWARD_DIR/geneval-clip, then the hub cache of openai/clip-vit-large-patch14)")
    p.add_argument(
        "--table", nargs="+", metavar="RUN",
        help="only print the suite's table (default paper) of finished eval runs, one row per run, with paired "
        "differences against --baseline; --out writes it to a file",
    )
    p.add_argument(
        "--judge-url", help="OpenAI-compatible URL of a served UnifiedReward judge, e.g. http://HOST:PORT/v1 "
        "(default $FLOWBP_JUDGE_URL; else a local folder via --reward-path unifiedreward=DIR)",
    )
    p.add_argument(
        "--judge-model", help="the judge's served model name: must match the server's (default $FLOWBP_JUDGE_MODEL "
        "or CodeGoat24/UnifiedReward-7b-v1.5, the name sglang serves for that --model-path)",
    )
    p.add_argument("--baseline", metavar="RUN", help="also compare with this eval run (paired by prompt and seed)")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="only compare two eval runs: A − B")
    p.add_argument(
        "--out", help="run directory to write (default: evals/eval-<time>; with --compare: an optional JSON file)"
    )
    p.add_argument("--embed-images", action="store_true", help="embed the images in report.html (one portable file)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
