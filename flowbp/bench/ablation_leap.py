"""Ablation 4 (the paper's Figure 7): connector deviation against the leap length, leap vs Lagrange quadrature.

One connector of length L = j − k ends at the clean endpoint N (d_0) or at a fixed bridge node j (d_j); its estimate
uses one velocity (the leap: LeapAlign's connector) or lagrange(3) (FlowBP-Lagrange's). No model call is needed
beyond the rollouts (the surrogate's forward value uses only cached velocities). The unit is the trajectory (one
sample of a rollout batch: its own noise and prompt), so leap and Lagrange are paired per trajectory. Claim:
quadrature keeps the connector closer over long leaps (d_leap − d_lagrange > 0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from flowbp.bench.ablation_common import AblationSettings, claim_difference, combine, mark
from flowbp.bench.context import DEVIATION_METHODS, Bench, seed_of
from flowbp.bench.report import md_table, pyplot, signed

NAME = "ablation-leap"
RULES = ("leap", "lagrange")
DRAWS_PER_TRAJECTORY_BATCH = 32


def j_node(n: int) -> int:
    """The fixed bridge node of the d_j sweep: where Lagrange's Dirichlet(2.5, 6, 2) places j on average."""
    return n - max(1, round(0.24 * n))


def run(bench: Bench, s: AblationSettings) -> dict[str, Any]:
    import torch

    from flowbp.diagnostics import connector_deviations
    from flowbp.methods import make_plan
    from flowbp.trajectory import rollout

    n = s.num_steps
    sigmas = bench.backbone.sigmas(n)
    trajs = []
    with torch.no_grad():
        for b in range(s.leap_batches):
            prompts, noise = bench.batch(s.batch_size, seed_of("ablation-leap", s.seed, b))
            trajs.append(rollout(bench.velocity(prompts), noise, sigmas))
    j_fixed = j_node(n)
    sweep: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rule in RULES:
        sweep[rule] = {"d_0": [], "d_j": []}
        for which, end in (("d_0", n), ("d_j", j_fixed)):
            for length in range(1, end + 1):
                plan = make_plan("custom", sigmas, 0, start=end - length, anchors=() if end == n else (end,),
                                 weights=(rule,) if end == n else (rule, "leap"), order=3)
                values = torch.cat([connector_deviations(plan, t)[end] for t in trajs]).tolist()
                sweep[rule][which].append({"length": length, "values": values})
    # the methods' own drawn plans, averaged per trajectory (the plans drawn on one trajectory share its latents)
    drawn: dict[str, dict[str, list[float]]] = {}
    for method in DEVIATION_METHODS:
        gen = torch.Generator().manual_seed(seed_of("ablation-leap-plans", s.seed, method))
        acc = {key: [] for key in ("d_j", "d_0", "leap_kj", "leap_jN")}
        for t in trajs:
            per = {key: torch.zeros(t.latents.shape[1], dtype=torch.float64) for key in acc}
            for _ in range(DRAWS_PER_TRAJECTORY_BATCH):
                plan = make_plan(method, sigmas, gen)
                k, j, end = plan.anchors
                dev = connector_deviations(plan, t)
                per["d_j"] += dev[j].cpu()
                per["d_0"] += dev[end].cpu()
                per["leap_kj"] += j - k
                per["leap_jN"] += end - j
            for key in acc:
                acc[key].extend((per[key] / DRAWS_PER_TRAJECTORY_BATCH).tolist())
        drawn[method] = acc
    bench.log(f"{NAME}: {len(trajs) * s.batch_size} trajectories, lengths 1..{n}")
    return {"ablation": NAME, "settings": dataclasses.asdict(s), "num_steps": n, "j_fixed": j_fixed,
            "trajectories": len(trajs) * s.batch_size, "draws_per_trajectory": DRAWS_PER_TRAJECTORY_BATCH,
            "sweep": sweep, "drawn": drawn}


def analyse(data: dict[str, Any]) -> dict[str, Any]:
    """Per length: both rules' mean ± CI over trajectories and the paired leap − Lagrange difference.

    "Long" leaps are the upper half of each sweep's lengths (L > max / 2); the claim holds for a deviation when it
    holds at every long length, fails when it fails at any.
    """
    from flowbp.stats import mean_ci

    out: dict[str, Any] = {}
    for which in ("d_0", "d_j"):
        leap = {p["length"]: p["values"] for p in data["sweep"]["leap"][which]}
        lag = {p["length"]: p["values"] for p in data["sweep"]["lagrange"][which]}
        longest = max(leap)
        per_length = []
        for length in sorted(leap):
            d = claim_difference(leap[length], lag[length])
            per_length.append({"length": length, "leap": mean_ci(leap[length]), "lagrange": mean_ci(lag[length]),
                               "ratio": _ratio(leap[length], lag[length]), "leap_minus_lagrange": d})
        long = [p for p in per_length if p["length"] > longest / 2]
        out[which] = {"per_length": per_length, "long_lengths": [p["length"] for p in long],
                      "verdict": combine([p["leap_minus_lagrange"]["verdict"] for p in long])}
    drawn = data["drawn"]
    a, b = DEVIATION_METHODS
    out["drawn"] = {
        "summary": {m: {k: mean_ci(v) for k, v in drawn[m].items()} for m in drawn},
        **{f"{key}: {a} − {b}": claim_difference(drawn[a][key], drawn[b][key]) for key in ("d_j", "d_0")},
    }
    return out


def _ratio(a: list[float], b: list[float]) -> float:
    mb = sum(b) / len(b)
    return (sum(a) / len(a)) / mb if mb > 0 else math.inf


