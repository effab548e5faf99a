"""``flowbp train``: fine-tune a backbone with any method (no arguments: the digits testbed default)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from flowbp.commands.plan import parse_overrides
    from flowbp.config import load_config
    from flowbp.training.run import default_run_dir

    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun / accelerate launch, only rank 0 prints
    overrides = parse_overrides(args.set)
    for key in ("backbone", "backbone_path"):  # --backbone / --backbone-path: the flags of sample, eval and plan
        value = getattr(args, key, None)
        if value is not None:
            if key in overrides and overrides[key] != value:
                raise ValueError(f"--{key.replace('_', '-')}: {value!r} contradicts --set {key}={overrides[key]!r}")
            overrides[key] = value
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
    if args.gpu_memory is not None and not args.dry_run:
        raise ValueError("--gpu-memory: only with --dry-run (it plans a recipe; it does not limit a run)")
    if args.gpu_memory is not None and not args.gpu_memory > 0:
        raise ValueError(f"--gpu-memory: must be a positive number of GiB, got {args.gpu_memory:g}")
    if args.dry_run:  # memory estimate of the full-size architecture on the meta device; nothing is written
        config = load_config(args.config, overrides)
        if args.gpu_memory is not None:  # the planner: the fastest recipe that fits
            from flowbp.planner import plan_config

            processes = 1 if args.processes is None else args.processes
            if args.processes is None:
                print("--processes not given: planning for 1 process (one GPU)", flush=True)
            plan = plan_config(config, args.gpu_memory, processes)
            print(plan.report(args.config))
            return 0 if plan.fits else 1
        from flowbp.dryrun import estimate_config

        print(estimate_config(config, processes=args.processes).report())
        return 0
    if args.processes is not None:
        raise ValueError("--processes: only with --dry-run (a run takes its processes from its launcher)")
    if args.resume is not None:
        if args.config is not None or overrides:
            raise ValueError("--resume: takes the run's saved config.yaml; do not combine it with --config/--set")
        run_dir = Path(args.resume)
        if main_process:
            print(f"run directory: {run_dir} (resuming)", flush=True)
        from flowbp.train import train  # torch, accelerate, diffusers: only once the input is known good

        summary = train(resume=args.resume)
    else:
        config = load_config(args.config, overrides)
        if not config.output_dir:  # fix the default (time-stamped) directory now, so it can be printed first
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process would stamp its own time
                raise ValueError("--output-dir: required when launching several processes")
            config = load_config(args.config, {**overrides, "output_dir": str(default_run_dir(config))})
        run_dir = Path(config.output_dir)
        from flowbp.train import train  # torch, accelerate, diffusers: only once the input is known good

        summary = train(config)  # prints "run directory: …" once the folder exists
    if summary is not None and main_process:  # one report, from the main process
        from flowbp.report import fmt, fmt_ci

        keys = ("reward", "heldout_accuracy", "frechet_distance", "diversity")
        before, after = summary["before"] or {}, summary["after"]
        print(f"\n{'metric':<20} {'before':>10} {'after':>10}")
        for key in keys:
            if key in after:
                print(f"{key:<20} {fmt(before.get(key)) if before else '—':>10} {fmt(after[key]):>10}")
        imp = summary["reward_improvement"]
        if imp is None:
            print("reward improvement: not measured (eval_at_start: false)")
        else:
            ci = fmt_ci(imp["ci95_low"], imp["ci95_high"], signed=True)
            print(f"reward improvement: {fmt(imp['mean'], True)}  95% CI {ci}  (n={imp['n']})")
        print(f"sample grids: {run_dir / 'samples'}/   summary: {run_dir / 'summary.json'}")
        if "guard" in summary:  # what the reward-hacking guard did (docs/guard.md)
            good = summary["guard"]["last_good_checkpoint"]
            print(f"guard: {summary['guard']['outcome']}; last checkpoint no guard flagged: "
                  + (f"{good['checkpoint']} (step {good['step']})" if good else "none"))
        if args.json:
            print(json.dumps(summary, indent=2))
    return 0


def _presets_epilog() -> str:
    """The shipped presets, grouped by backbone, for ``flowbp train --help`` (read from the folder: no import)."""
    import textwrap

    folder = Path(__file__).resolve().parent.parent / "configs"
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    lines = ["shipped presets (--config NAME; a YAML file path works too):"]
    families = ("digits", "sd35", "flux1", "flux2-klein")
    groups = [[n for n in names if n.startswith(f"{f}-")] for f in families]
    groups.append([n for n in names if not n.startswith(tuple(f"{f}-" for f in families))])  # any other
    for group in filter(None, groups):
        lines += textwrap.wrap(", ".join(group), 100, initial_indent="  ", subsequent_indent="  ",
                               break_on_hyphens=False)
    lines.append("examples:\n  flowbp train --set method=leapalign --set steps=50\n"
                 "  flowbp train --config sd35-flowbp-lagrange --dry-run --processes 8")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a backbone with a reward (default: the digits testbed)",
        description="Fine-tune a backbone with any method and reward. Without arguments: FlowBP-Lagrange on the "
        "embedded digits testbed (CPU, about a minute). The config is validated before anything is loaded or "
        "written; each run writes a run directory (config, checkpoints, samples, summary.json).",
        epilog=_presets_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config file or shipped preset name (default: built-in defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (YAML value)")
    p.add_argument("--backbone", metavar="NAME", help="the backbone to train (= --set backbone=NAME)")
    p.add_argument("--backbone-path", metavar="PATH", help="its base weights (= --set backbone_path=PATH)")
    p.add_argument("--output-dir", help="run directory (must not exist or be empty)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="resume a run from its latest checkpoint (a run killed before its first one starts over from step 0)",
    )
    p.add_argument("--json", action="store_true", help="also print the whole summary as JSON")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="estimate parameters and peak memory of the full-size model (meta device: no weights, nothing written)",
    )
    p.add_argument(
        "--processes",
        type=int,
        metavar="P",
        help="with --dry-run: processes (GPUs) the run will use; memory is estimated for one micro-batch, "
        "batch_size / (P × gradient_accumulation_steps) (default 1)",
    )
    p.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GIB",
        help="with --dry-run: plan the fastest recipe (micro-batch, checkpointing, quantized base, 8-bit AdamW, "
        "FSDP2) whose estimated peak fits GIB per GPU; prints it as --set overrides (exit 1 if none fits)",
    )
    p.set_defaults(func=run)
