"""``flowbp accelerate-config [NAME]``: the path of a shipped accelerate launch preset (or the list).

Used as ``accelerate launch --config_file "$(flowbp accelerate-config multi-gpu)" -m flowbp train …``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESETS.glob("*.yaml"))}


def run(args: argparse.Namespace) -> int:
    found = presets()
    if args.name is None:
        for name, path in found.items():
            first = path.read_text().splitlines()[0].lstrip("# ")
            print(f"{name:<12} {first}")
        return 0
    if args.name not in found:
        raise ValueError(f"accelerate-config: unknown preset {args.name!r}; shipped: {', '.join(found)}")
    print(found[args.name])
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "accelerate-config", help="print the path of a shipped accelerate launch preset (no name: list them)"
    )
    p.add_argument("name", nargs="?", help="single-gpu, multi-gpu, fsdp2 or multi-node")
    p.set_defaults(func=run)
