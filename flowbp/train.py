"""The training recipe: any registered method on any backbone, data-parallel through accelerate.

One optimizer step: draw the global batch's prompts and noise and the method's plan → per micro-batch
(this rank's shard): cached no-grad rollout → the surrogate → decode → reward → loss → backward
(accelerate: DDP / FSDP2 gradient sync, gradient accumulation) → non-finite guard → clip → AdamW →
LR schedule → EMA. Method and backbone meet only here, through the engine; neither knows the other.

Randomness (DESIGN 3.5.7), per stream:

- ``plan``: seeded identically on every rank and drawn once per optimizer step (shared by its
  micro-batches): every rank builds the same surrogate and makes the same number of model calls.
- ``data``: seeded identically on every rank; every rank draws the *global* batch's prompts and noise
  and keeps its own shard, so a run gives the same samples on 1, 2 or 64 processes and with any
  gradient accumulation (the global batch is ``batch_size``).
- ``renoise`` (DRaFT-LV's extra noise) and torch's global generator: each rank's own, seeded by rank.

Every rank's streams are saved in each checkpoint (``rng-rank<R>.safetensors``) and restored to that
rank. Only the main process writes files.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from flowbp import _testing_hooks as hooks
from flowbp import guard, stop
from flowbp.checkpoint import atomic_write_text, clean_temporaries
from flowbp.config import TrainConfig, load_config, save_config, validate_against_components
from flowbp.evaluate import check_eval_plan, eval_scorers, eval_size, periodic_eval
from flowbp.images import plot_curves
from flowbp.stats import mean_ci
from flowbp.training.accelerator import any_rank, make_accelerator, start_trackers
from flowbp.training.checkpoints import RESUMABLE_CHANGES, open_run, restore, save_run_checkpoint
from flowbp.training.components import (
    apply_speed_and_offload,
    build_backbone,
    build_reward,
    eval_prompt_set,
    make_generators,
    make_optimizer,
    make_scheduler,
    make_trainable,
    training_prompts,
)
from flowbp.training.evaluation import (
    GRID_MAX_PROMPTS,
    GRID_SAMPLES_PER_PROMPT,
    eval_model,
    evaluate_run,
    save_sample_grid,
)
from flowbp.training.run import Run, TrainingStopped, default_run_dir
from flowbp.training.signals import stop_on_signals
from flowbp.training.step import log_step, plan_digest, train_step
from flowbp.training.weights import ema_weights, save_weights

__all__ = [  # the public names of flowbp.train (the components live in flowbp.training)
    "GRID_MAX_PROMPTS",
    "GRID_SAMPLES_PER_PROMPT",
    "RESUMABLE_CHANGES",
    "Run",
    "TrainingStopped",
    "build_backbone",
    "build_reward",
    "default_run_dir",
    "ema_weights",
    "eval_model",
    "finish",
    "make_accelerator",
    "make_generators",
    "make_optimizer",
    "make_scheduler",
    "make_trainable",
    "plan_digest",
    "setup",
    "train",
    "train_step",
]


def setup(config: TrainConfig, run_dir: Path | None = None, resume_from: Path | None = None) -> Run:
    """Validate, build every component, and only then create (or reopen) the run directory.

    ``resume_from`` is a verified checkpoint directory to restore (``None``: a fresh run, which
    requires ``run_dir`` to be absent or empty unless it is being restarted by :func:`train`).
    """
    from diffusers.training_utils import EMAModel

    validate_against_components(config)
    run_dir = Path(run_dir or config.output_dir or default_run_dir(config))
    accelerator = make_accelerator(config, run_dir)
    fsdp2 = accelerator.distributed_type.value == "FSDP"  # (prepare may report MULTI_CPU on the CPU test route)
    if fsdp2 and config.finetune == "lora":
        from flowbp.memory_modes import check_fsdp2

        check_fsdp2(config.base_quantization)  # before anything is built or written
    shards = accelerator.num_processes * config.gradient_accumulation_steps
    if config.batch_size % shards:
        raise ValueError(
            f"batch_size: {config.batch_size} (the global batch) is not divisible by num_processes "
            f"({accelerator.num_processes}) × gradient_accumulation_steps ({config.gradient_accumulation_steps})"
        )
    backbone = build_backbone(config, accelerator.device)
    reward = build_reward(config, accelerator.device)
    prompts = training_prompts(config, backbone)
    backbone.encode_prompts(prompts)  # fail early on prompts the backbone cannot encode
    # the evaluations must be able to run before the run folder exists: their size against the held-out metrics
    # (e.g. digits' diversity needs two images of a class), and the periodic metrics' weights
    eval_prompts = eval_prompt_set(config, backbone)
    check_eval_plan(config.backbone, eval_prompts, eval_size(config)[1])
    if config.eval_every or config.guard:  # the guard's looks score with the same scorers
        eval_scorers(config, backbone.name, reward, accelerator.device)
    if fsdp2 and config.offload in ("base", "all"):
        raise ValueError(f"offload: {config.offload!r} streams the base from the CPU; FSDP2 shards it (use one)")
    model = make_trainable(config, backbone, accelerator.num_processes if fsdp2 else 1)
    apply_speed_and_offload(config, backbone, reward, accelerator.device)  # offload, compile (after the LoRA)
    optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    prepared, optimizer = accelerator.prepare(model, optimizer)
    model = accelerator.unwrap_model(prepared)
    # collected after prepare: FSDP2 replaces the parameters by sharded DTensors
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    scheduler = make_scheduler(config, optimizer)
    backbone.transformer = prepared
    ema = EMAModel(list(parameters.values()), decay=config.ema_decay) if config.ema else None
    run = Run(
        config=config,
        run_dir=run_dir,
        accelerator=accelerator,
        backbone=backbone,
        model=model,
        prepared=prepared,
        reward=reward,
        prompts=prompts,
        eval_prompts=eval_prompts,
        parameters=parameters,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        generators=make_generators(config, accelerator.process_index),
        sigmas=backbone.sigmas(config.num_inference_steps),
        guard=guard.make_guard(config),
    )
    if resume_from is not None:
        restore(run, resume_from)
    elif run.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / ".config.yaml.tmp"
        save_config(config, tmp)
        atomic_write_text(run_dir / "config.yaml", tmp.read_text())
        tmp.unlink()
    accelerator.wait_for_everyone()
    return run


def train(
    config: TrainConfig | None = None, resume: str | Path | None = None, stop_after: int | None = None
) -> dict[str, Any] | None:
    """Run (or resume) training; returns the summary, or ``None`` when stopped early by ``stop_after``.

    ``resume`` is a run directory: its saved ``config.yaml`` and latest checkpoint are used; a run
    killed before its first checkpoint starts over from step 0 with the same config and seeds.
    ``stop_after`` ends the run after that many total steps without finishing it (for tests and for
    splitting a run across jobs); it is then resumed with ``resume``.
    Raises :class:`TrainingStopped` after checkpointing on SIGTERM / SIGINT or too many non-finite steps.
    """
    from tqdm.auto import tqdm

    start_time = time.time()
    ckpt = None
    if resume is not None:
        config, run_dir, ckpt = open_run(resume)
        run = setup(config, run_dir, resume_from=ckpt)
        if run.is_main:
            for gone in clean_temporaries(run_dir):
                print(f"flowbp train: removed {gone.name} left by an interrupted checkpoint write", file=sys.stderr)
            if ckpt is None:
                print(
                    f"flowbp train: {run_dir} has no checkpoint yet (killed before the first one); "
                    "starting it over from step 0 with its saved config and seeds",
                    file=sys.stderr,
                )
            else:
                print(f"flowbp train: resuming {run_dir} from {ckpt.name}", file=sys.stderr)
    else:
        config = config or load_config()
        run_dir = Path(config.output_dir or default_run_dir(config))
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(
                f"output_dir: {run_dir} exists and is not empty (choose another, or resume it with --resume)"
            )
        run = setup(config, run_dir)
        if run.is_main:  # printed once the folder exists (a failing command never names one)
            print(f"run directory: {run_dir}", flush=True)
    c = run.config
    if c.trackers():
        flat = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in c.to_dict().items()}
        # a resumed run logs again from the step after its checkpoint's (from 1 when it starts over)
        purge = run.step + 1 if resume is not None else None
        start_trackers(run.accelerator, c, run_dir, flat if ckpt is None else None, purge)
    ended = False
    try:
        with stop_on_signals(run):
            return _loop(run, start_time, stop_after, tqdm, fresh=resume is None)
    except TrainingStopped as exc:
        if getattr(exc, "before_first_step", False) and resume is None and run.is_main:
            run.accelerator.end_training()  # closes the TensorBoard files before the folder goes
            ended = True
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if not ended:
            run.accelerator.end_training()


def _signal_name(run: Run) -> str:
    return signal.Signals(run.stop_signal).name if run.stop_signal else "a signal on another rank"


def _stop_with_checkpoint(run: Run) -> TrainingStopped:
    """Checkpoint the last completed step and say how to resume (the signal arrived during or after it)."""
    c = run.config
    path = save_run_checkpoint(run)
    return TrainingStopped(
        f"stopped by {_signal_name(run)} after step {run.step} of {c.steps}; checkpoint written to {path}; "
        f"resume with: flowbp train --resume {run.run_dir}",
        exit_code=128 + (run.stop_signal or signal.SIGTERM),
    )


def _stop_before_training(run: Run, signum: int, fresh: bool) -> TrainingStopped:
    """A signal during the evaluation before step 1: nothing was trained; a fresh run's folder is removed."""
    name = signal.Signals(signum).name
    if fresh:
        what = f"nothing was trained, so {run.run_dir} was removed (run the same command again to start over)"
    else:
        what = f"nothing was trained; resume with: flowbp train --resume {run.run_dir}"
    stopped = TrainingStopped(
        f"stopped by {name} during the evaluation before the first training step; {what}",
        exit_code=128 + signum,
    )
    stopped.before_first_step = True  # type: ignore[attr-defined]
    return stopped


