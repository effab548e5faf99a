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

import contextlib
import hashlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from flowbp.checkpoint import (
    atomic_write_text,
    checkpoint_dir,
    clean_temporaries,
    kill_point,
    latest_checkpoint,
    load_ema_state,
    load_optimizer_state,
    load_rng_state,
    load_trainable,
    read_checkpoint_meta,
    save_checkpoint,
)
from flowbp.config import TrainConfig, load_config, save_config, validate_against_components
from flowbp.engine import surrogate
from flowbp.evaluate import EvalResult, evaluate, periodic_eval, read_prompts
from flowbp.images import image_grid, plot_curves, save_grid
from flowbp.losses import reward_loss
from flowbp.methods import make_plan
from flowbp.stats import mean_ci
from flowbp.trajectory import rollout

GRID_SAMPLES_PER_PROMPT = 8
GRID_MAX_PROMPTS = 10  # sample grids show the first prompts of the evaluation set
#: Config keys a resumed run may change (``output_dir``: the run directory given to --resume wins).
RESUMABLE_CHANGES = ("steps", "output_dir")


class TrainingStopped(RuntimeError):
    """Training ended early but resumably (a signal, or too many non-finite steps); ``exit_code`` for CLIs."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Run:
    """Everything a training run holds; built by :func:`setup`, advanced by :func:`train_step`."""

    config: TrainConfig
    run_dir: Path
    accelerator: Any
    backbone: Any
    model: torch.nn.Module  # the unwrapped transformer
    prepared: torch.nn.Module  # the same, wrapped by accelerate (DDP / FSDP2) for training forwards
    reward: torch.nn.Module
    prompts: list[str]
    eval_prompts: list[str]
    parameters: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Any | None
    generators: dict[str, torch.Generator]
    sigmas: torch.Tensor
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    skipped: int = 0  # non-finite steps skipped so far
    consecutive_skips: int = 0
    stop_signal: int | None = None  # set by the SIGTERM / SIGINT handler; acted on after the step

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def writer(self) -> Any:
        """The TensorBoard SummaryWriter of the accelerate tracker (main process, tensorboard on), else None."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                return tracker.writer
        return None


def default_run_dir(config: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.backbone}-{config.method}-{stamp}"


def _read_prompts(config: TrainConfig, backbone: Any) -> list[str]:
    if config.prompts_file is not None:
        return read_prompts(config.prompts_file, "prompts_file")
    if config.prompts is not None:
        return list(config.prompts)
    if not getattr(backbone, "trains_on_default_prompts", False):
        raise ValueError(
            f"prompts_file: backbone {config.backbone!r} needs training prompts: --set prompts_file=FILE "
            "(one prompt per line) or prompts=[...]; its default prompts (the HPDv2 test set) are for "
            "evaluation only, and training on them would inflate every evaluation"
        )
    return list(backbone.default_prompts())


def _eval_prompts(config: TrainConfig, backbone: Any) -> list[str]:
    if config.eval_prompts_file is not None:
        prompts = read_prompts(config.eval_prompts_file, "eval_prompts_file")
    else:
        prompts = list(backbone.default_prompts())
    return prompts[: config.eval_max_prompts]


