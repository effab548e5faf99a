"""Sample efficiency: short training runs per method and seed, the same budget for every method."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import time
from typing import Any

from flowbp.bench.context import Bench, method_configs
from flowbp.bench.report import comparison_table, fmt, half, md_table, paired_comparisons, pyplot, smooth


def run_training(bench: Bench) -> dict[str, Any]:
    """Short training runs with ``flowbp.train.train`` per method and seed (same budget for every method)."""
    from flowbp.config import load_config
    from flowbp.train import train

    s = bench.settings
    methods = list(s.train_methods) if s.train_methods else [c.method for c in method_configs(sweeps=False)]
    seeds = list(range(bench.args.seeds))
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    # Seed-major: an interrupted bench still has every method on its first seeds (each run dir is complete).
    for seed in seeds:
        for method in methods:
            run_dir = bench.out / "training" / method / f"seed{seed}"
            if run_dir.exists():
                shutil.rmtree(run_dir)  # one command regenerates everything: never mix with an old run
            overrides: dict[str, Any] = {
                "method": method,
                "steps": s.train_steps,
                "batch_size": s.train_batch_size,
                "num_inference_steps": s.train_num_steps,
                "eval_samples_per_prompt": s.train_eval_samples,
                "sample_every": 0,
                "checkpoint_every": 0,
                "output_dir": str(run_dir),
                "device": bench.device.type,
                "progress": False,
                "seed": 42 + seed,
                "plan_seed": 114 + seed,
            }
            if bench.args.train_reward:
                overrides["reward"] = bench.args.train_reward
            if bench.backbone_path:
                overrides["backbone_path"] = str(bench.backbone_path)
            t = time.perf_counter()
            summary = train(load_config(None, overrides))
            history = json.loads((run_dir / "history.json").read_text())
            runs[method].append({"seed": seed, "summary": summary, "history": history})
            after = summary["after"]
            bench.log(
                f"training {method} seed {seed}: eval reward {summary['before']['reward']:.3f} -> "
                f"{after['reward']:.3f}, held-out acc {after.get('heldout_accuracy', float('nan')):.3f} "
                f"({time.perf_counter() - t:.1f}s)"
            )
    data = {
        "settings": dataclasses.asdict(s),
        "seeds": seeds,
        "reward": bench.args.train_reward or bench.default_reward,
        "runs": runs,
    }
    bench.write("training-runs", data)  # the raw per-seed results: tables can be re-derived from them alone
    return data


def seed_values(runs: list[dict[str, Any]], key: str) -> list[float]:
    """One number per seed, in seed order: the after-training metric, or the eval-reward gain for ``reward_gain``."""
    ordered = sorted(runs, key=lambda r: r["seed"])
    if key == "reward_gain":
        return [r["summary"]["after"]["reward"] - r["summary"]["before"]["reward"] for r in ordered]
    return [float(r["summary"]["after"].get(key, float("nan"))) for r in ordered]


def training_comparisons(data: dict[str, Any], reference: str) -> dict[str, list[dict[str, Any]]]:
    """Paired (over seeds) differences of the gain, held-out accuracy and FD to ``reference`` and among the top 3.

    Only the seeds every method completed are compared (an interrupted bench leaves fewer for some methods).
    """
    common = set.intersection(*({r["seed"] for r in runs} for runs in data["runs"].values()))
    runs = {m: [r for r in rs if r["seed"] in common] for m, rs in data["runs"].items()}
    better = {"reward_gain": True, "heldout_accuracy": True, "frechet_distance": False}
    return {
        key: paired_comparisons({m: seed_values(rs, key) for m, rs in runs.items()}, reference,
                                higher_is_better=up)
        for key, up in better.items()
    }


def real_vs_real_frechet(size: int, repeats: int = 10) -> dict[str, Any]:
    """FD of ``size`` real digits (random subsets of the reward split) against the real test split.

    The same estimator and reference as the evaluation's FD, so it is the floor a perfect generator would
    reach with that many samples (FD is biased upward for small sets).
    """
    import torch

    from flowbp.stats import mean_ci
    from flowbp.testbed.data import load_digits_split, to_rgb
    from flowbp.testbed.heldout_metrics import frechet_distance

    real = to_rgb(load_digits_split("reward")[0])
    gen = torch.Generator().manual_seed(0)
    size = min(size, len(real))
    values = [frechet_distance(real[torch.randperm(len(real), generator=gen)[:size]]) for _ in range(repeats)]
    return {"size": size, "repeats": repeats, "fd": mean_ci(values)}


def write_training(bench: Bench, data: dict[str, Any]) -> None:
    from flowbp.diagnostics import summarize

    s = bench.settings
    window = max(1, min(10, s.train_steps // 4))
    curves: dict[str, dict[str, list[Any]]] = {}
    rows = []
    metric_keys = ("heldout_accuracy", "frechet_distance", "diversity")
    for method, runs in data["runs"].items():
        smoothed = [smooth([h["reward"] for h in r["history"]], window) for r in runs]
        steps = [h["step"] for h in runs[0]["history"]]
        per_step = [summarize(col) for col in zip(*smoothed, strict=True)]
        curves[method] = {"step": steps, "reward": per_step}
        last = summarize(sm[-1] for sm in smoothed)
        after = {
            k: summarize(r["summary"]["after"].get(k, float("nan")) for r in runs) for k in ("reward", *metric_keys)
        }
        before = {k: statistics.fmean(r["summary"]["before"].get(k, float("nan")) for r in runs)
                  for k in ("reward", *metric_keys)}
        gain = summarize(r["summary"]["after"]["reward"] - r["summary"]["before"]["reward"] for r in runs)
        sec = summarize(statistics.fmean(h["seconds"] for h in r["history"]) for r in runs)
        rows.append(
            [method, fmt(last), fmt(after["reward"]), fmt(gain), fmt(after["heldout_accuracy"]),
             fmt(after["frechet_distance"], 2), fmt(after["diversity"]), f"{sec['mean']:.2f}"]
        )
        curves[method]["before"] = before
        curves[method]["after"] = after
    first = next(iter(curves.values()))
    reference = getattr(bench.args, "reference", "leapalign")
    comparisons = training_comparisons(data, reference)
    n_eval = 10 * s.train_eval_samples
    baseline = real_vs_real_frechet(n_eval)
    fd_note = (
        f"The Fréchet distance is computed on {n_eval} samples against the 300 real test digits; "
        + ("" if n_eval >= 200 else "fewer than 200, so it is biased upward: compare it with ")
        + f"the real-vs-real baseline of the same size, {n_eval} real digits of the reward split against the "
        f"same 300 ({baseline['repeats']} random subsets): {fmt(baseline['fd'], 2)}."
    )
    seeds_n = len(data["seeds"])
    text = "\n".join(
        [
            "# Sample efficiency: short training runs, same budget per method",
            "",
            f"`flowbp.train.train` with the default config except: {s.train_steps} steps, batch "
            f"{s.train_batch_size}, N = {s.train_num_steps}, reward `{data['reward']}`; seeds {data['seeds']} "
            f"(mean ± Student-t 95% CI over the {seeds_n} seeds). Evaluation (EMA weights, "
            f"{s.train_eval_samples} samples × 10 prompts, "
            "fixed noise) before and after training; train reward = moving average of the last "
            f"{window} steps' batch reward at the end. Before training: eval reward "
            f"{first['before']['reward']:.3f}, held-out accuracy {first['before']['heldout_accuracy']:.3f}, "
            f"Fréchet distance {first['before']['frechet_distance']:.2f}, diversity "
            f"{first['before']['diversity']:.3f}.",
            "",
            md_table(["method", "train reward (end)", "eval reward", "Δ eval reward", "held-out acc", "FD ↓",
                    "diversity", "s/step"], rows),
            "",
            fd_note,
            "",
            f"Methods share seeds (the same initial noise, data order and evaluation set per seed), so they are "
            f"compared by paired differences over the {seeds_n} seeds, to `{reference}` and between the three "
            "best; * and a verdict only where the 95% CI excludes 0.",
            "",
            "### Δ eval reward (higher is better)",
            "",
            comparison_table(comparisons["reward_gain"], "Δ eval reward"),
            "",
            "### held-out accuracy (higher is better)",
            "",
            comparison_table(comparisons["heldout_accuracy"], "held-out acc"),
            "",
            "### Fréchet distance (lower is better)",
            "",
            comparison_table(comparisons["frechet_distance"], "FD", 2),
        ]
    )
    bench.write("training", {"curves": curves, "comparisons": comparisons, "reference": reference,
                             "frechet_real_vs_real": baseline, **data}, text)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for k, (method, cv) in enumerate(curves.items()):
        xs = cv["step"]
        axes[0].plot(xs, [p["mean"] for p in cv["reward"]], color=f"C{k % 10}", label=method)
        lo, hi = [p["ci95_low"] for p in cv["reward"]], [p["ci95_high"] for p in cv["reward"]]
        if all(math.isfinite(v) for v in lo + hi):
            axes[0].fill_between(xs, lo, hi, color=f"C{k % 10}", alpha=0.15)
        a = cv["after"]
        axes[1].errorbar(
            a["reward"]["mean"], a["heldout_accuracy"]["mean"],
            xerr=half(a["reward"]), yerr=half(a["heldout_accuracy"]), fmt="o", color=f"C{k % 10}", label=method,
            capsize=3,
        )
    axes[1].plot(first["before"]["reward"], first["before"]["heldout_accuracy"], "k*", ms=12, label="before")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel(f"training reward (moving average of {window})")
    axes[0].set_title("training reward (mean ± 95% CI over seeds)")
    axes[1].set_xlabel("eval reward (in-domain)")
    axes[1].set_ylabel("held-out accuracy (independent classifier)")
    axes[1].set_title("after training: reward vs held-out quality")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(bench.out / "training.png", dpi=110)
    plt.close(fig)
