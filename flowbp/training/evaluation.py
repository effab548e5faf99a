"""The fixed-seed evaluation before and after training, and the sample grids (with their tracker images).

The periodic held-out evaluation (``eval_every``) is :func:`flowbp.evaluate.periodic_eval`, the code of ``flowbp eval``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from flowbp.evaluate import EvalResult, estimate_seconds, eval_size, evaluate, format_duration
from flowbp.images import image_grid, save_grid
from flowbp.training.run import Run
from flowbp.training.weights import ema_weights

GRID_SAMPLES_PER_PROMPT = 8
GRID_MAX_PROMPTS = 10  # sample grids show the first prompts of the evaluation set


def grid_size(run: Run) -> tuple[int, int]:
    """(prompts, images per prompt) of a sample grid: never larger than the evaluation itself, so that a real
    backbone's default grid costs what its default evaluation does (8 × 2), and digits' stays 10 × 8."""
    return min(GRID_MAX_PROMPTS, len(run.eval_prompts)), min(GRID_SAMPLES_PER_PROMPT, eval_size(run.config)[1])


@contextlib.contextmanager
def eval_model(run: Run) -> Iterator[None]:
    """EMA weights, and the unwrapped model for DDP (its forward would otherwise sync buffers)."""
    with ema_weights(run):
        if run.accelerator.distributed_type.value == "FSDP":
            yield  # FSDP2 gathers shards inside forward: every rank runs the same evaluation
            return
        run.backbone.transformer = run.model
        try:
            yield
        finally:
            run.backbone.transformer = run.prepared


def evaluate_run(run: Run, when: str = "before training") -> EvalResult:
    """The fixed-seed evaluation; every rank computes the same result (replicated, cheap next to training).

    Announced first on the main process (images, sampling steps, an estimate from one timed model call) and
    shown with a progress bar; a stop request ends it between batches (``flowbp.stop.StopRequested``).
    """
    c = run.config
    per_prompt = eval_size(c)[1]
    n = len(run.eval_prompts) * per_prompt
    with eval_model(run):
        # every rank times the same model call: under FSDP a forward is a collective (weights are gathered)
        seconds = estimate_seconds(run.backbone, run.eval_prompts, n, c.num_inference_steps, c.guidance_scale,
                                   c.eval_batch_size)
        if run.is_main:
            skip = "; eval_at_start: false skips this one" if when == "before training" else ""
            print(
                f"flowbp train: evaluation {when}: {n} images ({len(run.eval_prompts)} prompts × {per_prompt}), "
                f"{c.num_inference_steps} sampling steps, about {format_duration(seconds)} (size: eval_max_prompts, "
                f"eval_samples_per_prompt{skip})",
                file=sys.stderr,
                flush=True,
            )
        return evaluate(
            run.backbone,
            run.reward,
            run.eval_prompts,
            per_prompt,
            c.num_inference_steps,
            c.guidance_scale,
            c.eval_seed,
            chunk=c.eval_batch_size,
            progress=c.progress and run.is_main,
            desc=f"evaluation {when}",
        )


def grid_caption(run: Run, tag: str) -> str:
    """What a grid shows, in words: before / during / after training, which weights, how sampled."""
    c = run.config
    weights = "EMA weights" if c.ema else "trained weights"
    if tag == "step-000000":
        when = "BEFORE training (step 0, base weights)"
    elif tag == "final":
        when = f"AFTER training (step {run.step}, {weights})"
    else:
        when = f"during training (step {run.step} of {c.steps}, {weights})"
    guidance = "default guidance" if c.guidance_scale is None else f"guidance {c.guidance_scale:g}"
    return f"{when} · {c.method} on {c.backbone} · {c.num_inference_steps} steps, {guidance}, seed {c.eval_seed}"


def save_sample_grid(run: Run, tag: str) -> None:
    """A labelled grid (prompt per row, caption naming before / after) of the first evaluation prompts; the same
    prompts and noise at every step, so grids of one run compare image by image."""
    c = run.config
    rows, cols = grid_size(run)
    prompts = run.eval_prompts[:rows]
    with eval_model(run):
        result = evaluate(
            run.backbone,
            None,
            prompts,
            cols,
            c.num_inference_steps,
            c.guidance_scale,
            c.eval_seed,
            chunk=c.eval_batch_size,
            heldout=False,
        )
    if not run.is_main:
        return
    # one row per prompt, labelled
    path = save_grid(result.images, run.run_dir / "samples" / f"{tag}.png", rows=len(prompts), row_labels=prompts,
                     col_labels=[f"sample {k + 1}" for k in range(cols)], caption=grid_caption(run, tag))
    log_image(run, f"samples/{tag.split('-')[0]}", result.images, path, rows=len(prompts))


def log_image(run: Run, key: str, images: torch.Tensor, path: Path, rows: int) -> None:
    """Send a sample grid to every tracker in the form it takes (TensorBoard, wandb images; MLflow file)."""
    grid = image_grid(images, rows=rows)
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({key: grid[None]}, step=run.step, dataformats="NHWC")
        elif tracker.name == "mlflow":
            tracker.log_artifact(str(path), "samples")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({key: [grid]}, step=run.step)