# ----------------------------------------------------------------------------- components (small, replaceable)
def make_accelerator(config: TrainConfig, run_dir: Path) -> Any:
    """accelerate decides the topology (launcher / config file): DDP for LoRA, FSDP2 if the preset asks."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but no CUDA device is available")
    from accelerate.tracking import TensorBoardTracker

    # TensorBoard logs straight into run_dir/tensorboard (accelerate's own would add a project subfolder)
    trackers = [
        TensorBoardTracker("", str(run_dir / "tensorboard")) if name == "tensorboard" else name
        for name in config.trackers()
    ]
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
    )
    _test_fsdp2_on_cpu(accelerator)
    return accelerator


def _test_fsdp2_on_cpu(accelerator: Any) -> None:
    """Test hook: ``FLOWBP_TEST_FSDP2_ON_CPU=BlockClass`` runs accelerate's FSDP2 path on CPU processes.

    accelerate (1.15) only enables FSDP for GPU-family distributed types and silently prepares DDP on
    CPU, although torch's ``fully_shard`` runs on CPU/gloo. The hook switches a ``MULTI_CPU`` state to
    FSDP with the shipped fsdp2 preset's settings, so that the FSDP2 code path (sharded DTensor
    parameters, gathered checkpoints, re-sharding on resume, full state dict) runs in tests here.
    """
    import os

    wrap = os.environ.get("FLOWBP_TEST_FSDP2_ON_CPU")
    if not wrap or accelerator.distributed_type.value != "MULTI_CPU":
        return
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[wrap],
        state_dict_type="FULL_STATE_DICT",
    )
    accelerator.state.distributed_type = DistributedType.FSDP


def build_backbone(config: TrainConfig, device: torch.device) -> Any:
    from flowbp.backbones import backbone_from_config

    try:
        return backbone_from_config(config, device)
    except (OSError, KeyError, RuntimeError, json.JSONDecodeError, SafetensorError) as exc:
        # a truncated or foreign weights file, a config that does not fit the weights
        where = config.backbone_path or "the shipped weights"
        message = " ".join(str(exc).split())[:300]
        raise ValueError(f"backbone_path: cannot load {config.backbone} from {where}: {message}") from exc


def build_reward(config: TrainConfig, device: torch.device) -> torch.nn.Module:
    from flowbp.rewards import load_reward

    reward = load_reward(config.reward, paths=config.reward_paths).to(device)
    reward.requires_grad_(False)
    return reward


def make_trainable(config: TrainConfig, backbone: Any) -> torch.nn.Module:
    """Attach LoRA (or unfreeze everything) on every rank identically; returns the module to train."""
    model = backbone.transformer
    torch.manual_seed(config.seed)  # peft draws the LoRA A matrices from the global generator
    if config.finetune == "lora":
        from flowbp.memory_modes import add_lora_on_quantized_base

        add_lora_on_quantized_base(backbone, config)  # base_quantization: none is the plain add_lora
    else:
        model.requires_grad_(True)
    model.eval()  # no dropout: the re-forwarded velocities must equal the cached ones
    return model


def make_optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from flowbp.memory_modes import make_adamw

    return make_adamw(  # optimizer: adamw (fp32 moments) or adamw8bit
        parameters,
        config.optimizer,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    """diffusers' schedules; stepped once per training step (not prepared: accelerate would step it
    once per process, making the schedule depend on the number of processes)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.steps,
    )


def make_generators(config: TrainConfig, rank: int) -> dict[str, torch.Generator]:
    torch.manual_seed(config.seed + 1000 * rank + 7)  # this rank's own global stream (after LoRA init)
    return {
        "plan": torch.Generator().manual_seed(config.plan_seed),  # shared: identical plans everywhere
        "data": torch.Generator().manual_seed(config.seed),  # shared: global batch, sharded below
        "renoise": torch.Generator().manual_seed(config.seed + 1 + 1000 * rank),  # this rank's own
    }


# ----------------------------------------------------------------------------- distributed helpers
def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor on CPU (FSDP2 shards are gathered: a collective, so every rank must call it)."""
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.detach().cpu()


def _like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out like ``ref`` (sharded again when ``ref`` is an FSDP2 DTensor)."""
    if _is_dtensor(ref):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
    return value.to(ref.device, ref.dtype)


def _gather_objects(accelerator: Any, obj: Any) -> list[Any]:
    if accelerator.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(out, obj)
    return out


