"""Connector deviations d_j, d_0 of LeapAlign and FlowBP-Lagrange (the paper's Figure 7)."""

from __future__ import annotations

import math
from typing import Any

from flowbp.bench.context import DEVIATION_METHODS, Bench, seed_of
from flowbp.bench.report import fmt, md_table, pyplot


def run_deviation(bench: Bench) -> dict[str, Any]:
    """Connector deviations of drawn LeapAlign / Lagrange plans, and a controlled sweep of the leap length."""
    import torch

    from flowbp.diagnostics import connector_deviations, summarize
    from flowbp.methods import make_plan

    s = bench.settings
    n = s.headline_steps
    sigmas = bench.backbone.sigmas(n)
    trajs = []
    with torch.no_grad():
        for b in range(s.deviation_batches):
            prompts, noise = bench.batch(s.batch_size, seed_of("deviation", s.seed, b))
            from flowbp.trajectory import rollout

            trajs.append(rollout(bench.velocity(prompts), noise, sigmas))
    drawn: dict[str, list[dict[str, float]]] = {m: [] for m in DEVIATION_METHODS}
    for method in DEVIATION_METHODS:
        gen = torch.Generator().manual_seed(seed_of("deviation-plans", s.seed, method))
        for t_index, traj in enumerate(trajs):
            for _ in range(s.deviation_draws):
                plan = make_plan(method, sigmas, gen)
                k, j, end = plan.anchors
                dev = connector_deviations(plan, traj)
                tau = plan.similarity_tau
                weight = 1.0 / (dev[j].clamp(min=tau) + dev[end].clamp(min=tau))
                drawn[method].append(
                    {
                        "trajectory": t_index, "k": k, "j": j, "leap_kj": j - k, "leap_jN": end - j,
                        "d_j": float(dev[j].mean()), "d_0": float(dev[end].mean()),
                        "sample_weight": float(weight.mean()),
                    }
                )
    # Controlled sweep: a single connector of length L ending at the endpoint (d_0) or at a fixed bridge node j
    # (d_j), with the leap (LeapAlign's rule) or lagrange(3) (FlowBP-Lagrange's rule).
    j_fixed = n - max(1, round(0.24 * n))  # where Lagrange's Dirichlet(2.5, 6, 2) places j on average
    sweep: dict[str, dict[str, list[dict[str, float]]]] = {}
    for rule in ("leap", "lagrange"):
        sweep[rule] = {"d_0": [], "d_j": []}
        for which, end in (("d_0", n), ("d_j", j_fixed)):
            for length in range(1, end + 1):
                per_batch = []
                for traj in trajs:
                    plan = make_plan(
                        "custom", sigmas, 0, start=end - length, anchors=() if end == n else (end,),
                        weights=(rule,) if end == n else (rule, "leap"), order=3,
                    )
                    per_batch.append(float(connector_deviations(plan, traj)[end].mean()))
                sweep[rule][which].append({"length": length, **summarize(per_batch)})
    bench.log(f"deviation: {len(trajs)} trajectories, {s.deviation_draws} plans each per method")
    return {"num_steps": n, "j_fixed": j_fixed, "drawn": drawn, "summary": deviation_summary(drawn), "sweep": sweep}


