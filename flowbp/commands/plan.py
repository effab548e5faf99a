"""``flowbp plan METHOD``: print the plan a method draws (anchors, supports, weights, actives, cost)."""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as YAML (numbers, true/false, lists like [1, 2])."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from flowbp.methods import make_plan
    from flowbp.trajectory import training_sigmas

    if args.steps < 1:
        raise ValueError(f"--steps: must be >= 1, got {args.steps}")
    if args.shift is not None and args.shift <= 0:
        raise ValueError(f"--shift: must be > 0, got {args.shift}")
    if args.backbone is not None:
        if args.shift is not None:
            raise ValueError("--shift: give either --shift or --backbone (which brings its own shift), not both")
        # The very call training makes (flowbp/train.py: backbone.sigmas(num_inference_steps)).
        from flowbp.backbones import load_backbone

        kwargs = {"path": args.backbone_path} if args.backbone_path else {}
        sigmas = load_backbone(args.backbone, **kwargs).sigmas(args.steps)
    else:
        sigmas = training_sigmas(args.steps, 3.0 if args.shift is None else args.shift)
    # Training seeds its plan generator with plan_seed the same way: --seed S shows the first plan of a run
    # with plan_seed = S.
    generator = torch.Generator().manual_seed(args.seed)
    plan = make_plan(args.method, sigmas, generator, **parse_overrides(args.set))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.describe())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="print the plan a method draws", description=__doc__)
    p.add_argument("method", help="method name (see `flowbp methods`)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps N (default 25)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the plan's randomness (default 0; = a training run's first plan with plan_seed)")
    p.add_argument("--shift", type=float, default=None,
                   help="sigma time shift of the grid linspace(1, 1/N, N) (default 3.0, SD3's; 1.0 = linear)")
    p.add_argument("--backbone", default=None,
                   help="use this backbone's training grid instead of --shift (e.g. digits: shift 1.0)")
    p.add_argument("--backbone-path", default=None, help="weights directory of --backbone (default: shipped)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a method parameter")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)

    m = subparsers.add_parser(
        "methods",
        help="list the registered methods and their parameters",
        description="List every registered method with a one-line summary and its parameters with their defaults "
        "(override them with `flowbp plan METHOD --set key=value` or the config's method_args).",
    )
    m.set_defaults(func=list_methods)


def list_methods(args: argparse.Namespace) -> int:
    import dataclasses

    from flowbp.methods import available_methods, get_method

    for name in available_methods():
        spec = get_method(name)
        print(f"{name:<16} {spec.summary}")
        defaults = {f.name: f.default for f in dataclasses.fields(spec.params_cls)}
        print(" " * 17 + ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return 0