def _any_rank(accelerator: Any, flag: bool) -> bool:
    """True when ``flag`` holds on any rank: decisions that change control flow must agree everywhere."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def _rng_state(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    state = {k: g.get_state() for k, g in generators.items()}
    state["torch_global"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["cuda_global"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(generators: dict[str, torch.Generator], state: dict[str, torch.Tensor]) -> None:
    for name, g in generators.items():
        g.set_state(state[name])
    torch.set_rng_state(state["torch_global"])
    if "cuda_global" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_global"])


def plan_digest(plan: Any) -> int:
    """A 63-bit fingerprint of a plan (anchors, actives, weights, couplings, scales) for cross-rank checks."""
    text = repr((plan.anchors, plan.active, plan.segments, plan.coupling, plan.grad_scale, plan.renoised))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


# ----------------------------------------------------------------------------- setup and resume
def _config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in keys
        if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)
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
    shards = accelerator.num_processes * config.gradient_accumulation_steps
    if config.batch_size % shards:
        raise ValueError(
            f"batch_size: {config.batch_size} (the global batch) is not divisible by num_processes "
            f"({accelerator.num_processes}) × gradient_accumulation_steps ({config.gradient_accumulation_steps})"
        )
    backbone = build_backbone(config, accelerator.device)
    reward = build_reward(config, accelerator.device)
    prompts = _read_prompts(config, backbone)
    backbone.encode_prompts(prompts)  # fail early on prompts the backbone cannot encode
    model = make_trainable(config, backbone)
    if config.finetune == "lora" and accelerator.distributed_type.value == "FSDP":
        raise ValueError("finetune: 'lora' runs data-parallel with DDP; use the FSDP2 preset with finetune: full")
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
        eval_prompts=_eval_prompts(config, backbone),
        parameters=parameters,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        generators=make_generators(config, accelerator.process_index),
        sigmas=backbone.sigmas(config.num_inference_steps),
    )
    if resume_from is not None:
        _restore(run, resume_from)
    elif run.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / ".config.yaml.tmp"
        save_config(config, tmp)
        atomic_write_text(run_dir / "config.yaml", tmp.read_text())
        tmp.unlink()
    accelerator.wait_for_everyone()
    return run


def _restore(run: Run, path: Path) -> None:
    meta = read_checkpoint_meta(path, hashes=False)  # hashed by _open_run on the main process
    acc = run.accelerator
    if int(meta.get("world_size", 1)) != acc.num_processes:
        raise ValueError(
            f"resume: {path} was written by {meta.get('world_size')} processes but this launch has "
            f"{acc.num_processes}; relaunch with {meta.get('world_size')} (each rank resumes its own random streams)"
        )
    trainable = load_trainable(path)
    mismatch = sorted(set(run.parameters) ^ set(trainable))
    if mismatch:
        raise ValueError(
            f"resume: checkpoint {path} does not match the model's trainable parameters ({mismatch[:3]} …)"
        )
    with torch.no_grad():
        for name, p in run.parameters.items():
            p.copy_(_like(trainable[name], p))
    opt_state = load_optimizer_state(path, meta)
    params = list(run.parameters.values())
    for pid, entries in opt_state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                entries[key] = _like(value, params[int(pid)])
    run.optimizer.load_state_dict(opt_state)
    if meta.get("scheduler") is not None:
        run.scheduler.load_state_dict(meta["scheduler"])
    if run.ema is not None:
        ema_state = load_ema_state(path, meta)
        if ema_state is None:
            raise ValueError(f"resume: checkpoint {path} has no EMA weights but the config has ema: true")
        ema_state["shadow_params"] = [_like(t, p) for t, p in zip(ema_state["shadow_params"], params, strict=True)]
        run.ema.load_state_dict(ema_state)
    _set_rng_state(run.generators, load_rng_state(path, acc.process_index))
    run.step = int(meta["step"])
    state = meta["state"]
    run.history, run.before = state["history"], state["before"]
    run.skipped, run.consecutive_skips = int(state.get("skipped", 0)), int(state.get("consecutive_skips", 0))


def _checkpoint(run: Run) -> Path:
    """Gather (collectives: every rank calls this) and let the main process write one checkpoint."""
    trainable = {n: _full(p) for n, p in run.parameters.items()}
    opt = run.optimizer.state_dict()
    opt_state = {
        "state": {
            pid: {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in entries.items()}
            for pid, entries in opt["state"].items()
        },
        "param_groups": opt["param_groups"],
    }
    ema_state = None
    if run.ema is not None:
        ema_state = run.ema.state_dict()
        ema_state["shadow_params"] = [_full(t) for t in ema_state["shadow_params"]]
    rng = _gather_objects(run.accelerator, _rng_state(run.generators))
    path = checkpoint_dir(run.run_dir, run.step)
    if run.is_main:
        state = {
            "history": run.history,
            "before": run.before,
            "skipped": run.skipped,
            "consecutive_skips": run.consecutive_skips,
        }
        path = save_checkpoint(
            run.run_dir,
            run.step,
            trainable,
            opt_state,
            ema_state,
            rng,
            state,
            run.config.to_dict(),
            keep_last=run.config.checkpoint_keep_last,
            scheduler_state=run.scheduler.state_dict(),
        )
    run.accelerator.wait_for_everyone()
    return path


# ----------------------------------------------------------------------------- evaluation and grids
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


def _evaluate(run: Run) -> EvalResult:
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


def _save_grid(run: Run, tag: str) -> None:
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
    _log_image(run, f"samples/{tag.split('-')[0]}", result.images, path, rows=len(prompts))


def _log_image(run: Run, key: str, images: torch.Tensor, path: Path, rows: int) -> None:
    """Send a sample grid to every tracker in the form it takes (TensorBoard, wandb images; MLflow file)."""
    grid = image_grid(images, rows=rows)
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({key: grid[None]}, step=run.step, dataformats="NHWC")
        elif tracker.name == "mlflow":
            tracker.log_artifact(str(path), "samples")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({key: [grid]}, step=run.step)


def _backward_scale(c: TrainConfig, backbone: Any) -> float:
    """1/g under ``cfg_grad_compensate`` with real CFG (g > 1), else 1."""
    if not c.cfg_grad_compensate:
        return 1.0
    g = c.guidance_scale if c.guidance_scale is not None else getattr(backbone, "default_guidance_scale", 1.0)
    return 1.0 / g if g > 1.0 else 1.0


# ----------------------------------------------------------------------------- one optimizer step
def train_step(run: Run) -> dict[str, Any]:
    """One optimizer step over the global batch; non-finite steps are skipped (no update)."""
    c, bb, gens, acc = run.config, run.backbone, run.generators, run.accelerator
    t0 = time.perf_counter()
    step = run.step + 1
    world, accum = acc.num_processes, c.gradient_accumulation_steps
    micro = c.batch_size // (world * accum)
    # the global batch, drawn identically on every rank; this rank keeps its shard
    idx = torch.randint(len(run.prompts), (c.batch_size,), generator=gens["data"])
    noise = bb.initial_noise(c.batch_size, gens["data"])
    # one plan per optimizer step, shared by its micro-batches and by every rank
    plan = make_plan(c.method, run.sigmas, gens["plan"], **c.method_args)
    digests = [int(d) for d in _gather_objects(acc, plan_digest(plan))]
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks drew different plans at step {step}: {digests} (plan generators out of sync)")
    rewards, losses, weights, deviations = [], [], [], []
    for m in range(accum):
        lo = (acc.process_index * accum + m) * micro
        prompts = [run.prompts[i] for i in idx[lo : lo + micro].tolist()]
        with acc.accumulate(run.prepared):
            cond = bb.encode_prompts(prompts)
            velocity = bb.velocity_fn(cond, c.guidance_scale, detach_uncond=c.detach_negative)
            traj = rollout(velocity, noise[lo : lo + micro], run.sigmas)
            out = surrogate(plan, traj, velocity, generator=gens["renoise"])
            scores = [run.reward(bb.decode(x), prompts) for x in out.inputs]
            scores = _test_reward_hook(scores, step)
            loss = reward_loss(scores, out.sample_weights.to(scores[0].device), c.loss, c.loss_margin)
            kill_point("mid-step", step)
            acc.backward(loss * _backward_scale(c, bb))
        rewards.append(scores[0].detach().float())
        losses.append(loss.detach().float().reshape(1))
        weights.append(out.sample_weights.detach().float().to(acc.device))
        deviations.append({str(a): float(d.mean()) for a, d in out.deviations.items()})
    # logged values are over the global batch
    all_rewards = acc.gather(torch.cat(rewards))
    loss_value = float(acc.gather(torch.cat(losses)).mean())
    sample_weight = float(acc.gather(torch.cat(weights)).mean())
    params = list(run.parameters.values())
    if c.max_grad_norm > 0:
        grad_norm = float(_full(acc.clip_grad_norm_(params, c.max_grad_norm)))
    else:
        grad_norm = float(torch.norm(torch.stack([_full(p.grad).norm() for p in params if p.grad is not None])))
    lr = float(run.optimizer.param_groups[0]["lr"])  # the rate this step uses
    reward_value = float(all_rewards.mean())
    finite = math.isfinite(reward_value) and math.isfinite(loss_value) and math.isfinite(grad_norm)
    skip = _any_rank(acc, not finite)
    if skip:  # no optimizer, EMA (nor moment) update: the poisoned gradient is dropped
        run.skipped += 1
        run.consecutive_skips += 1
    else:
        run.optimizer.step()
        if run.ema is not None:
            run.ema.step(params)
        run.consecutive_skips = 0
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step = step

    def clean(x: float) -> float | None:  # JSON has no NaN
        return x if math.isfinite(x) else None

    record = {
        "step": step,
        "reward": clean(reward_value),
        "loss": clean(loss_value),
        "grad_norm": clean(grad_norm),
        "skipped": skip,
        "lr": lr,
        "anchors": list(plan.anchors),
        "grad_forwards": plan.grad_forwards,
        "plan_digests": digests,
        "sample_weight": sample_weight,
        "connector_deviation": {k: sum(d[k] for d in deviations) / len(deviations) for k in deviations[0]},
        "seconds": time.perf_counter() - t0,
    }
    run.history.append(record)
    return record


def _test_reward_hook(scores: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    """Test hook: ``FLOWBP_TEST_NAN_STEPS=2,3`` makes the reward NaN on those steps (non-finite guard tests)."""
    import os

    spec = os.environ.get("FLOWBP_TEST_NAN_STEPS")
    if spec and str(step) in spec.split(","):
        return [s * float("nan") for s in scores]
    return scores


def _log(run: Run, record: dict[str, Any]) -> None:
    if not run.accelerator.trackers:
        return
    values: dict[str, Any] = {
        f"train/{k}": record[k] for k in ("reward", "loss", "grad_norm", "sample_weight", "seconds", "lr")
        if record[k] is not None
    }
    values["train/skipped_total"] = run.skipped
    values.update({f"connector/d_{a}": d for a, d in record["connector_deviation"].items()})
    run.accelerator.log(values, step=record["step"])


def _paired(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    return mean_ci(after.double() - before.double())


# ----------------------------------------------------------------------------- finish
def finish(run: Run, start_time: float) -> dict[str, Any]:
    """Final checkpoint, then evaluation, weights, curves, history.json and — last — summary.json.

    The checkpoint comes first, so a run interrupted anywhere in here resumes straight into
    ``finish`` again; summary.json is written atomically and last, so its presence means finished.
    """
    c = run.config
    _checkpoint(run)
    kill_point("final-eval", run.step)
    after = _evaluate(run)
    before_rewards = torch.tensor(run.before["per_sample"]["reward"], dtype=torch.float64)
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
        "reward_improvement": _paired(before_rewards, after.rewards),
    }
    for key, values in after.per_sample.items():
        prior = torch.tensor(run.before["per_sample"][key], dtype=torch.float64)
        summary[f"{key}_change"] = _paired(prior, values)
    _save_grid(run, "final")
    _save_weights(run)
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
        kill_point("end-files", run.step)
        atomic_write_text(run.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        run.accelerator.log(
            {f"eval/{k}": v for k, v in summary["after"].items() if isinstance(v, float) and math.isfinite(v)},
            step=run.step,
        )
    run.accelerator.wait_for_everyone()
    return summary


def _save_weights(run: Run) -> None:
    """The shipped weights are the EMA weights, as evaluated, in the backbone's format."""
    acc = run.accelerator
    with ema_weights(run):
        if run.config.finetune == "lora":
            if run.is_main:
                run.backbone.transformer = run.model
                try:
                    run.backbone.save_lora(run.run_dir / "lora")
                finally:
                    run.backbone.transformer = run.prepared
        elif hasattr(run.backbone, "save_full") and acc.distributed_type.value != "FSDP":
            if run.is_main:  # diffusers backbones: <run>/transformer for from_pretrained
                run.backbone.transformer = run.model
                try:
                    run.backbone.save_full(run.run_dir)
                finally:
                    run.backbone.transformer = run.prepared
        else:
            from safetensors.torch import save_file

            # whole tensors: FSDP2 shards are gathered by every rank (full_tensor is a collective)
            state = {k: _full(v).clone().contiguous() for k, v in run.model.state_dict().items()}
            if run.is_main:
                tensors = state
                tmp = run.run_dir / ".transformer.safetensors.tmp"
                save_file(tensors, str(tmp))
                tmp.replace(run.run_dir / "transformer.safetensors")
    acc.wait_for_everyone()


