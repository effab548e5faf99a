"""The fixed-seed evaluation before and after training, and the sample grids (with their tracker images).

The periodic held-out evaluation (``eval_every``) is :func:`flowbp.evaluate.periodic_eval`, the code of ``flowbp eval``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from flowbp.evaluate import EvalResult, evaluate
from flowbp.images import image_grid, save_grid
from flowbp.training.run import Run
from flowbp.training.weights import ema_weights

GRID_SAMPLES_PER_PROMPT = 8
GRID_MAX_PROMPTS = 10  # sample grids show the first prompts of the evaluation set


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


def evaluate_run(run: Run) -> EvalResult:
    """The fixed-seed evaluation; every rank computes the same result (replicated, cheap next to training)."""
    c = run.config
    with eval_model(run):
        return evaluate(
            run.backbone,
            run.reward,
            run.eval_prompts,
            c.eval_samples_per_prompt,
            c.num_inference_steps,
            c.guidance_scale,
            c.eval_seed,
            chunk=c.eval_batch_size,
        )


def save_sample_grid(run: Run, tag: str) -> None:
    c = run.config
    prompts = run.eval_prompts[:GRID_MAX_PROMPTS]
    with eval_model(run):
        result = evaluate(
            run.backbone,
            None,
            prompts,
            GRID_SAMPLES_PER_PROMPT,
            c.num_inference_steps,
            c.guidance_scale,
            c.eval_seed,
            chunk=c.eval_batch_size,
            heldout=False,
        )
    if not run.is_main:
        return
    # one row per prompt
    path = save_grid(result.images, run.run_dir / "samples" / f"{tag}.png", rows=len(prompts))
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
