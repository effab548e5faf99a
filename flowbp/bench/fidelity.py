"""Gradient fidelity against exact backprop: every method on the same batches, for each N."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from flowbp.bench.context import Bench, is_deterministic, method_configs, seed_of
from flowbp.bench.report import fmt, md_table, pyplot


def run_gradients(bench: Bench) -> dict[str, Any]:
    """Exact gradient, per-step contributions and every method's fidelity on the same batches, for each N."""
    import torch

    from flowbp.diagnostics import (
        cosine,
        exact_gradient,
        fidelity,
        per_step_contributions,
        summarize,
        summarize_fidelity,
    )

    s = bench.settings
    configs = method_configs(s.sweeps)
    rows: list[dict[str, Any]] = []
    steps_rows: list[dict[str, Any]] = []
    for n in s.num_steps:
        sigmas = bench.backbone.sigmas(n)
        deterministic = {c.label: is_deterministic(c, sigmas) for c in configs}
        per_config: dict[str, list[Any]] = {c.label: [] for c in configs}
        plan_stats: dict[str, list[tuple[int, int]]] = {c.label: [] for c in configs}
        contributions, exact_norms, sum_errors, true_cos = [], [], [], []
        for b in range(s.batches):
            t = time.perf_counter()
            problem = bench.problem(n, s.batch_size, seed_of("batch", s.seed, b))
            exact = exact_gradient(problem)
            true_exact = exact_gradient(bench.true_problem(problem, n, s.batch_size, seed_of("batch", s.seed, b)))
            true_cos.append(cosine(exact, true_exact))
            parts = per_step_contributions(problem, reference=exact)
            sum_errors.append(float((parts.total - exact).norm() / exact.norm()))
            contributions.append(parts)
            exact_norms.append(float(exact.norm()))
            for c in configs:
                gen = torch.Generator().manual_seed(seed_of("draws", s.seed, n, b, c.label))
                draws = 1 if deterministic[c.label] else s.draws
                plan_fn = c.plan_fn(sigmas)
                recorded: list[tuple[int, int]] = []

                def recording(g: Any, plan_fn: Callable = plan_fn, recorded: list = recorded) -> Any:
                    plan = plan_fn(g)
                    recorded.append((plan.grad_forwards, plan.chain_depth))
                    return plan

                per_config[c.label].append(fidelity(problem, exact, recording, draws, gen, true_exact))
                plan_stats[c.label].extend(recorded)
            bench.log(
                f"gradients N={n} batch {b + 1}/{s.batches}: ‖g‖={exact_norms[-1]:.3g}, "
                f"Σ per-step vs exact rel. err {sum_errors[-1]:.1e} ({time.perf_counter() - t:.1f}s)"
            )
        for c in configs:
            stats = plan_stats[c.label]
            rows.append(
                {
                    "num_steps": n,
                    "label": c.label,
                    "method": c.method,
                    "overrides": c.overrides,
                    "default": c.default,
                    "deterministic": deterministic[c.label],
                    "draws": 1 if deterministic[c.label] else s.draws,
                    "grad_forwards": statistics.fmean(f for f, _ in stats),
                    "chain_depth": statistics.fmean(d for _, d in stats),
                    **summarize_fidelity(per_config[c.label]),
                    "per_batch": [dataclasses.asdict(r) for r in per_config[c.label]],
                }
            )
        norms = torch.tensor([p.norms for p in contributions], dtype=torch.float64)  # batches × N
        coss = torch.tensor([p.cosines for p in contributions], dtype=torch.float64)
        share = norms / norms.sum(1, keepdim=True)
        steps_rows.append(
            {
                "num_steps": n,
                "exact_norm": summarize(exact_norms),
                "sum_rel_error_max": max(sum_errors),
                "objective_vs_true_cosine": summarize(true_cos),
                "step_norm": [summarize(norms[:, i].tolist()) for i in range(n)],
                "step_cosine": [summarize(coss[:, i].tolist()) for i in range(n)],
                "step_norm_share": [summarize(share[:, i].tolist()) for i in range(n)],
            }
        )
    return {
        "settings": dataclasses.asdict(s),
        "reward": bench.reward_spec,
        "loss": "linear (−mean w·r)",
        "rows": rows,
        "per_step": steps_rows,
    }