def _loop(
    run: Run, start_time: float, stop_after: int | None, tqdm: Any, fresh: bool = False
) -> dict[str, Any] | None:
    c = run.config
    if not run.before and not c.eval_at_start:
        run.before = {"summary": None, "per_sample": {}}  # no "before": the summary has no paired change
    if not run.before:
        try:
            before = evaluate_run(run, "before training")
            save_sample_grid(run, "step-000000")
        except stop.StopRequested as exc:
            raise _stop_before_training(run, exc.signum, fresh) from None
        run.before = {
            "summary": before.summary(),
            "per_sample": {"reward": before.rewards.tolist(), **{k: v.tolist() for k, v in before.per_sample.items()}},
        }
    try:  # the guard's step-0 baseline (also with eval_at_start: false)
        guard.on_start(run)
    except stop.StopRequested as exc:
        raise _stop_before_training(run, exc.signum, fresh) from None
    bar = tqdm(
        total=c.steps,
        initial=run.step,
        disable=not (c.progress and run.is_main),
        desc=f"{c.method}",
        unit="step",
        dynamic_ncols=True,
    )
    try:
        while run.step < c.steps and not guard.stopped(run):
            record = train_step(run)
            kept: dict[str, Any] = {}
            if c.eval_every and run.step % c.eval_every == 0:
                try:  # the held-out evaluation of `flowbp eval`, into history.json
                    record["eval"] = periodic_eval(run, keep=kept)
                except stop.StopRequested:
                    kept = {"interrupted": True}  # a signal during it: the stop below checkpoints this step
            if guard.due(run) and "interrupted" not in kept:
                try:  # the guard's own look (its cadence; reuses the periodic evaluation's images when they match)
                    record["guard"] = guard.on_step(run, save_run_checkpoint, kept)
                except stop.StopRequested:
                    pass
            log_step(run, record)
            if guard.stopped(run):
                break  # finish now: checkpoint, final evaluation, weights, summary saying why
            hooks.after_step(run)
            bar.update(1)
            recent = [h for h in run.history[-10:] if not h["skipped"]]
            if recent:
                bar.set_postfix(
                    reward=f"{sum(h['reward'] for h in recent) / len(recent):.4f}",
                    loss=f"{sum(h['loss'] for h in recent) / len(recent):.4f}",
                    skipped=run.skipped,
                )
            if run.consecutive_skips >= c.max_consecutive_skips:
                path = save_run_checkpoint(run)
                raise TrainingStopped(
                    f"training stopped at step {run.step}: {run.consecutive_skips} consecutive steps had a non-finite "
                    f"reward, loss or gradient norm ({run.skipped} skipped in all; max_consecutive_skips = "
                    f"{c.max_consecutive_skips}); the last good weights are checkpointed at {path}; see "
                    "history.json in the checkpoint state. Check the reward and lower learning_rate in a new run",
                    exit_code=3,
                )
            if any_rank(run.accelerator, run.stop_signal is not None) and run.step < c.steps:
                raise _stop_with_checkpoint(run)
            if c.sample_every and run.step % c.sample_every == 0 and run.step < c.steps:
                try:
                    save_sample_grid(run, f"step-{run.step:06d}")
                except stop.StopRequested:
                    raise _stop_with_checkpoint(run) from None
            if c.checkpoint_every and run.step % c.checkpoint_every == 0 and run.step < c.steps:
                save_run_checkpoint(run)
            if stop_after is not None and run.step >= stop_after and run.step < c.steps:
                return None
    finally:
        bar.close()
    return finish(run, start_time)


