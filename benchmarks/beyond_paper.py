"""Single-draw cosine to the exact gradient: new plan families against FlowBP-Lagrange, paired over batches.

The same measurement as ``flowbp bench --only fidelity`` (digits testbed, full-transformer gradient, loss
−mean w·r, exact = full backprop of the training objective), on batches drawn from a seed *tag* of your
choice, so that a design chosen on one set of batches can be reported on batches it never saw::

    python benchmarks/beyond_paper.py --tag design --steps 25 --batches 6 --draws 4
    python benchmarks/beyond_paper.py --tag report --steps 10 25 50 --batches 8 --draws 8 --out result.json

Prints one table per N: grad forwards, chain depth, single-draw cosine (mean ± 95% t CI over batches),
cos(mean over draws), and the paired difference of the single-draw cosine to FlowBP-Lagrange.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

CANDIDATES: dict[str, tuple[str, dict[str, Any]]] = {
    "flowbp-lagrange": ("flowbp-lagrange", {}),
    "leapalign": ("leapalign", {}),
    "coarse-leap": ("coarse-leap", {}),
    "coarse-leap (index)": ("coarse-leap", {"placement": "index"}),
    "coarse-leap (stratified)": ("coarse-leap", {"placement": "stratified"}),
    "coarse-leap (K=3)": ("coarse-leap", {"num_active": 3}),
    "coarse-leap (K=2)": ("coarse-leap", {"num_active": 2}),
    "coarse-leap (alpha=0.5)": ("coarse-leap", {"alpha": 0.5}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="report", help="seed tag of the batches (the bench uses its own)")
    parser.add_argument("--steps", type=int, nargs="+", default=[25])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--reward", default="digit-alignment")
    parser.add_argument("--only", nargs="*", default=None, help="candidate labels (default: all)")
    parser.add_argument("--reference", default="flowbp-lagrange")
    parser.add_argument("--out", default=None, help="write every number as JSON here")
    args = parser.parse_args()

    import torch

    from flowbp.bench.context import Bench, MethodConfig, Settings, is_deterministic, seed_of
    from flowbp.diagnostics import exact_gradient, fidelity
    from flowbp.stats import mean_ci, paired_difference

    ns = argparse.Namespace(out="/tmp/flowbp-beyond-paper", device="cpu", reward=args.reward,
                            backbone_path=None, quick=True)
    bench = Bench(ns, Settings())
    labels = args.only or list(CANDIDATES)
    results: dict[str, Any] = {"args": vars(args), "rows": {}}
    for n in args.steps:
        sigmas = bench.backbone.sigmas(n)
        per: dict[str, list[Any]] = {label: [] for label in labels}
        for b in range(args.batches):
            t = time.perf_counter()
            problem = bench.problem(n, args.batch_size, seed_of("beyond-paper", args.tag, b))
            exact = exact_gradient(problem)
            for label in labels:
                method, overrides = CANDIDATES[label]
                config = MethodConfig(method, overrides)
                draws = 1 if is_deterministic(config, sigmas) else args.draws
                gen = torch.Generator().manual_seed(seed_of("beyond-paper-draws", args.tag, n, b, label))
                per[label].append(fidelity(problem, exact, config.plan_fn(sigmas), draws, gen))
            print(f"N={n} batch {b + 1}/{args.batches} ({time.perf_counter() - t:.1f}s)", flush=True)
        ref = [r.cosine for r in per[args.reference]]
        print(f"\n## N = {n}  ({args.batches} batches of {args.batch_size}, tag {args.tag!r}, reward {args.reward})\n")
        print("| method | grad fwd | depth | cos | cos(mean) | cos − " + args.reference + " (paired) |")
        print("|---|---:|---:|---:|---:|---:|")
        rows = {}
        for label in labels:
            method, overrides = CANDIDATES[label]
            plan = MethodConfig(method, overrides).plan_fn(sigmas)(torch.Generator().manual_seed(0))
            cos = [r.cosine for r in per[label]]
            c, cm = mean_ci(cos), mean_ci([r.cosine_of_mean for r in per[label]])
            d = paired_difference(cos, ref)
            star = " *" if d["significant"] else ""
            diff = "—" if label == args.reference else (
                f"{d['mean']:+.3f} [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}]{star}")
            print(f"| {label} | {plan.grad_forwards} | {plan.chain_depth} | {c['mean']:.3f} ± {c['half']:.3f} | "
                  f"{cm['mean']:.3f} ± {cm['half']:.3f} | {diff} |")
            rows[label] = {"cos": c, "cos_of_mean": cm, "vs_reference": d, "per_batch": cos,
                           "grad_forwards": plan.grad_forwards, "chain_depth": plan.chain_depth,
                           "norm_ratio": statistics.fmean(r.norm_ratio for r in per[label])}
        results["rows"][str(n)] = rows
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