def write_fidelity(bench: Bench, data: dict[str, Any]) -> None:
    s = bench.settings
    parts = [
        "# Gradient fidelity against exact backprop (digits testbed)",
        "",
        f"Reward `{data['reward']}`, loss {data['loss']} with each plan's sample weights; gradient w.r.t. all "
        f"transformer parameters. Exact = full backprop through all N steps (alignprop plan, no checkpointing). "
        f"Batch {s.batch_size}, {s.batches} batches (95% CI over batches), R = {s.draws} draws per batch for "
        "random methods (1 for deterministic ones). cos = mean single-draw cosine; cos(mean) = cosine of the "
        "mean over the R draws (the method's expected direction, i.e. its bias, up to 1/R variance); ratio = "
        "‖ĝ‖/‖g‖ per draw; w = mean sample weight.",
    ]
    for n in s.num_steps:
        rows = [r for r in data["rows"] if r["num_steps"] == n]
        table = [
            [
                ("**" + r["label"] + "**") if r["default"] else r["label"],
                f"{r['grad_forwards']:.3g}",
                f"{r['chain_depth']:.3g}",
                fmt(r["cosine"]),
                fmt(r["cosine_of_mean"]),
                fmt(r["norm_ratio"]),
                f"{r['sample_weight']['mean']:.2f}",
            ]
            for r in rows
        ]
        parts += [
            "",
            f"## N = {n}",
            "",
            md_table(["method (bold: paper default)", "grad fwd", "depth", "cos", "cos(mean)", "ratio", "w"], table),
        ]
    bench.write("fidelity", {k: v for k, v in data.items() if k != "per_step"}, "\n".join(parts))
    plot_fidelity(bench, data)


def plot_fidelity(bench: Bench, data: dict[str, Any]) -> None:
    plt = pyplot()
    s = bench.settings
    n_head = s.headline_steps if s.headline_steps in s.num_steps else s.num_steps[-1]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    for k, r in enumerate(r for r in data["rows"] if r["num_steps"] == n_head):
        c = r["cosine"]
        err = [[c["mean"] - c["ci95_low"]], [c["ci95_high"] - c["mean"]]] if math.isfinite(c["ci95_low"]) else None
        ax.errorbar(r["grad_forwards"], c["mean"], yerr=err, fmt="o", color=f"C{k % 10}", capsize=3)
        ax.annotate(r["label"], (r["grad_forwards"], c["mean"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("grad forwards per step (log)")
    ax.set_ylabel("cosine to exact gradient (single draw)")
    ax.set_title(f"fidelity vs cost, N = {n_head}")
    ax.grid(alpha=0.3)
    ax = axes[1]
    defaults = [r["label"] for r in data["rows"] if r["default"] and r["num_steps"] == s.num_steps[0]]
    for k, label in enumerate(defaults):
        pts = [(r["num_steps"], r["cosine"]) for r in data["rows"] if r["label"] == label]
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1]["mean"] for p in pts], "o-", color=f"C{k % 10}", label=label)
        lo = [p[1]["ci95_low"] for p in pts]
        hi = [p[1]["ci95_high"] for p in pts]
        if all(math.isfinite(v) for v in lo + hi):
            ax.fill_between(xs, lo, hi, color=f"C{k % 10}", alpha=0.12)
    ax.set_xlabel("sampling steps N")
    ax.set_ylabel("cosine to exact gradient")
    ax.set_title("paper defaults as N grows")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(bench.out / "fidelity.png", dpi=110)
    plt.close(fig)
