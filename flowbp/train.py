"""The training recipe: any registered method on any backbone, with accelerate.

One step: draw prompts and noise → cached no-grad rollout → the method's plan → the surrogate →
decode → reward → loss → backward → clip → AdamW → EMA. Method and backbone meet only here, through
the engine; neither knows the other.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from flowbp.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from flowbp.config import TrainConfig, load_config, save_config, validate_against_components
from flowbp.engine import surrogate
from flowbp.evaluate import EvalResult, evaluate, periodic_eval
from flowbp.images import plot_curves, save_grid
from flowbp.losses import reward_loss
from flowbp.methods import make_plan
from flowbp.stats import mean_ci
from flowbp.trajectory import rollout

GRID_SAMPLES_PER_PROMPT = 8
GRID_MAX_PROMPTS = 10  # sample grids show the first prompts of the evaluation set


@dataclass
class Run:
    """Everything a training run holds; built by :func:`setup`, advanced by :func:`train_steps`."""

    config: TrainConfig
    run_dir: Path
    accelerator: Any
    backbone: Any
    model: torch.nn.Module  # the unwrapped transformer
    reward: torch.nn.Module
    prompts: list[str]
    eval_prompts: list[str]
    parameters: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    ema: Any | None
    generators: dict[str, torch.Generator]
    sigmas: torch.Tensor
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    writer: Any = None


def default_run_dir(config: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.backbone}-{config.method}-{stamp}"


def _read_prompts(config: TrainConfig, backbone: Any) -> list[str]:
    if config.prompts_file is not None:
        prompts = [line.strip() for line in Path(config.prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompts_file: {config.prompts_file} holds no prompts")
        return prompts
    return list(config.prompts) if config.prompts is not None else list(backbone.default_prompts())


def _eval_prompts(config: TrainConfig, backbone: Any) -> list[str]:
    if config.eval_prompts_file is not None:
        prompts = [line.strip() for line in Path(config.eval_prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"eval_prompts_file: {config.eval_prompts_file} holds no prompts")
    else:
        prompts = list(backbone.default_prompts())
    return prompts[: config.eval_max_prompts]


@contextlib.contextmanager
def ema_weights(run: Run) -> Iterator[None]:
    """Temporarily evaluate with the EMA weights (as the paper does), then restore the live ones."""
    if run.ema is None:
        yield
        return
    params = list(run.parameters.values())
    run.ema.store(params)
    run.ema.copy_to(params)
    try:
        yield
    finally:
        run.ema.restore(params)


def setup(config: TrainConfig, run_dir: Path | None = None, resume: bool = False) -> Run:
    """Validate, build every component, and only then create (or reopen) the run directory."""
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    from flowbp.backbones import backbone_from_config
    from flowbp.rewards import load_reward

    validate_against_components(config)
    run_dir = Path(run_dir or config.output_dir or default_run_dir(config))
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"output_dir: {run_dir} exists and is not empty (choose another, or resume it with --resume)")

    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but no CUDA device is available")
    accelerator = Accelerator(cpu=cpu, mixed_precision=config.mixed_precision)
    backbone = backbone_from_config(config, accelerator.device)
    reward = load_reward(config.reward, paths=config.reward_paths).to(accelerator.device)
    reward.requires_grad_(False)
    prompts = _read_prompts(config, backbone)
    backbone.encode_prompts(prompts[:1] + prompts[-1:])  # fail early on prompts the backbone cannot encode

    model = backbone.transformer
    torch.manual_seed(config.seed)  # peft draws the LoRA A matrices from the global generator
    if config.finetune == "lora":
        backbone.add_lora(config.lora_rank, config.lora_alpha, config.lora_targets)
    else:
        model.requires_grad_(True)
    model.eval()  # no dropout: the re-forwarded velocities must equal the cached ones
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(
        list(parameters.values()),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    prepared, optimizer = accelerator.prepare(model, optimizer)
    backbone.transformer = prepared
    ema = EMAModel(list(parameters.values()), decay=config.ema_decay) if config.ema else None
    rank = accelerator.process_index
    generators = {
        # the plan stream is shared by every rank: identical plans, identical number of model calls
        "plan": torch.Generator().manual_seed(config.plan_seed),
        "data": torch.Generator().manual_seed(config.seed + 1000 * rank),
        "renoise": torch.Generator().manual_seed(config.seed + 1 + 1000 * rank),
    }
    run = Run(
        config=config,
        run_dir=run_dir,
        accelerator=accelerator,
        backbone=backbone,
        model=model,
        reward=reward,
        prompts=prompts,
        eval_prompts=_eval_prompts(config, backbone),
        parameters=parameters,
        optimizer=optimizer,
        ema=ema,
        generators=generators,
        sigmas=backbone.sigmas(config.num_inference_steps),
    )
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ValueError(f"resume: no checkpoint under {run_dir / 'checkpoints'}")
        run.step, state = load_checkpoint(ckpt, parameters, optimizer, ema, generators)
        run.history, run.before = state["history"], state["before"]
    elif accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    return run


def _evaluate(run: Run) -> EvalResult:
    c = run.config
    with ema_weights(run):
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


def _save_grid(run: Run, tag: str) -> None:
    c = run.config
    prompts = run.eval_prompts[:GRID_MAX_PROMPTS]
    with ema_weights(run):
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
    # one row per prompt
    save_grid(result.images, run.run_dir / "samples" / f"{tag}.png", rows=len(prompts))


def _checkpoint(run: Run) -> None:
    if run.accelerator.is_main_process:
        save_checkpoint(
            run.run_dir,
            run.step,
            dict(run.parameters),
            run.optimizer,
            run.ema,
            run.generators,
            {"history": run.history, "before": run.before},
        )


def _backward_scale(c: TrainConfig, backbone: Any) -> float:
    """1/g under ``cfg_grad_compensate`` with real CFG (g > 1), else 1."""
    if not c.cfg_grad_compensate:
        return 1.0
    g = c.guidance_scale if c.guidance_scale is not None else getattr(backbone, "default_guidance_scale", 1.0)
    return 1.0 / g if g > 1.0 else 1.0


def train_step(run: Run) -> dict[str, Any]:
    c, bb, gens = run.config, run.backbone, run.generators
    t0 = time.perf_counter()
    idx = torch.randint(len(run.prompts), (c.batch_size,), generator=gens["data"])
    prompts = [run.prompts[i] for i in idx.tolist()]
    cond = bb.encode_prompts(prompts)
    velocity = bb.velocity_fn(cond, c.guidance_scale, detach_uncond=c.detach_negative)
    noise = bb.initial_noise(c.batch_size, gens["data"])
    traj = rollout(velocity, noise, run.sigmas)
    plan = make_plan(c.method, run.sigmas, gens["plan"], **c.method_args)
    out = surrogate(plan, traj, velocity, generator=gens["renoise"])
    rewards = [run.reward(bb.decode(x), prompts) for x in out.inputs]
    loss = reward_loss(rewards, out.sample_weights.to(rewards[0].device), c.loss, c.loss_margin)
    run.accelerator.backward(loss * _backward_scale(c, bb))
    params = list(run.parameters.values())
    grad_norm = float(
        run.accelerator.clip_grad_norm_(params, c.max_grad_norm)
        if c.max_grad_norm > 0
        else torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    )
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(params)
    run.step += 1
    record = {
        "step": run.step,
        "reward": float(rewards[0].detach().float().mean()),
        "loss": float(loss.detach()),
        "grad_norm": grad_norm,
        "anchors": list(plan.anchors),
        "grad_forwards": plan.grad_forwards,
        "sample_weight": float(out.sample_weights.mean()),
        "connector_deviation": {str(a): float(d.mean()) for a, d in out.deviations.items()},
        "seconds": time.perf_counter() - t0,
    }
    run.history.append(record)
    return record


def _log(run: Run, record: dict[str, Any]) -> None:
    if run.writer is None:
        return
    step = record["step"]
    for key in ("reward", "loss", "grad_norm", "sample_weight", "seconds"):
        run.writer.add_scalar(f"train/{key}", record[key], step)
    for anchor, d in record["connector_deviation"].items():
        run.writer.add_scalar(f"connector/d_{anchor}", d, step)


def _paired(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    return mean_ci(after.double() - before.double())


def finish(run: Run, start_time: float) -> dict[str, Any]:
    """Final evaluation, LoRA / weights in the backbone's format, summary.json, plots, last checkpoint."""
    c = run.config
    after = _evaluate(run)
    before_rewards = torch.tensor(run.before["per_sample"]["reward"], dtype=torch.float64)
    summary: dict[str, Any] = {
        "method": c.method,
        "backbone": c.backbone,
        "reward": c.reward,
        "steps": run.step,
        "wall_time_s": time.time() - start_time,
        "eval_samples": len(after.prompts),
        "before": run.before["summary"],
        "after": after.summary(),
        "reward_improvement": _paired(before_rewards, after.rewards),
    }
    for key, values in after.per_sample.items():
        prior = torch.tensor(run.before["per_sample"][key], dtype=torch.float64)
        summary[f"{key}_change"] = _paired(prior, values)
    if run.accelerator.is_main_process:
        _checkpoint(run)
        _save_grid(run, "final")
        with ema_weights(run):  # the shipped weights are the EMA weights, as evaluated
            if c.finetune == "lora":
                run.backbone.transformer = run.model
                run.backbone.save_lora(run.run_dir / "lora")
            elif hasattr(run.backbone, "save_full"):  # diffusers: <run>/transformer for from_pretrained
                run.backbone.transformer = run.model
                run.backbone.save_full(run.run_dir)
            else:
                from safetensors.torch import save_file

                state = {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
                save_file(state, str(run.run_dir / "transformer.safetensors"))
        steps = [h["step"] for h in run.history]
        plot_curves(
            run.run_dir / "reward_curve.png",
            steps,
            {"training reward": [h["reward"] for h in run.history], "loss": [h["loss"] for h in run.history]},
            f"{c.method} on {c.backbone}",
        )
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (run.run_dir / "history.json").write_text(json.dumps(run.history) + "\n")
    return summary


def train(
    config: TrainConfig | None = None, resume: str | Path | None = None, stop_after: int | None = None
) -> dict[str, Any] | None:
    """Run (or resume) training; returns the summary, or ``None`` when stopped early by ``stop_after``.

    ``resume`` is a run directory: its saved ``config.yaml`` and latest checkpoint are used.
    ``stop_after`` ends the run after that many total steps without finishing it (for tests and for
    splitting a run across jobs); it is then resumed with ``resume``.
    """
    from tqdm.auto import tqdm

    start_time = time.time()
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ValueError(f"resume: {run_dir} is not a run directory (no config.yaml)")
        if (run_dir / "summary.json").is_file():
            raise ValueError(f"resume: {run_dir} has finished (summary.json exists); nothing to resume")
        config = load_config(run_dir / "config.yaml")
        run = setup(config, run_dir, resume=True)
    else:
        config = config or load_config()
        run = setup(config)
    c = run.config
    if run.accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(run.run_dir / "tensorboard"), purge_step=run.step or None)
    if not run.before:
        before = _evaluate(run)
        run.before = {
            "summary": before.summary(),
            "per_sample": {"reward": before.rewards.tolist(), **{k: v.tolist() for k, v in before.per_sample.items()}},
        }
        if run.accelerator.is_main_process:
            _save_grid(run, "step-000000")
    bar = tqdm(
        total=c.steps,
        initial=run.step,
        disable=not (c.progress and run.accelerator.is_main_process),
        desc=f"{c.method}",
        unit="step",
        dynamic_ncols=True,
    )
    while run.step < c.steps:
        record = train_step(run)
        _log(run, record)
        bar.update(1)
        recent = run.history[-10:]
        bar.set_postfix(
            reward=f"{sum(h['reward'] for h in recent) / len(recent):.4f}",
            loss=f"{sum(h['loss'] for h in recent) / len(recent):.4f}",
        )
        if c.eval_every and run.step % c.eval_every == 0:
            record["eval"] = periodic_eval(run)  # the held-out evaluation of `flowbp eval`, into history.json
        if c.sample_every and run.step % c.sample_every == 0 and run.step < c.steps:
            _save_grid(run, f"step-{run.step:06d}")
        if c.checkpoint_every and run.step % c.checkpoint_every == 0 and run.step < c.steps:
            _checkpoint(run)
        if stop_after is not None and run.step >= stop_after and run.step < c.steps:
            bar.close()
            if run.writer is not None:
                run.writer.close()
            return None
    bar.close()
    summary = finish(run, start_time)
    if run.writer is not None:
        for key, value in summary["after"].items():
            if isinstance(value, float) and math.isfinite(value):
                run.writer.add_scalar(f"eval/{key}", value, run.step)
        run.writer.close()
    return summary
