"""Gradient fidelity against exact backprop: every method on the same batches, for each N."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from flowbp.bench.context import Bench, is_deterministic, method_configs, seed_of
from flowbp.bench.report import comparison_table, fmt, md_table, paired_comparisons, pyplot


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
    rows: list[dict[str, Any]] = []
    steps_rows: list[dict[str, Any]] = []
    # The headline N first, and the rows so far written after each N: an interrupted run still has them.
    for n in sorted(s.num_steps, key=lambda n: n != s.headline_steps):
        # The active-set sweeps run at the headline N only (the other N show how the paper defaults scale).
        # (same labels at every N: a swept method's default row keeps its "(key=value)" label)
        configs = [c for c in method_configs(s.sweeps)
                   if n == s.headline_steps or c.default or c.overrides == {"checkpoint": False}]
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
        partial = {"settings": dataclasses.asdict(s), "reward": bench.reward_spec, "loss": "linear (−mean w·r)",
                   "rows": rows, "per_step": sorted(steps_rows, key=lambda p: p["num_steps"])}
        bench.write("fidelity-partial", partial)
    rows.sort(key=lambda r: r["num_steps"])
    steps_rows.sort(key=lambda p: p["num_steps"])
    return {
        "settings": dataclasses.asdict(s),
        "reward": bench.reward_spec,
        "loss": "linear (−mean w·r)",
        "rows": rows,
        "per_step": steps_rows,
    }


def steps_present(data: dict[str, Any]) -> list[int]:
    """The N values the data holds (an interrupted run may lack the last ones)."""
    return sorted({int(r["num_steps"]) for r in data["rows"]})


def batch_values(row: dict[str, Any], key: str = "cosines") -> list[float]:
    """One number per batch (the i.i.d. unit shared by every method): the mean over the R draws on it."""
    if key == "cosine_of_mean":
        return [float(b["cosine_of_mean"]) for b in row["per_batch"]]
    return [statistics.fmean(b[key]) for b in row["per_batch"]]


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paper defaults of the cheap estimators (AlignProp is the exact gradient itself: cos = 1 by construction)."""
    return [r for r in rows if r["default"] and r["method"] != "alignprop"]


def fidelity_comparisons(data: dict[str, Any], reference: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Paired (over batches) differences of cos and cos(mean) to ``reference`` and between the top methods, per N."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for n in sorted({r["num_steps"] for r in data["rows"]}):
        rows = comparable([r for r in data["rows"] if r["num_steps"] == n])
        out[str(n)] = {
            key: paired_comparisons({r["label"]: batch_values(r, key) for r in rows}, reference)
            for key in ("cosines", "cosine_of_mean")
        }
    return out


def write_fidelity(bench: Bench, data: dict[str, Any]) -> None:
    s = bench.settings
    reference = getattr(bench.args, "reference", "leapalign")
    has_true = all("cosine_true" in r for r in data["rows"])
    objective = [p["objective_vs_true_cosine"]["mean"] for p in data.get("per_step", [])
                 if "objective_vs_true_cosine" in p]
    parts = [
        "# Gradient fidelity against exact backprop (digits testbed)",
        "",
        f"Reward `{data['reward']}`, loss {data['loss']} with each plan's sample weights; gradient w.r.t. all "
        "transformer parameters. **Exact = the gradient of the training objective**: full backprop through all N "
        "steps (alignprop plan, no checkpointing) with the unconditional CFG branch detached, as the paper and "
        "`flowbp train` do. "
        + ("**cos (true)** compares with the plain sampler's true gradient (nothing detached); the training "
           "objective's own cosine to it is " + ", ".join(f"{c:.3f}" for c in objective) + f" for N = "
           f"{', '.join(str(n) for n in steps_present(data))}. " if has_true and objective else "")
        + f"Batch {s.batch_size}, {s.batches} batches (Student-t 95% CI over batches), R = {s.draws} draws per "
        "batch for random methods (1 for deterministic ones). cos = mean single-draw cosine; cos(mean) = cosine "
        "of the mean over the R draws (the method's expected direction, i.e. its bias, up to 1/R variance); "
        "ratio = ‖ĝ‖/‖g‖ per draw; w = mean sample weight. Every method sees the same batches, so methods are "
        f"compared by paired differences over batches (to `{reference}` and between the three best); a "
        "difference is marked * and a method ranked above another only where its 95% CI excludes 0.",
    ]
    comparisons = fidelity_comparisons(data, reference)
    for n in steps_present(data):
        rows = [r for r in data["rows"] if r["num_steps"] == n]
        body = [
            [
                ("**" + r["label"] + "**") if r["default"] else r["label"],
                f"{r['grad_forwards']:.3g}",
                f"{r['chain_depth']:.3g}",
                fmt(r["cosine"]),
                fmt(r["cosine_of_mean"]),
                fmt(r["norm_ratio"]),
                f"{r['sample_weight']['mean']:.2f}",
                *([fmt(r["cosine_true"])] if has_true else []),
            ]
            for r in rows
        ]
        header = ["method (bold: paper default)", "grad fwd", "depth", "cos", "cos(mean)", "ratio", "w"]
        parts += [
            "",
            f"## N = {n}",
            "",
            md_table(header + (["cos (true)"] if has_true else []), body),
            "",
            f"Paired differences over the {s.batches} batches (paper defaults):",
            "",
            comparison_table(comparisons[str(n)]["cosines"], "cos"),
            "",
            comparison_table(comparisons[str(n)]["cosine_of_mean"], "cos(mean)"),
        ]
    payload = {k: v for k, v in data.items() if k != "per_step"}
    payload["reference"] = reference
    payload["comparisons"] = comparisons
    bench.write("fidelity", payload, "\n".join(parts))
    plot_fidelity(bench, data)


def plot_fidelity(bench: Bench, data: dict[str, Any]) -> None:
    plt = pyplot()
    s = bench.settings
    present = steps_present(data)
    n_head = s.headline_steps if s.headline_steps in present else present[-1]
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
    defaults = [r["label"] for r in data["rows"] if r["default"] and r["num_steps"] == present[0]]
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
