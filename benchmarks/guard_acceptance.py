"""The reward-hacking guard's acceptance table: independent held-out accuracy at the stop and at the last
checkpoint no guard flagged, for finished digits runs.

The guard judges its own images (seeds ``eval_seed + k``). "Accuracy at the stop" must not be the guard's own
estimate, so this script samples a *fresh* set (``--seed``, default 900000: no overlap with the guard's 2024 + k)
of ``--images-per-prompt`` images per digit prompt (default 100: 1000 images) from

- the run's final weights (EMA; for a stopped run: the stopped model), and
- the checkpoint the guard names as the last one it did not flag (``RUN/guard/last-good``),

and prints one table row per run (markdown), plus a JSON file with everything (``--json``)::

    python benchmarks/guard_acceptance.py RUN_DIR [RUN_DIR ...] [--json guard_acceptance.json]

A run whose config already evaluated its final weights on exactly this set (``eval_seed`` and
``eval_samples_per_prompt`` equal to ``--seed`` / ``--images-per-prompt``) is not sampled twice: its
summary.json's held-out accuracy *is* that evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def heldout_accuracy(run_dir: Path, checkpoint: Path, per_prompt: int, seed: int) -> float:
    """Held-out accuracy of a checkpoint's EMA weights (as the evaluations sample them) on a fresh image set."""
    import torch

    from flowbp.config import load_config
    from flowbp.evaluate import _heldout_correct, generate, plan_keys, to_float
    from flowbp.train import setup
    from flowbp.training.evaluation import eval_model

    config = load_config(run_dir / "config.yaml")
    run = setup(config, run_dir, resume_from=checkpoint)  # builds the components and restores; writes nothing
    prompts = list(run.eval_prompts)
    keys = plan_keys(len(prompts), per_prompt, seed)
    with eval_model(run):
        images = generate(run.backbone, prompts, keys, config.num_inference_steps, config.guidance_scale,
                          config.eval_batch_size)
    correct = _heldout_correct(to_float(torch.stack(images)), [prompts[i] for i, _ in keys])
    return float(correct.mean())


def row(run_dir: Path, per_prompt: int, seed: int) -> dict[str, Any]:
    from flowbp.config import load_config

    summary = json.loads((run_dir / "summary.json").read_text())
    config = load_config(run_dir / "config.yaml")
    record = json.loads((run_dir / "guard" / "guard.json").read_text())
    g = summary["guard"]
    stopped = g["stopped"]
    looks = [e for e in record["evaluations"] if e["step"] > 0]
    flagged = [e for e in looks if e["flagged"]]
    stop_look = flagged[0] if flagged else (looks[-1] if looks else None)
    guard_value = stop_look["metrics"]["heldout-correct"] if stop_look else None
    t0 = time.perf_counter()
    if config.eval_seed == seed and (config.eval_samples_per_prompt or 20) == per_prompt:
        final = float(summary["after"]["heldout_accuracy"])
    else:
        from flowbp.checkpoint import latest_checkpoint

        final = heldout_accuracy(run_dir, latest_checkpoint(run_dir), per_prompt, seed)
    good = g["last_good_checkpoint"]
    if good and good["step"] == summary["steps"]:
        good_acc = final  # the last look was clear: the last unflagged checkpoint is the final one
    else:
        good_acc = heldout_accuracy(run_dir, Path(good["checkpoint"]), per_prompt, seed) if good else None
    return {
        "run": str(run_dir),
        "seed": config.seed,
        "preset_reward": config.reward,
        "steps": config.steps,
        "stopped": bool(stopped),
        "stop_step": stopped["step"] if stopped else None,
        "final_step": summary["steps"],
        "guard_estimate": guard_value["value"] if guard_value else None,
        "guard_upper": guard_value.get("upper") if guard_value else None,
        "guard_n": stop_look["n"] if stop_look else None,
        "independent_final": final,
        "last_good_step": good["step"] if good else None,
        "independent_last_good": good_acc,
        "looks": g.get("looks"),
        "confirm_looks": sum(bool(e.get("confirm")) for e in looks),
        "lowest_guard_estimate": min((e["metrics"]["heldout-correct"]["value"] for e in looks), default=None),
        "guard_seconds": g.get("seconds"),
        "wall_seconds": summary["wall_time_s"],
        "independent_images": 10 * per_prompt,
        "eval_seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--images-per-prompt", type=int, default=100)
    parser.add_argument("--seed", type=int, default=900000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    print("| run | seed | stopped? | at step | guard's estimate (images) | independent acc of the stopped / final "
          "model | last unflagged step | its independent acc | looks (confirm) | guard s | wall s |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for run_dir in args.runs:
        r = row(run_dir, args.images_per_prompt, args.seed)
        rows.append(r)
        est = "–" if r["guard_estimate"] is None else f"{r['guard_estimate']:.3f} ({r['guard_n']})"
        good = "–" if r["independent_last_good"] is None else f"{r['independent_last_good']:.3f}"
        print(
            f"| {run_dir.name} | {r['seed']} | {'yes' if r['stopped'] else 'no'} | "
            f"{r['stop_step'] if r['stopped'] else '–'} | {est} | {r['independent_final']:.3f} | "
            f"{r['last_good_step']} | {good} | {r['looks']} ({r['confirm_looks']}) | {r['guard_seconds']:.0f} | "
            f"{r['wall_seconds']:.0f} |",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
