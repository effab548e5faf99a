"""The ``flowbp`` command line: ``flowbp plan | methods | ...``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules, each with ``register(subparsers)``; imported lazily so `flowbp plan` stays fast.
COMMANDS = (
    "flowbp.commands.plan",
    "flowbp.commands.pretrain",
    "flowbp.commands.train",
    "flowbp.commands.sample",
    "flowbp.commands.bench",
    "flowbp.commands.eval",
    "flowbp.commands.convert_reward",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowbp", description="Reward backpropagation for flow matching.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # a command not built yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"flowbp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
