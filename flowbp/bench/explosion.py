"""Where the exact gradient comes from (per-step split) and how gradient norms grow with N."""

from __future__ import annotations

from typing import Any

from flowbp.bench.context import Bench
from flowbp.bench.report import fmt, md_table, pyplot


def write_explosion(bench: Bench, data: dict[str, Any]) -> None:
    present = [int(p["num_steps"]) for p in data["per_step"]]
    per_step = data["per_step"]
    defaults = [r for r in data["rows"] if r["default"]]
    labels = list(dict.fromkeys(r["label"] for r in defaults))
    header = ["N", "exact ‖g‖", "late 20% share", "early 20% share", "max/min step"]
    rows = []
    for p in per_step:
        n = p["num_steps"]
        share = [x["mean"] for x in p["step_norm_share"]]
        norms = [x["mean"] for x in p["step_norm"]]
        k = max(1, round(0.2 * n))
        rows.append(
            [
                n,
                fmt(p["exact_norm"], 4),
                f"{sum(share[-k:]):.2f}",
                f"{sum(share[:k]):.2f}",
                f"{max(norms) / max(min(norms), 1e-30):.3g}",
            ]
        )
    norm_rows = []
    for label in labels:
        cells = [label]
        for n in present:
            r = next((r for r in data["rows"] if r["label"] == label and r["num_steps"] == n), None)
            cells.append(fmt(r["grad_norm"], 4) if r else "")
        norm_rows.append(cells)
    exact_cells = ["**exact**", *[fmt(p["exact_norm"], 4) for p in per_step]]
    text = "\n".join(
        [
            "# Gradient explosion: where the exact gradient comes from, and how norms grow with N",
            "",
            "g_i = the part of ∂L/∂θ that enters through the θ-dependence of velocity call i, with the full x-chain "
            "kept (Σ_i g_i = exact gradient; largest relative error of that identity here: "
            f"{max(p['sum_rel_error_max'] for p in per_step):.1e}). Share = ‖g_i‖ / Σ_k ‖g_k‖ summed over the "
            "first / last 20% of steps (step 0 = pure noise).",
            "",
            md_table(header, rows),
            "",
            "## Gradient norm ‖ĝ‖ by N (paper defaults; mean ± 95% CI over batches)",
            "",
            md_table(["method", *[f"N = {n}" for n in present]], [exact_cells, *norm_rows]),
        ]
    )
    bench.write("explosion", {"per_step": per_step, "settings": data["settings"]}, text)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for k, p in enumerate(per_step):
        n = p["num_steps"]
        xs = [(i + 0.5) / n for i in range(n)]
        axes[0].plot(xs, [x["mean"] for x in p["step_norm"]], "o-", ms=3, color=f"C{k}", label=f"N = {n}")
        axes[1].plot(xs, [x["mean"] for x in p["step_cosine"]], "o-", ms=3, color=f"C{k}", label=f"N = {n}")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step position i/N (0 = noise, 1 = image)")
    axes[0].set_ylabel("‖g_i‖ (contribution of call i)")
    axes[0].set_title("exact gradient by step")
    axes[1].set_xlabel("step position i/N")
    axes[1].set_ylabel("cos(g_i, g)")
    axes[1].set_title("direction of each step's contribution")
    for ax in axes[:2]:
        ax.legend()
        ax.grid(alpha=0.3)
    ax = axes[2]
    ax.plot(present, [p["exact_norm"]["mean"] for p in per_step], "k*-", ms=10, label="exact")
    for k, label in enumerate(labels):
        pts = [r for r in data["rows"] if r["label"] == label]
        ax.plot([r["num_steps"] for r in pts], [r["grad_norm"]["mean"] for r in pts], "o-", color=f"C{k % 10}",
                label=label)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps N")
    ax.set_ylabel("gradient norm")
    ax.set_title("gradient norm as N grows")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(bench.out / "explosion.png", dpi=110)
    plt.close(fig)