# ----------------------------------------------------------------------------- signals
@contextlib.contextmanager
def _stop_on_signals(run: Run) -> Iterator[None]:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, checkpoints and stops (see :func:`train`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if run.stop_signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        run.stop_signal = signum
        if run.is_main:
            print(
                f"\nflowbp train: {signal.Signals(signum).name} received; finishing the current step "
                "and writing a checkpoint …",
                file=sys.stderr,
                flush=True,
            )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _test_signal_hook(run: Run) -> None:
    """Test hook: ``FLOWBP_TEST_SIGTERM_AT=step`` makes rank 0 send itself SIGTERM after that step
    (``step:SIGINT`` sends SIGINT, as Ctrl-C does)."""
    import os

    at = os.environ.get("FLOWBP_TEST_SIGTERM_AT")
    if not at or not run.is_main:
        return
    step, _, name = at.partition(":")
    if int(step) == run.step:
        os.kill(os.getpid(), signal.Signals[name or "SIGTERM"])


# ----------------------------------------------------------------------------- the loop
def _open_run(resume: str | Path) -> tuple[TrainConfig, Path, Path | None]:
    """Resolve ``--resume RUN_DIR``: its config, and the checkpoint to restore (None: start over)."""
    run_dir = Path(resume)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"resume: {run_dir} is not a run directory (no config.yaml)")
    if (run_dir / "summary.json").is_file():
        raise ValueError(f"resume: {run_dir} has finished (summary.json exists); nothing to resume")
    try:
        config = load_config(run_dir / "config.yaml")
    except ValueError as exc:
        raise ValueError(f"resume: {run_dir / 'config.yaml'}: {exc}") from exc
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return config, run_dir, None
    import os

    # every rank checks sizes; the main process (RANK 0, or a single process) also every hash
    meta = read_checkpoint_meta(ckpt, hashes=os.environ.get("RANK", "0") == "0")
    changes = _config_changes(meta["config"], config.to_dict())
    if changes:
        raise ValueError(
            f"resume: {run_dir / 'config.yaml'} differs from the config of {ckpt.name} ({'; '.join(changes)}); "
            f"only {RESUMABLE_CHANGES[0]} may change on resume"
        )
    if config.steps < int(meta["step"]):
        raise ValueError(f"steps: {config.steps} is below the checkpoint's step {meta['step']} ({ckpt})")
    return config, run_dir, ckpt


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
        config, run_dir, ckpt = _open_run(resume)
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
    c = run.config
    if c.trackers():
        flat = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in c.to_dict().items()}
        for tracker in run.accelerator.log_with:
            if getattr(tracker, "name", None) == "tensorboard":  # a resumed run rewrites its steps after the checkpoint
                tracker.init_kwargs["purge_step"] = run.step or None
        run.accelerator.init_trackers("flowbp", config=flat if ckpt is None else None)
    try:
        with _stop_on_signals(run):
            return _loop(run, start_time, stop_after, tqdm)
    finally:
        run.accelerator.end_training()