# ----------------------------------------------------------------------------- finish
def finish(run: Run, start_time: float) -> dict[str, Any]:
    """Final checkpoint, then evaluation, weights, curves, history.json and — last — summary.json.

    The checkpoint comes first, so a run interrupted anywhere in here resumes straight into
    ``finish`` again; summary.json is written atomically and last, so its presence means finished.
    """
    c = run.config
    save_run_checkpoint(run)
    hooks.kill_point("final-eval", run.step)
    try:
        after = evaluate_run(run, "after training")
        save_sample_grid(run, "final")
    except stop.StopRequested as exc:
        raise TrainingStopped(
            f"stopped by {signal.Signals(exc.signum).name} during the final evaluation (step {run.step} of "
            f"{c.steps} is checkpointed); resume with: flowbp train --resume {run.run_dir} (it evaluates again "
            "and finishes)",
            exit_code=128 + exc.signum,
        ) from None
    summary: dict[str, Any] = {
        "method": c.method,
        "backbone": c.backbone,
        "reward": c.reward,
        "steps": run.step,
        "skipped_steps": run.skipped,
        "num_processes": run.accelerator.num_processes,
        "wall_time_s": time.time() - start_time,
        "eval_samples": len(after.prompts),
        "before": run.before["summary"],
        "after": after.summary(),
        "reward_improvement": None,  # eval_at_start: false has nothing to pair with
    }
    guard.on_finish(run, summary)
    if run.before["summary"] is not None:
        before_rewards = torch.tensor(run.before["per_sample"]["reward"], dtype=torch.float64)
        summary["reward_improvement"] = _paired(before_rewards, after.rewards)
        for key, values in after.per_sample.items():
            prior = torch.tensor(run.before["per_sample"][key], dtype=torch.float64)
            summary[f"{key}_change"] = _paired(prior, values)
    save_weights(run)
    if run.is_main:
        steps = [h["step"] for h in run.history]
        nan = float("nan")
        plot_curves(
            run.run_dir / "reward_curve.png",
            steps,
            {
                "training reward": [nan if h["reward"] is None else h["reward"] for h in run.history],
                "loss": [nan if h["loss"] is None else h["loss"] for h in run.history],
            },
            f"{c.method} on {c.backbone}",
        )
        atomic_write_text(run.run_dir / "history.json", json.dumps(run.history) + "\n")
        hooks.kill_point("end-files", run.step)
        atomic_write_text(run.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        run.accelerator.log(
            {f"eval/{k}": v for k, v in summary["after"].items() if isinstance(v, float) and math.isfinite(v)},
            step=run.step,
        )
    run.accelerator.wait_for_everyone()
    return summary


def _paired(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    return mean_ci(after.double() - before.double())
