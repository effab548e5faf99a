"""Ablation 2 (the paper's Figure 4): the active-set size K against fidelity, memory and time.

FlowBP-Sparse and -Bridge sweep K (the number of re-forwarded nodes), FlowBP-Lagrange the number of active supports
per segment. Claim: a larger K covers more of the trajectory (here: a gradient closer to the exact one) but costs
memory linearly (bytes saved for backward grow by one network call's activations per active node).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from flowbp.bench.ablation_common import (
    PAPER_K,
    AblationSettings,
    claim_difference,
    errorbar_series,
    k_configs,
    linear_fit,
    linear_verdict,
    mark,
    mark_paper_choice,
)
from flowbp.bench.ablation_measure import batch_means, measure_cost, measure_gradients
from flowbp.bench.context import Bench
from flowbp.bench.report import fmt, md_table, pyplot, signed

NAME = "ablation-k"


def run(bench: Bench, s: AblationSettings) -> dict[str, Any]:
    pairs = k_configs(s)
    configs = [c for c, _ in pairs]
    return {"ablation": NAME, "settings": dataclasses.asdict(s),
            "knob": {c.label: k for c, k in pairs},
            "gradients": measure_gradients(bench, s, configs, NAME),
            "cost": measure_cost(bench, s, configs, NAME)}


def series(data: dict[str, Any]) -> dict[str, list[tuple[int, str]]]:
    """method → [(K, label)] in increasing K."""
    out: dict[str, list[tuple[int, str]]] = {}
    for label, k in data["knob"].items():
        out.setdefault(data["gradients"]["rows"][label]["method"], []).append((int(k), label))
    return {m: sorted(v) for m, v in out.items()}


def analyse(data: dict[str, Any]) -> dict[str, Any]:
    rows, cost = data["gradients"]["rows"], data["cost"]["rows"]
    out: dict[str, Any] = {}
    for method, pts in series(data).items():
        (k_lo, lo), (k_hi, hi) = pts[0], pts[-1]
        steps = [claim_difference(batch_means(rows[b], "cosines"), batch_means(rows[a], "cosines"))
                 for (_, a), (_, b) in itertools.pairwise(pts)]
        fit = linear_fit([k for k, _ in pts], [cost[lab]["saved_bytes_surrogate"] for _, lab in pts])
        out[method] = {
            "k_range": [k_lo, k_hi],
            "cos_largest_minus_smallest": claim_difference(batch_means(rows[hi], "cosines"),
                                                           batch_means(rows[lo], "cosines")),
            "cos_of_mean_largest_minus_smallest": claim_difference(batch_means(rows[hi], "cosine_of_mean"),
                                                                   batch_means(rows[lo], "cosine_of_mean")),
            "cos_step_differences": steps,
            "memory_fit": fit,
            "memory_verdict": linear_verdict(fit) if len(pts) > 1 else "not resolved",
            "step_seconds_fit": linear_fit([k for k, _ in pts], [cost[lab]["step_s"] for _, lab in pts]),
        }
    return out


def claims(analysis: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for method, res in analysis.items():
        d = res["cos_largest_minus_smallest"]
        lo, hi = res["k_range"]
        out.append({"ablation": NAME, "claim": f"{method}: K = {hi} gives a gradient closer to the exact one than "
                    f"K = {lo} (cos)", **{k: d[k] for k in ("mean", "ci95_low", "ci95_high", "n", "verdict")}})
        fit = res["memory_fit"]
        out.append({"ablation": NAME, "claim": f"{method}: bytes saved for backward grow linearly in K "
                    f"({fit['slope'] / 2**20:.2f} MiB per active node, largest residual "
                    f"{100 * fit['max_rel_residual']:.2f}%)", "verdict": res["memory_verdict"]})
    return out


def write(bench: Any, data: dict[str, Any]) -> dict[str, Any]:
    analysis = analyse(data)
    g, cost = data["gradients"], data["cost"]
    table = []
    for pts in series(data).values():
        for k, label in pts:
            r, c = g["rows"][label], cost["rows"][label]
            table.append([("**" + label + "**") if r["default"] else label, k, f"{r['grad_forwards']:.2g}",
                          fmt(r["cosine"]), fmt(r["cosine_of_mean"]), fmt(r["cosine_true"]),
                          f"{c['saved_bytes_surrogate'] / 2**20:.2f}", f"{c['step_s']:.3f}",
                          f"{c['ratio_median']:.2f}"])
    diffs = []
    for method, res in analysis.items():
        d, dm = res["cos_largest_minus_smallest"], res["cos_of_mean_largest_minus_smallest"]
        fit = res["memory_fit"]
        diffs.append([method, f"{res['k_range'][1]} vs {res['k_range'][0]}", signed(d), mark(d["verdict"]),
                      signed(dm), f"{fit['slope'] / 2**20:.2f} MiB/K, resid {100 * fit['max_rel_residual']:.2f}%",
                      mark(res["memory_verdict"]), f"{res['step_seconds_fit']['slope'] * 1000:.1f} ms/K"])
    text = "\n".join([
        "# Ablation 2: active-set size K (the paper's Figure 4)",
        "",
        f"N = {g['num_steps']}, {g['batches']} batches of {g['batch_size']}, R = {g['draws']} draws; K = active "
        "nodes (Sparse, Bridge; Bridge needs K ≥ 2) or active supports per segment (Lagrange, `support_mode=all`, "
        "whose K = 1, 2 are exactly the paper's midpoint rule). cos: mean single-draw cosine to the exact gradient "
        "of the training objective ± 95% CI over batches; saved MiB: activation bytes autograd saves for backward "
        "in the surrogate (mean of two draws; parameters and cached trajectory excluded); step s: median wall time "
        f"of one training step (rollout + surrogate + reward + backward) over {data['settings']['cost_repeats']} "
        "repeats, and its ratio to the no-grad rollout. Bold = paper default.",
        "",
        md_table(["configuration", "K", "grad fwd", "cos", "cos(mean)", "cos (true)", "saved MiB", "step s",
                  "step/rollout"], table),
        "",
        "Largest − smallest K, paired over batches (claim: more coverage, > 0), and the linear fit of saved bytes:",
        "",
        md_table(["method", "K", "Δ cos [95% CI]", "verdict", "Δ cos(mean) [95% CI]", "memory fit", "linear?",
                  "time slope"], diffs, align="llrlrlll"),
    ])
    out = {**data, "analysis": analysis, "claims": claims(analysis)}
    bench.write(NAME, out, text)
    plot(bench, data)
    return out


def plot(bench: Any, data: dict[str, Any]) -> None:
    from flowbp.stats import mean_ci

    plt = pyplot()
    g, cost = data["gradients"], data["cost"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for k, (method, pts) in enumerate(series(data).items()):
        ks = [p[0] for p in pts]
        color = f"C{k}"
        name = method + (" (active supports / segment)" if method == "flowbp-lagrange" else "")
        errorbar_series(axes[0], ks, [mean_ci(batch_means(g["rows"][lab], "cosines")) for _, lab in pts], name, color)
        axes[1].plot(ks, [cost["rows"][lab]["saved_bytes_surrogate"] / 2**20 for _, lab in pts], "o-",
                     color=color, label=name)
        errorbar_series(axes[2], ks, [mean_ci(cost["rows"][lab]["step_s_all"]) for _, lab in pts], name, color)
        for choice in PAPER_K.get(method, ()):
            if min(ks) <= choice <= max(ks):
                for ax in axes:
                    mark_paper_choice(ax, choice + 0.04 * (k - 1), color)
    axes[0].set_ylabel("cos to exact gradient (single draw)")
    axes[1].set_ylabel("MiB saved for backward (surrogate)")
    axes[2].set_ylabel("seconds per training step")
    for ax, title in zip(axes, ("fidelity vs K", "memory vs K", "time vs K"), strict=True):
        ax.set_xlabel("K (active nodes; Lagrange: active supports per segment)")
        ax.set_title(title + " (dotted: paper's choices)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(bench.out / f"{NAME}.png", dpi=100)
    plt.close(fig)
