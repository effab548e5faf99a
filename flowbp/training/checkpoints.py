"""Checkpoints of a run: writing one (every rank gathers, the main process writes), reopening a run
directory for ``--resume`` and restoring every rank's state from it. The file format is :mod:`flowbp.checkpoint`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flowbp.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    load_ema_state,
    load_optimizer_state,
    load_rng_state,
    load_trainable,
    read_checkpoint_meta,
    save_checkpoint,
)
from flowbp.config import TrainConfig, load_config
from flowbp.training.accelerator import gather_objects, laid_out_like, whole
from flowbp.training.run import Run

#: Config keys a resumed run may change (``output_dir``: the run directory given to --resume wins).
RESUMABLE_CHANGES = ("steps", "output_dir")


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    state = {k: g.get_state() for k, g in generators.items()}
    state["torch_global"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["cuda_global"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(generators: dict[str, torch.Generator], state: dict[str, torch.Tensor]) -> None:
    for name, g in generators.items():
        g.set_state(state[name])
    torch.set_rng_state(state["torch_global"])
    if "cuda_global" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_global"])


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in keys
        if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)
    ]


def open_run(resume: str | Path) -> tuple[TrainConfig, Path, Path | None]:
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
    changes = config_changes(meta["config"], config.to_dict())
    if changes:
        raise ValueError(
            f"resume: {run_dir / 'config.yaml'} differs from the config of {ckpt.name} ({'; '.join(changes)}); "
            f"only {RESUMABLE_CHANGES[0]} may change on resume"
        )
    if config.steps < int(meta["step"]):
        raise ValueError(f"steps: {config.steps} is below the checkpoint's step {meta['step']} ({ckpt})")
    return config, run_dir, ckpt


def restore(run: Run, path: Path) -> None:
    meta = read_checkpoint_meta(path, hashes=False)  # hashed by open_run on the main process
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
            p.copy_(laid_out_like(trainable[name], p))
    opt_state = load_optimizer_state(path, meta)
    params = list(run.parameters.values())
    for pid, entries in opt_state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                entries[key] = laid_out_like(value, params[int(pid)])
    run.optimizer.load_state_dict(opt_state)
    if meta.get("scheduler") is not None:
        run.scheduler.load_state_dict(meta["scheduler"])
    if run.ema is not None:
        ema_state = load_ema_state(path, meta)
        if ema_state is None:
            raise ValueError(f"resume: checkpoint {path} has no EMA weights but the config has ema: true")
        shadow = zip(ema_state["shadow_params"], params, strict=True)
        ema_state["shadow_params"] = [laid_out_like(t, p) for t, p in shadow]
        run.ema.load_state_dict(ema_state)
    set_rng_state(run.generators, load_rng_state(path, acc.process_index))
    run.step = int(meta["step"])
    state = meta["state"]
    run.history, run.before = state["history"], state["before"]
    run.skipped, run.consecutive_skips = int(state.get("skipped", 0)), int(state.get("consecutive_skips", 0))
    if run.guard is not None:
        run.guard.load_state_dict(state.get("guard"))


def save_run_checkpoint(run: Run) -> Path:
    """Gather (collectives: every rank calls this) and let the main process write one checkpoint."""
    trainable = {n: whole(p) for n, p in run.parameters.items()}
    opt = run.optimizer.state_dict()
    opt_state = {
        "state": {
            pid: {k: whole(v) if isinstance(v, torch.Tensor) else v for k, v in entries.items()}
            for pid, entries in opt["state"].items()
        },
        "param_groups": opt["param_groups"],
    }
    ema_state = None
    if run.ema is not None:
        ema_state = run.ema.state_dict()
        ema_state["shadow_params"] = [whole(t) for t in ema_state["shadow_params"]]
    rng = gather_objects(run.accelerator, rng_state(run.generators))
    path = checkpoint_dir(run.run_dir, run.step)
    if run.is_main:
        state = {
            "history": run.history,
            "before": run.before,
            "skipped": run.skipped,
            "consecutive_skips": run.consecutive_skips,
            "guard": run.guard.state_dict() if run.guard is not None else None,
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
