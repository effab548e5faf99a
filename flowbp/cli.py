"""The ``flowbp`` command line: ``flowbp plan | methods | train | …`` (also ``python -m flowbp``).

Every expected failure is one line on stderr and a non-zero exit; ``--debug`` (anywhere on the
command line) shows the traceback instead.
"""

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
    "flowbp.commands.accelerate_config",
)

#: Exit codes: 2 bad input (argparse's convention too), 1 an unexpected error, 130 Ctrl-C;
#: a training run stopped resumably exits with its own code (128 + signal, or 3 for non-finite steps).
EXIT_BAD_INPUT, EXIT_UNEXPECTED, EXIT_INTERRUPTED = 2, 1, 130


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the default prints the whole usage block first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flowbp", description="Reward backpropagation for flow matching.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors (anywhere on the line)")
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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def main(argv: list[str] | None = None) -> int:
    from flowbp.quiet import quiet_third_party

    quiet_third_party()  # third-party warnings a user cannot act on (only logging is imported)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    from flowbp.training.run import TrainingStopped  # light: no torch import before the command runs

    prefix = f"flowbp {args.command}"
    try:
        return int(args.func(args) or 0)
    except TrainingStopped as exc:  # resumable: the message says how
        print(f"{prefix}: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prefix}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        if debug:
            raise
        print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (OSError, MemoryError, RuntimeError) as exc:
        if debug:
            raise
        # environment failures (disk full, out of memory, a lost process group): still one line
        print(f"{prefix}: error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
