"""Ablation 1 (the paper's Table 4): posterior-mean vs endpoint-faithful reward input for ReFL and DRTune.

The endpoint-faithful variant is the same plan (same draw of τ / m and of the active set) plus the final connector:
the reward scores the real sample x_N while the gradient still flows through the plan's leap (DESIGN 3.2).
Claim: endpoint-faithful input helps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flowbp.bench.ablation_common import (
    AblationSettings,
    claim_difference,
    errorbar_series,
    input_configs,
    mark,
)
from flowbp.bench.ablation_measure import (
    TRAIN_METRICS,
    batch_means,
    common_seeds,
    measure_gradients,
    run_trainings,
    seed_values,
)
from flowbp.bench.context import Bench
from flowbp.bench.report import fmt, md_table, pyplot, signed

NAME = "ablation-input"
GRADIENT_METRICS = (("cosines", "cos (objective)"), ("cosines_true", "cos (true)"),
                    ("cosine_of_mean", "cos(mean)"), ("norm_ratios", "‖ĝ‖/‖g‖"))


def run(bench: Bench, s: AblationSettings) -> dict[str, Any]:
    configs = input_configs(s)
    data: dict[str, Any] = {"ablation": NAME, "settings": dataclasses.asdict(s),
                            "gradients": measure_gradients(bench, s, configs, NAME)}
    if s.train:
        bench.write(NAME, {**data, "partial": True})  # an interrupted run keeps its gradients
        data["training"] = run_trainings(bench, s, configs, NAME, data)
    return data


def labels(method: str) -> tuple[str, str]:
    return f"{method} (reward_input=posterior_mean)", f"{method} (reward_input=endpoint)"


def analyse(data: dict[str, Any]) -> dict[str, Any]:
    """Per method: endpoint − posterior mean, paired by batch (gradients) and by seed (training), with verdicts."""
    s = data["settings"]
    rows = data["gradients"]["rows"]
    out: dict[str, Any] = {}
    for method in s["input_methods"]:
        pm, ep = labels(method)
        grad = {key: claim_difference(batch_means(rows[ep], key), batch_means(rows[pm], key))
                for key, _ in GRADIENT_METRICS}
        res: dict[str, Any] = {"gradients": grad}
        if "training" in data:
            runs = common_seeds(data["training"], [pm, ep])
            if runs[pm]:
                res["training"] = {key: claim_difference(seed_values(runs[ep], key), seed_values(runs[pm], key), up)
                                   for key, up in TRAIN_METRICS}
                res["training_seeds"] = len(runs[pm])
        out[method] = res
    return out


def claims(analysis: dict[str, Any]) -> list[dict[str, Any]]:
    """One claim per method and evidence: the objective-gradient cosine, and the eval-reward gain in training."""
    out = []
    for method, res in analysis.items():
        out.append({"ablation": NAME, "claim": f"{method}: endpoint-faithful input gives a gradient closer to the "
                    "exact one (cos, objective)", **_pick(res["gradients"]["cosines"])})
        if "training" in res:
            out.append({"ablation": NAME, "claim": f"{method}: endpoint-faithful input trains better "
                        "(Δ eval reward)", **_pick(res["training"]["reward_gain"])})
    return out


def _pick(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in ("mean", "ci95_low", "ci95_high", "n", "verdict")}


def write(bench: Any, data: dict[str, Any]) -> dict[str, Any]:
    analysis = analyse(data)
    s, g = data["settings"], data["gradients"]
    rows = []
    for label, r in g["rows"].items():
        rows.append([("**" + label + "**") if r["default"] else label, f"{r['grad_forwards']:.2g}",
                     fmt(r["cosine"]), fmt(r["cosine_true"]), fmt(r["cosine_of_mean"]), fmt(r["norm_ratio"], 2)])
    diff_rows = []
    for method, res in analysis.items():
        for key, name in GRADIENT_METRICS:
            d = res["gradients"][key]
            diff_rows.append([method, name, signed(d, 3), mark(d["verdict"])])
    parts = [
        "# Ablation 1: reward-model input (the paper's Table 4)",
        "",
        f"N = {g['num_steps']}, {g['batches']} batches of {g['batch_size']}, R = {g['draws']} plan draws per batch "
        "shared by the two inputs (the same τ / m and active set), gradient w.r.t. all transformer parameters, loss "
        "−mean(r) of the training reward. cos (objective): against the exact gradient of the training objective "
        "(CFG's unconditional branch detached); cos (true): against the plain sampler's gradient. Mean ± Student-t "
        "95% CI over batches; bold = paper default (posterior mean).",
        "",
        md_table(["configuration", "grad fwd", "cos (objective)", "cos (true)", "cos(mean)", "‖ĝ‖/‖g‖"], rows),
        "",
        "Endpoint − posterior mean, paired over the batches (draws shared); claim: endpoint-faithful helps "
        "(> 0 supports it):",
        "",
        md_table(["method", "metric", "endpoint − posterior mean [95% CI]", "verdict"], diff_rows, align="llrl"),
    ]
    if "training" in data:
        t = data["training"]
        parts += ["", f"Sample efficiency: `flowbp.train.train` with the default config except {s['train_steps']} "
                  f"steps, batch {s['train_batch_size']}, N = {s['train_num_steps']}, {s['train_eval_samples']} "
                  f"evaluation samples × 10 prompts; reward `{t['reward']}`; seeds {t['seeds']} shared by every "
                  "configuration. Mean ± 95% CI over seeds:", ""]
        trows = []
        for label, runs in t["runs"].items():
            if not runs:
                continue
            vals = {key: seed_values(runs, key) for key, _ in TRAIN_METRICS}
            trows.append([label, len(runs), *[_ci(vals[k], {"frechet_distance": 2, "reward_gain": 5}.get(k, 3))
                                              for k, _ in TRAIN_METRICS]])
        parts.append(md_table(["configuration", "seeds", "Δ eval reward", "held-out acc", "FD ↓"], trows))
        prow = []
        for method, res in analysis.items():
            for key, up in TRAIN_METRICS:
                if "training" in res:
                    d = res["training"][key]
                    prow.append([method, key + ("" if up else " (lower is better: posterior − endpoint)"),
                                 signed(d, {"frechet_distance": 2, "reward_gain": 5}.get(key, 3)),
                                 mark(d["verdict"])])
        parts += ["", "Paired over seeds (> 0: endpoint better):", "",
                  md_table(["method", "metric", "difference [95% CI]", "verdict"], prow, align="llrl")]
    out = {**data, "analysis": analysis, "claims": claims(analysis)}
    bench.write(NAME, out, "\n".join(parts))
    plot(bench, data)
    return out


def _ci(values: list[float], digits: int) -> str:
    from flowbp.stats import mean_ci

    return fmt(mean_ci(values), digits)


def plot(bench: Any, data: dict[str, Any]) -> None:
    from flowbp.stats import mean_ci

    plt = pyplot()
    s, rows = data["settings"], data["gradients"]["rows"]
    panels = [("cosines", "cos to exact (objective)"), ("cosines_true", "cos to exact (true)"),
              ("norm_ratios", "‖ĝ‖ / ‖g‖")]
    if "training" in data:
        panels += [("reward_gain", "Δ eval reward (training)"), ("frechet_distance", "FD after training ↓")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8))
    xs = [0, 1]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for k, method in enumerate(s["input_methods"]):
            pm, ep = labels(method)
            if key in ("reward_gain", "frechet_distance"):
                runs = common_seeds(data["training"], [pm, ep])
                if not runs[pm]:
                    continue
                cis = [mean_ci(seed_values(runs[lab], key)) for lab in (pm, ep)]
            else:
                cis = [mean_ci(batch_means(rows[lab], key)) for lab in (pm, ep)]
            errorbar_series(ax, xs, cis, method, f"C{k}", offset=0.06 * (k - 0.5))
        ax.set_xticks(xs, ["posterior mean\n(paper default)", "endpoint\n(FlowBP's choice)"])
        ax.set_xlim(-0.4, 1.4)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Reward-model input (Table 4): mean ± 95% CI (batches for gradients, seeds for training)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(bench.out / f"{NAME}.png", dpi=100)
    plt.close(fig)
