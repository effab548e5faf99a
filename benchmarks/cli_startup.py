"""Start-up time of the command line: `flowbp --help` and typo errors, median of 5 runs each.

    python benchmarks/cli_startup.py                 # this checkout
    python benchmarks/cli_startup.py --root ../main  # another checkout, for a before/after pair
    python benchmarks/cli_startup.py --only "flowbp --help" --only "method typo"

Each command runs as ``python -X importtime -m flowbp ...`` in a fresh process with ``PYTHONPATH``
set to the checkout, so the figure is the whole time a user waits: interpreter start, imports,
parsing, validation and the one-line error. Wall time depends on what else the machine runs; the
CPU time (user + sys of the child) much less, so both are printed. The last column lists the heavy
modules (torch, diffusers, transformers, ...) the process imported, read from the importtime log.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "flowbp --help": ["--help"],
    "flowbp train --help": ["train", "--help"],
    "method typo": ["train", "--set", "method=flowbp-lagrang"],
    "reward typo": ["train", "--set", "reward=hpsv2+0.5*pickscor"],
    "config key typo": ["train", "--set", "lerning_rate=1e-4"],
}
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft")


def run_once(root: Path, args: list[str]) -> tuple[float, float, int, str]:
    """Wall seconds, CPU seconds (user + sys), exit code and stderr of one ``python -m flowbp ARGS``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-X", "importtime", "-m", "flowbp", *args]
    with tempfile.TemporaryDirectory() as cwd:  # a command that got past validation would write here, not in root
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode, proc.stderr


def heavy_imports(stderr: str) -> list[str]:
    """Top-level heavy packages in ``-X importtime`` output (lines ``import time: self | cumulative | name``)."""
    names = {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    return [h for h in HEAVY if h in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="checkout to measure (default: this one)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (the median is reported)")
    parser.add_argument("--only", action="append", choices=list(COMMANDS), help="measure only these commands")
    args = parser.parse_args()
    root = args.root.resolve()
    print(f"checkout: {root}   python: {sys.version.split()[0]}   repeats: {args.repeats}   load: "
          f"{os.getloadavg()[0]:.1f}")
    print("| command | wall median s | wall min s | wall max s | CPU median s | exit | heavy modules imported |")
    print("|---|---:|---:|---:|---:|---:|---|", flush=True)
    for label, cmd in COMMANDS.items():
        if args.only and label not in args.only:
            continue
        times, cpus, code, err = [], [], 0, ""
        for _ in range(args.repeats):
            seconds, cpu, code, err = run_once(root, cmd)
            times.append(seconds)
            cpus.append(cpu)
        heavy = ", ".join(heavy_imports(err)) or "none"
        print(f"| {label} | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} | "
              f"{statistics.median(cpus):.2f} | {code} | {heavy} |", flush=True)


if __name__ == "__main__":
    main()
