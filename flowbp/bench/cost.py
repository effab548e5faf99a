"""Cost per training step: grad forwards, Jacobian depth, bytes saved for backward, step / rollout time."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from flowbp.bench.context import Bench, method_configs, seed_of
from flowbp.bench.report import fmt, md_table


def run_cost(bench: Bench) -> dict[str, Any]:
    """Grad forwards, chain depth, bytes saved for backward and step / rollout wall time, per method and N."""
    import torch

    from flowbp.diagnostics import saved_bytes, time_step_vs_rollout

    s = bench.settings
    # Same rows and labels as the fidelity tables (so the headline can join them); without sweeps only the paper
    # defaults and the exact reference.
    configs = [c for c in method_configs(True) if s.cost_sweeps or c.default or c.overrides == {"checkpoint": False}]
    rows = []
    prompts, noise = bench.batch(s.batch_size, seed_of("cost", s.seed))
    velocity, loss_fn = bench.velocity(prompts), bench.loss_fn(prompts)
    for n in s.cost_steps:
        sigmas = bench.backbone.sigmas(n)
        problem = bench.problem(n, s.batch_size, seed_of("cost", s.seed))
        # one untimed step first: allocator and kernel caches warm up before any timing
        time_step_vs_rollout(velocity, noise, sigmas, bench.params, loss_fn, configs[0].plan_fn(sigmas),
                             torch.Generator().manual_seed(0), repeats=0, warmup=1)
        for c in configs:
            gen = torch.Generator().manual_seed(seed_of("cost-plans", s.seed, n, c.label))
            plans = [c.plan_fn(sigmas)(gen) for _ in range(4)]
            memory = [saved_bytes(problem, p, torch.Generator().manual_seed(0)) for p in plans[:2]]
            timing = time_step_vs_rollout(velocity, noise, sigmas, bench.params, loss_fn, c.plan_fn(sigmas), gen,
                                          repeats=s.cost_repeats, warmup=0)
            rows.append(
                {
                    "num_steps": n,
                    "label": c.label,
                    "method": c.method,
                    "default": c.default,
                    "grad_forwards": statistics.fmean(p.grad_forwards for p in plans),
                    "chain_depth": statistics.fmean(p.chain_depth for p in plans),
                    "checkpoint": any(p.checkpoint for p in plans),
                    "saved_bytes_surrogate": statistics.fmean(m["surrogate"] for m in memory),
                    "saved_bytes_step": statistics.fmean(m["step"] for m in memory),
                    **timing.summary(),
                    "rollout_s_all": timing.rollout_s,
                    "step_s_all": timing.step_s,
                }
            )
            bench.log(
                f"cost N={n} {c.label}: ratio {rows[-1]['ratio_median']:.2f} "
                f"(step {rows[-1]['step_s']:.2f}s / rollout {rows[-1]['rollout_s']:.2f}s), "
                f"{rows[-1]['saved_bytes_surrogate'] / 2**20:.1f} MiB"
            )
    return {"settings": dataclasses.asdict(s), "batch_size": s.batch_size, "device": str(bench.device), "rows": rows}


def write_cost(bench: Bench, data: dict[str, Any]) -> None:
    s = bench.settings
    parts = [
        "# Cost per training step",
        "",
        f"Batch {s.batch_size} (×2 for CFG), device {data['device']}. Saved = bytes autograd saves for backward "
        "(parameters and cached trajectory excluded): the surrogate's re-forwards, and the whole step (+ decode, "
        "reward, loss). With gradient checkpointing (†) only the calls' inputs count, plus one call recomputed "
        "at a time during backward. Time ratio = wall time of one training step (rollout + surrogate + reward + "
        "backward, no optimiser) / wall time of the no-grad rollout, measured alternately in the same run "
        f"({s.cost_repeats} pairs; median, and mean ± 95% CI).",
    ]
    for n in s.cost_steps:
        rows = []
        for r in (r for r in data["rows"] if r["num_steps"] == n):
            ci = {"mean": r["ratio_mean"], "ci95_low": r["ratio_ci95_low"], "ci95_high": r["ratio_ci95_high"]}
            rows.append(
                [
                    ("**" + r["label"] + "**") if r["default"] else r["label"],
                    f"{r['grad_forwards']:.3g}",
                    f"{r['chain_depth']:.3g}",
                    f"{r['saved_bytes_surrogate'] / 2**20:.2f}" + (" †" if r["checkpoint"] else ""),
                    f"{r['saved_bytes_step'] / 2**20:.2f}",
                    f"{r['ratio_median']:.2f}",
                    fmt(ci, 2),
                ]
            )
        parts += ["", f"## N = {n}", "",
                  md_table(["method", "grad fwd", "depth", "saved MiB (surrogate)", "saved MiB (step)",
                          "time ratio (median)", "time ratio (mean ± CI)"], rows)]
    bench.write("cost", data, "\n".join(parts))


def write_headline(bench: Bench, fid: dict[str, Any] | None, cost: dict[str, Any] | None) -> None:
    """Fidelity + cost of the paper defaults at the headline N (needs both sections)."""
    if fid is None or cost is None:
        return
    n = bench.settings.headline_steps
    frows = {r["label"]: r for r in fid["rows"] if r["num_steps"] == n}
    crows = {r["label"]: r for r in cost["rows"] if r["num_steps"] == n}
    labels = [label for label in frows if label in crows]
    if not labels:
        return
    rows = []
    for label in labels:
        f, c = frows[label], crows[label]
        rows.append(
            [
                ("**" + label + "**") if f["default"] else label,
                f"{c['grad_forwards']:.3g}",
                f"{c['chain_depth']:.3g}",
                fmt(f["cosine"]),
                fmt(f["cosine_of_mean"]),
                fmt(f["norm_ratio"], 2),
                f"{f['sample_weight']['mean']:.2f}",
                f"{c['saved_bytes_surrogate'] / 2**20:.2f}" + (" †" if c["checkpoint"] else ""),
                f"{c['ratio_median']:.2f}",
                *([fmt(f["cosine_true"])] if "cosine_true" in f else []),
            ]
        )
    has_true = all("cosine_true" in frows[label] for label in labels)
    s = bench.settings
    text = "\n".join(
        [
            f"# Headline: fidelity and cost at N = {n} (digits testbed)",
            "",
            "cos / cos(mean) / ratio against the exact gradient of the training objective (full backprop, "
            "unconditional CFG branch detached) of the same loss on the same batch "
            f"(mean ± Student-t 95% CI over {s.batches} batches of {s.batch_size}; R = {s.draws}); "
            + ("cos (true) against the sampler's true gradient (nothing detached); " if has_true else "")
            + "saved = activation MiB of "
            "the surrogate († gradient checkpointing: inputs only); time = training step / no-grad rollout; w = mean "
            "sample weight (similarity weights scale ‖ĝ‖ by about w).",
            "",
            md_table(["method", "grad fwd", "depth", "cos", "cos(mean)", "‖ĝ‖/‖g‖", "w", "saved MiB", "time ×rollout",
                      *(["cos (true)"] if has_true else [])], rows),
        ]
    )
    bench.write("headline", {"num_steps": n, "labels": labels}, text)
