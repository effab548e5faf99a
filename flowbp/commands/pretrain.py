"""``flowbp pretrain digits``: (re)train the embedded testbed's three models.

    flowbp pretrain digits                       # -> ~/.cache/flowbp/digits (or $FLOWBP_HOME/digits)
    flowbp pretrain digits --out flowbp/assets   # regenerate the assets shipped in the package

Load the result with ``DigitsBackbone.from_pretrained(DIR)`` and ``load_reward(spec, path=DIR)``.
Without ``--out`` nothing is written into the installed package: site-packages may be read-only
and the shipped assets are what the tests and documented numbers refer to.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

TARGETS = ("digits",)
# Kept in step with flowbp.testbed.pretrain.DEFAULT_FLOW_STEPS (a test checks), so that building the CLI parser
# does not import diffusers: `flowbp plan` must stay fast.
DEFAULT_FLOW_STEPS = 1500


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``pretrain`` sub-command to an argparse ``subparsers`` object."""
    parser = subparsers.add_parser(
        "pretrain",
        help="train the embedded digits testbed (flow model + reward + held-out classifiers)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", choices=TARGETS, help="what to pretrain (only 'digits')")
    parser.add_argument("--out", default=None, help="output directory (default: ~/.cache/flowbp/digits)")
    parser.add_argument("--seed", type=int, default=0, help="flow seed s; classifiers use s+1 and s+2")
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_FLOW_STEPS, help=f"flow-model optimiser steps ({DEFAULT_FLOW_STEPS})"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from flowbp.testbed.pretrain import pretrain_digits

    if args.steps < 1:
        raise ValueError(f"--steps: must be >= 1, got {args.steps}")
    report = pretrain_digits(args.out, seed=args.seed, steps=args.steps, progress=not args.no_progress)
    print(json.dumps(report, indent=2))
    return 0
