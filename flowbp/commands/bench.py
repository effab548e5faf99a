"""``flowbp bench``: gradient fidelity, explosion, connector deviation, cost and sample efficiency of every method.

On the digits testbed the exact full-backprop gradient is cheap, so every registered method (at the paper's
defaults, plus active-set sweeps) is measured against the truth on the same batches:

- ``fidelity``  cosine of a single draw and of the mean over R draws (bias), norm ratio ‖ĝ‖/‖g‖, against the
  training objective's exact gradient (CFG's unconditional branch detached) and the sampler's true gradient;
  Student-t 95% CIs over batches and paired differences to a reference method, for N ∈ {10, 25, 50};
- ``explosion`` the exact gradient split by step and every method's gradient norm as N grows;
- ``deviation`` connector deviations d_j and d_0 of LeapAlign and FlowBP-Lagrange against the leap length;
- ``cost``      grad forwards, Jacobian chain depth, bytes saved for backward, and the wall time of a training
  step divided by that of the no-grad rollout (interleaved, same run);
- ``training``  training reward and held-out metrics of short training runs per method over several seeds,
  with paired differences to the reference method (methods share seeds);
- ``ablations`` the paper's four ablations (``ablation-input``, ``ablation-k``, ``ablation-alpha``,
  ``ablation-leap``; each can run on its own): every claim marked holds / fails / not resolved by a paired
  interval. Run only when named in ``--only``.

Every table is written as Markdown and JSON, every figure as PNG, into ``--out``; ``headline.md`` holds the
fidelity + cost table at N = 25. ``--quick`` shrinks everything to run in minutes on two CPU cores.
The logic lives in :mod:`flowbp.bench`; this module is the command line.
"""

from __future__ import annotations

import argparse
import sys

from flowbp.bench.ablation_common import ABLATIONS
from flowbp.bench.context import SECTIONS

#: everything ``--only`` accepts: the method-comparison sections, then the paper's ablations (not run by default)
ONLY_CHOICES = (*SECTIONS, "ablations", *ABLATIONS)


def run(args: argparse.Namespace) -> int:
    from flowbp.bench.runner import run as run_bench

    return run_bench(args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes on two CPU cores")
    p.add_argument("--render", action="store_true",
                   help="only re-write the tables and plots from the JSON already in --out (nothing recomputed)")
    p.add_argument("--out", default="bench-results", help="output folder for tables and plots (default bench-results)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per method (default 3)")
    p.add_argument("--only", action="append", choices=ONLY_CHOICES, metavar="SECTION",
                   help=f"run only this section (repeatable): {', '.join(ONLY_CHOICES)}. Without --only: the "
                   f"method sections ({', '.join(SECTIONS)}); the ablations (docs/ablations.md) run only when named")
    p.add_argument("--ablation-seeds", type=int, default=None,
                   help="training seeds of the input and α ablations (default 5; quick 2)")
    p.add_argument("--ablation-methods", default=None, metavar="A,B,...",
                   help="ablations: only these methods in each sweep (default: all; splits a run over processes "
                   "without changing its numbers)")
    p.add_argument("--merge-from", action="append", metavar="DIR",
                   help="with --render: first merge the ablation JSON of DIR (a run split by --ablation-methods) "
                   "into --out (repeatable)")
    p.add_argument("--no-ablation-training", action="store_true",
                   help="ablations: gradients, cost and deviations only, no sample-efficiency runs")
    p.add_argument("--reference", default="leapalign",
                   help="method every other one is compared with, paired over batches / seeds (default leapalign)")
    p.add_argument("--reward", default=None,
                   help="reward of the gradient sections (default: the training config's default reward)")
    p.add_argument("--train-reward", default=None,
                   help="reward of the training section (default: the training config's default reward; note that "
                   "digit-alignment alone has no headroom on the shipped model)")
    p.add_argument("--train-methods", default=None, metavar="A,B,...",
                   help="methods of the training section (default: every method; --quick: four)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps per run (default 100; quick 25)")
    p.add_argument("--train-batch-size", type=int, default=None, help="training batch (default 16; quick 8)")
    p.add_argument("--train-num-steps", type=int, default=None,
                   help="sampling steps N in training (default 25; quick 10)")
    p.add_argument("--train-eval-samples", type=int, default=None,
                   help="evaluation samples per prompt, 10 prompts (default 20; quick 4)")
    p.add_argument("--backbone-path", default=None,
                   help="digits flow-model directory (default: the weights shipped with flowbp)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU: fastest and stable for this tiny model)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="gradient fidelity, memory and cost of every method vs exact backprop",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """Entry point without the ``flowbp`` CLI (``benchmarks/bench.py``)."""
    parser = argparse.ArgumentParser(prog="bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