def claims(analysis: dict[str, Any], n: int, j_fixed: int) -> list[dict[str, Any]]:
    out = []
    for which, end in (("d_0", n), ("d_j", j_fixed)):
        res = analysis[which]
        lo = min(res["long_lengths"]) if res["long_lengths"] else None
        out.append({"ablation": NAME, "claim": f"Lagrange quadrature keeps {which} (connector ending at {end}) "
                    f"closer than the leap for every long leap (L = {lo}..{max(res['long_lengths'], default=lo)})",
                    "verdict": res["verdict"]})
    return out


def write(bench: Any, data: dict[str, Any]) -> dict[str, Any]:
    from flowbp.bench.report import fmt

    analysis = analyse(data)
    n, j_fixed = data["num_steps"], data["j_fixed"]
    rows = []
    by = {w: {p["length"]: p for p in analysis[w]["per_length"]} for w in ("d_0", "d_j")}
    for length in sorted(by["d_0"]):
        cells: list[Any] = [length]
        for which in ("d_j", "d_0"):
            p = by[which].get(length)
            if p is None:
                cells += ["", "", "", ""]
                continue
            d = p["leap_minus_lagrange"]
            cells += [fmt(p["leap"], 4), fmt(p["lagrange"], 4), signed(d, 4), d["verdict"]]
        rows.append(cells)
    drawn = analysis["drawn"]
    drows = [[m, fmt(v["leap_kj"], 1), fmt(v["d_j"], 4), fmt(v["leap_jN"], 1), fmt(v["d_0"], 4)]
             for m, v in drawn["summary"].items()]
    a, b = DEVIATION_METHODS
    text = "\n".join([
        "# Ablation 4: connector deviation over leap length (the paper's Figure 7)",
        "",
        f"N = {n}; {data['trajectories']} trajectories (each sample of a rollout batch is one: its own noise and "
        "prompt). d = mean |x − x̂| of one connector of length L ending at the endpoint N (d_0) or at the fixed bridge "
        f"node j = {j_fixed} (d_j), estimated with one velocity (leap, LeapAlign) or lagrange(3) (FlowBP-Lagrange). "
        "Mean ± 95% CI over trajectories; leap − Lagrange paired per trajectory (> 0: Lagrange closer, the claim).",
        "",
        md_table(["L", "leap d_j", "lagrange d_j", "leap − lagrange d_j", "verdict",
                  "leap d_0", "lagrange d_0", "leap − lagrange d_0", "verdict"], rows, align="lrrrlrrrl"),
        "",
        f"Claim over long leaps (L > max/2): d_0 {mark(analysis['d_0']['verdict'])}, "
        f"d_j {mark(analysis['d_j']['verdict'])}.",
        "",
        f"The methods' own drawn plans ({data['draws_per_trajectory']} per rollout batch, averaged per trajectory; "
        "mean ± 95% CI over trajectories):",
        "",
        md_table(["method", "j − k", "d_j", "N − j", "d_0"], drows),
        "",
        f"Paired per trajectory, {a} − {b}: d_j {signed(drawn[f'd_j: {a} − {b}'], 4)} "
        f"({drawn[f'd_j: {a} − {b}']['verdict']}), d_0 {signed(drawn[f'd_0: {a} − {b}'], 4)} "
        f"({drawn[f'd_0: {a} − {b}']['verdict']}).",
    ])
    out = {**data, "analysis": analysis, "claims": claims(analysis, n, j_fixed)}
    bench.write(NAME, out, text)
    plot(bench, data, analysis)
    return out


def plot(bench: Any, data: dict[str, Any], analysis: dict[str, Any]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    names = {"leap": "leap (LeapAlign)", "lagrange": "lagrange(3) (FlowBP-Lagrange)"}
    for ax, which in zip(axes[:2], ("d_j", "d_0"), strict=True):
        pts = analysis[which]["per_length"]
        xs = [p["length"] for p in pts]
        for k, rule in enumerate(RULES):
            ys = [p[rule]["mean"] for p in pts]
            err = [[p[rule]["mean"] - p[rule]["ci95_low"] for p in pts],
                   [p[rule]["ci95_high"] - p[rule]["mean"] for p in pts]]
            ok = all(math.isfinite(e) for e in err[0] + err[1])
            ax.errorbar(xs, ys, yerr=err if ok else None, fmt="o-", ms=3, capsize=2, color=f"C{k}",
                        label=names[rule])
        if analysis[which]["long_lengths"]:
            ax.axvspan(min(analysis[which]["long_lengths"]) - 0.5, max(xs) + 0.5, color="0.9", zorder=0,
                       label="long leaps (claim tested)")
        ax.set_yscale("log")
        ax.set_xlabel("leap length L = j − k (steps)")
        ax.set_ylabel("mean |x − x̂|")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"d_j: connector ending at j = {data['j_fixed']}", fontsize=10)
    axes[1].set_title(f"d_0: connector ending at N = {data['num_steps']}", fontsize=10)
    ax = axes[2]
    for k, which in enumerate(("d_j", "d_0")):
        pts = analysis[which]["per_length"]
        xs = [p["length"] for p in pts]
        ys = [p["ratio"] for p in pts]
        ax.plot(xs, ys, "o-", ms=3, color=f"C{k + 2}", label=f"{which}: leap / lagrange")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("leap length L (steps)")
    ax.set_ylabel("ratio of mean deviations")
    ax.set_title("how much closer quadrature stays (> 1: Lagrange closer)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle("Connector deviation vs leap length (Fig. 7): mean ± 95% CI over trajectories", fontsize=10)
    fig.tight_layout()
    fig.savefig(bench.out / f"{NAME}.png", dpi=100)
    plt.close(fig)