def _loop(run: Run, start_time: float, stop_after: int | None, tqdm: Any) -> dict[str, Any] | None:
    c = run.config
    if not run.before:
        before = _evaluate(run)
        run.before = {
            "summary": before.summary(),
            "per_sample": {"reward": before.rewards.tolist(), **{k: v.tolist() for k, v in before.per_sample.items()}},
        }
        _save_grid(run, "step-000000")
    bar = tqdm(
        total=c.steps,
        initial=run.step,
        disable=not (c.progress and run.is_main),
        desc=f"{c.method}",
        unit="step",
        dynamic_ncols=True,
    )
    try:
        while run.step < c.steps:
            record = train_step(run)
            if c.eval_every and run.step % c.eval_every == 0:
                record["eval"] = periodic_eval(run)  # the held-out evaluation of `flowbp eval`, into history.json
            _log(run, record)
            _test_signal_hook(run)
            bar.update(1)
            recent = [h for h in run.history[-10:] if not h["skipped"]]
            if recent:
                bar.set_postfix(
                    reward=f"{sum(h['reward'] for h in recent) / len(recent):.4f}",
                    loss=f"{sum(h['loss'] for h in recent) / len(recent):.4f}",
                    skipped=run.skipped,
                )
            if run.consecutive_skips >= c.max_consecutive_skips:
                path = _checkpoint(run)
                raise TrainingStopped(
                    f"training stopped at step {run.step}: {run.consecutive_skips} consecutive steps had a non-finite "
                    f"reward, loss or gradient norm ({run.skipped} skipped in all; max_consecutive_skips = "
                    f"{c.max_consecutive_skips}); the last good weights are checkpointed at {path}; see "
                    "history.json in the checkpoint state. Check the reward and lower learning_rate in a new run",
                    exit_code=3,
                )
            if _any_rank(run.accelerator, run.stop_signal is not None) and run.step < c.steps:
                path = _checkpoint(run)
                name = signal.Signals(run.stop_signal).name if run.stop_signal else "a signal on another rank"
                raise TrainingStopped(
                    f"stopped by {name} after step {run.step} of {c.steps}; checkpoint written to {path}; "
                    f"resume with: flowbp train --resume {run.run_dir}",
                    exit_code=128 + (run.stop_signal or signal.SIGTERM),
                )
            if c.sample_every and run.step % c.sample_every == 0 and run.step < c.steps:
                _save_grid(run, f"step-{run.step:06d}")
            if c.checkpoint_every and run.step % c.checkpoint_every == 0 and run.step < c.steps:
                _checkpoint(run)
            if stop_after is not None and run.step >= stop_after and run.step < c.steps:
                return None
    finally:
        bar.close()
    return finish(run, start_time)