def deviation_summary(drawn: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and t-CI per method with the trajectory as the unit: the plans drawn on one trajectory share its
    latents, so they are averaged first (``group_means``) and the CI is over trajectories."""
    from flowbp.stats import group_means, mean_ci

    out = {}
    for method, recs in drawn.items():
        groups = [r.get("trajectory", i) for i, r in enumerate(recs)]
        out[method] = {
            key: mean_ci(group_means([r[key] for r in recs], groups))
            for key in ("d_j", "d_0", "leap_kj", "leap_jN", "sample_weight")
        }
    return out


def write_deviation(bench: Bench, data: dict[str, Any]) -> None:
    n = data["num_steps"]
    rows = []
    data = {**data, "summary": deviation_summary(data["drawn"])}
    for method, summ in data["summary"].items():
        rows.append([method, fmt(summ["leap_kj"], 1), fmt(summ["d_j"], 4), fmt(summ["leap_jN"], 1),
                     fmt(summ["d_0"], 4), fmt(summ["sample_weight"], 2)])
    sweep_rows = []
    by_len = {(rule, which): {p["length"]: p for p in data["sweep"][rule][which]} for rule in data["sweep"]
              for which in ("d_0", "d_j")}
    lengths = sorted({p["length"] for p in data["sweep"]["leap"]["d_0"]})
    shown = [L for L in lengths if L in (1, 2, 3, 4, 6, 8, 10, 12, 15, 20) or L == lengths[-1]]
    for length in shown:
        cells = [length]
        for rule in ("leap", "lagrange"):
            for which in ("d_j", "d_0"):
                p = by_len[(rule, which)].get(length)
                cells.append(f"{p['mean']:.4f}" if p else "")
        sweep_rows.append(cells)
    text = "\n".join(
        [
            f"# Connector deviation (the paper's Figure 7), N = {n}",
            "",
            "d_a = mean |x_a − x̂_a| of the surrogate's connector estimate against the cached latent. d_j: the "
            "connector k → j; d_0: j → N (the clean endpoint, reverse index 0). Drawn plans at the methods' "
            f"defaults ({len(next(iter(data['drawn'].values())))} plans per method; each trajectory's plans are "
            "averaged first, then mean ± Student-t 95% CI over the trajectories):",
            "",
            md_table(["method", "j − k", "d_j", "N − j", "d_0", "sample weight"], rows),
            "",
            f"Controlled sweep: one connector of length L ending at N (d_0) or at j = {data['j_fixed']} (d_j), mean "
            "over trajectories:",
            "",
            md_table(["L", "leap d_j", "leap d_0", "lagrange(3) d_j", "lagrange(3) d_0"], sweep_rows),
        ]
    )
    bench.write("deviation", data, text)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for k, (rule, name) in enumerate((("leap", "leap (LeapAlign)"), ("lagrange", "lagrange(3) (FlowBP-Lagrange)"))):
        for ax, which in zip(axes[:2], ("d_j", "d_0"), strict=True):
            pts = data["sweep"][rule][which]
            xs = [p["length"] for p in pts]
            ax.plot(xs, [p["mean"] for p in pts], "o-", ms=3, color=f"C{k}", label=name)
            lo, hi = [p["ci95_low"] for p in pts], [p["ci95_high"] for p in pts]
            if all(math.isfinite(v) for v in lo + hi):
                ax.fill_between(xs, lo, hi, color=f"C{k}", alpha=0.15)
    axes[0].set_title(f"d_j: connector of length L ending at j = {data['j_fixed']}")
    axes[1].set_title(f"d_0: connector of length L ending at N = {n}")
    for ax in axes[:2]:
        ax.set_xlabel("leap length L (steps)")
        ax.set_ylabel("mean |x − x̂|")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
    ax = axes[2]
    for k, (method, recs) in enumerate(data["drawn"].items()):
        ax.scatter([r["leap_kj"] for r in recs], [r["d_j"] for r in recs], s=6, alpha=0.3, color=f"C{k}",
                   label=f"{method}: d_j vs j − k")
        ax.scatter([r["leap_jN"] for r in recs], [r["d_0"] for r in recs], s=6, alpha=0.3, marker="x",
                   color=f"C{k + 2}", label=f"{method}: d_0 vs N − j")
    ax.set_xlabel("leap length (steps)")
    ax.set_ylabel("deviation")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-4)  # a one-step leap is exact Euler: d ≈ 1e-10 would squash the axis
    ax.set_title("drawn plans (method defaults)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(bench.out / "deviation.png", dpi=110)
    plt.close(fig)
