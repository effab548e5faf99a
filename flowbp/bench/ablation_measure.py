"""The measurements the ablations share: paired gradient fidelity, cost per step, and short training runs.

Gradients: every configuration sees the same batches and, within one method, the same plan draws (the generator of
batch b is seeded by the method's name, not by the swept knob), so a knob's variants are paired by batch *and* by
draw. Training: every configuration runs with the same seeds (initial noise, data order, plan stream, evaluation
set), so configurations are paired by seed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import statistics
import time
from collections.abc import Sequence
from typing import Any

from flowbp.bench.ablation_common import AblationSettings
from flowbp.bench.context import Bench, MethodConfig, seed_of


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", label).strip("_")


def measure_gradients(bench: Bench, s: AblationSettings, configs: Sequence[MethodConfig], tag: str) -> dict[str, Any]:
    """Per batch: the exact gradient of the objective and of the sampler, then every configuration's R draws.

    Returns ``rows`` (label → summary over batches and the raw ``per_batch`` records) for ``s.num_steps``.
    """
    import torch

    from flowbp.diagnostics import cosine, exact_gradient, fidelity, summarize_fidelity

    n = s.num_steps
    sigmas = bench.backbone.sigmas(n)
    per: dict[str, list[Any]] = {c.label: [] for c in configs}
    forwards: dict[str, list[int]] = {c.label: [] for c in configs}
    objective_vs_true = []
    for b in range(s.batches):
        t = time.perf_counter()
        batch_seed = seed_of("ablation-batch", s.seed, b)
        problem = bench.problem(n, s.batch_size, batch_seed)
        exact = exact_gradient(problem)
        true_exact = exact_gradient(bench.true_problem(problem, n, s.batch_size, batch_seed))
        objective_vs_true.append(cosine(exact, true_exact))
        for c in configs:
            gen = torch.Generator().manual_seed(seed_of("ablation-draws", s.seed, n, b, c.method))
            base = c.plan_fn(sigmas)
            seen: list[int] = []

            def plan_fn(g: Any, base: Any = base, seen: list[int] = seen) -> Any:
                plan = base(g)
                seen.append(plan.grad_forwards)
                return plan

            per[c.label].append(fidelity(problem, exact, plan_fn, s.draws, gen, true_exact))
            forwards[c.label].extend(seen)
        bench.log(f"{tag}: gradients batch {b + 1}/{s.batches} ({time.perf_counter() - t:.1f}s)")
    rows = {}
    for c in configs:
        rows[c.label] = {
            "method": c.method,
            "overrides": c.overrides,
            "default": c.default,
            "grad_forwards": statistics.fmean(forwards[c.label]),
            **summarize_fidelity(per[c.label]),
            "per_batch": [dataclasses.asdict(r) for r in per[c.label]],
        }
    return {"num_steps": n, "batches": s.batches, "batch_size": s.batch_size, "draws": s.draws,
            "objective_vs_true_cosine": objective_vs_true, "rows": rows}


def batch_means(row: dict[str, Any], key: str) -> list[float]:
    """One number per batch (mean over its R draws), in batch order: the paired unit of gradient comparisons."""
    if key == "cosine_of_mean":
        return [float(b["cosine_of_mean"]) for b in row["per_batch"]]
    return [statistics.fmean(b[key]) for b in row["per_batch"]]


def measure_cost(bench: Bench, s: AblationSettings, configs: Sequence[MethodConfig], tag: str) -> dict[str, Any]:
    """Bytes saved for backward (two plan draws) and the step / rollout wall time of each configuration."""
    import torch

    from flowbp.diagnostics import saved_bytes, time_step_vs_rollout

    n = s.num_steps
    sigmas = bench.backbone.sigmas(n)
    prompts, noise = bench.batch(s.batch_size, seed_of("ablation-cost", s.seed))
    velocity, loss_fn = bench.velocity(prompts), bench.loss_fn(prompts)
    problem = bench.problem(n, s.batch_size, seed_of("ablation-cost", s.seed))
    # one untimed step first: allocator and kernel caches warm up before any timing
    time_step_vs_rollout(velocity, noise, sigmas, bench.params, loss_fn, configs[0].plan_fn(sigmas),
                         torch.Generator().manual_seed(0), repeats=0, warmup=1)
    rows = {}
    for c in configs:
        gen = torch.Generator().manual_seed(seed_of("ablation-cost-plans", s.seed, c.label))
        plans = [c.plan_fn(sigmas)(gen) for _ in range(2)]
        memory = [saved_bytes(problem, p, torch.Generator().manual_seed(0)) for p in plans]
        timing = time_step_vs_rollout(velocity, noise, sigmas, bench.params, loss_fn, c.plan_fn(sigmas), gen,
                                      repeats=s.cost_repeats, warmup=0)
        rows[c.label] = {
            "grad_forwards": statistics.fmean(p.grad_forwards for p in plans),
            "saved_bytes_surrogate": statistics.fmean(m["surrogate"] for m in memory),
            "saved_bytes_step": statistics.fmean(m["step"] for m in memory),
            **timing.summary(),
            "rollout_s_all": timing.rollout_s,
            "step_s_all": timing.step_s,
        }
        bench.log(f"{tag}: cost {c.label}: {rows[c.label]['saved_bytes_surrogate'] / 2**20:.1f} MiB, "
                  f"step/rollout {rows[c.label]['ratio_median']:.2f}")
    return {"num_steps": n, "batch_size": s.batch_size, "device": str(bench.device), "rows": rows}


def run_trainings(bench: Bench, s: AblationSettings, configs: Sequence[MethodConfig], tag: str,
                  data: dict[str, Any] | None = None) -> dict[str, Any]:
    """``flowbp.train.train`` for every configuration and seed (seed-major, so an interrupted run is balanced).

    Each configuration's knobs go in as ``method_args``; everything else is the default config at the sizes of
    ``s``. Per run only the summary (eval before / after, held-out metrics) and the final training rewards are
    kept. After each seed ``<out>/<tag>.json`` is written with ``data`` (the measurements so far) and the runs so
    far, marked ``partial``: ``--render`` makes tables of an interrupted run from it.
    """
    from flowbp.config import load_config
    from flowbp.train import train

    runs: dict[str, list[dict[str, Any]]] = {c.label: [] for c in configs}
    for seed in range(s.seeds):
        for c in configs:
            run_dir = bench.out / "ablation-training" / tag / slug(c.label) / f"seed{seed}"
            if run_dir.exists():
                shutil.rmtree(run_dir)  # one command regenerates everything: never mix with an old run
            overrides: dict[str, Any] = {
                "method": c.method,
                "method_args": dict(c.overrides),
                "steps": s.train_steps,
                "batch_size": s.train_batch_size,
                "num_inference_steps": s.train_num_steps,
                "eval_samples_per_prompt": s.train_eval_samples,
                "sample_every": 0,
                "checkpoint_every": 0,
                "log_with": "none",
                "output_dir": str(run_dir),
                "device": bench.device.type,
                "progress": False,
                "seed": 42 + seed,
                "plan_seed": 114 + seed,
            }
            if bench.backbone_path:
                overrides["backbone_path"] = str(bench.backbone_path)
            t = time.perf_counter()
            summary = train(load_config(None, overrides))
            history = json.loads((run_dir / "history.json").read_text())
            runs[c.label].append({"seed": seed, "summary": summary,
                                  "train_reward": [h["reward"] for h in history], "seconds": time.perf_counter() - t})
            bench.log(f"{tag}: training {c.label} seed {seed}: eval reward {summary['before']['reward']:.3f} -> "
                      f"{summary['after']['reward']:.3f} ({time.perf_counter() - t:.1f}s)")
        done = {"seeds": list(range(seed + 1)), "reward": bench.default_reward, "runs": runs}
        bench.write(tag, {**(data or {"settings": dataclasses.asdict(s)}), "training": done, "partial": True})
    return {"seeds": list(range(s.seeds)), "reward": bench.default_reward, "runs": runs}


def seed_values(runs: list[dict[str, Any]], key: str) -> list[float]:
    """One number per seed in seed order: the eval-reward gain for ``reward_gain``, else the after-training metric."""
    ordered = sorted(runs, key=lambda r: r["seed"])
    if key == "reward_gain":
        return [r["summary"]["after"]["reward"] - r["summary"]["before"]["reward"] for r in ordered]
    return [float(r["summary"]["after"].get(key, float("nan"))) for r in ordered]


def common_seeds(training: dict[str, Any], labels: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Only the seeds every listed configuration completed (an interrupted run leaves fewer for some)."""
    sets = [{r["seed"] for r in training["runs"].get(label, [])} for label in labels]
    common = set.intersection(*sets) if sets else set()
    return {label: [r for r in training["runs"].get(label, []) if r["seed"] in common] for label in labels}


TRAIN_METRICS = (("reward_gain", True), ("heldout_accuracy", True), ("frechet_distance", False))
