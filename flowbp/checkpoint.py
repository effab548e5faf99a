"""Training checkpoints as safetensors + JSON: trainable weights, optimizer, EMA, RNG streams, run state.

No pickles: every tensor goes to a ``.safetensors`` file and everything else to ``state.json``, so a
checkpoint can be inspected and loaded without executing code. A checkpoint is written to a temporary
directory and renamed into place, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    ema: Any | None,
    generators: dict[str, torch.Generator],
    state: dict[str, Any],
) -> Path:
    final = run_dir / CHECKPOINTS / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    meta: dict[str, Any] = {"step": step, "optimizer": opt_meta, "state": state}
    if ema is not None:
        ema_state = ema.state_dict()
        shadow = ema_state.pop("shadow_params")
        save_file({f"{i}": t.detach().cpu().contiguous() for i, t in enumerate(shadow)}, str(tmp / "ema.safetensors"))
        meta["ema"] = ema_state
    save_file({k: g.get_state() for k, g in generators.items()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in (run_dir / CHECKPOINTS).glob("step-*") if not p.name.endswith(".tmp"))
    return found[-1] if found else None


def load_checkpoint(
    path: Path,
    parameters: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    ema: Any | None,
    generators: dict[str, torch.Generator],
) -> tuple[int, dict[str, Any]]:
    """Restore everything in place; returns (step, run state)."""
    meta = json.loads((path / "state.json").read_text())
    trainable = load_file(str(path / "trainable.safetensors"))
    missing = sorted(set(parameters) ^ set(trainable))
    if missing:
        raise ValueError(f"resume: checkpoint {path} does not match the model's trainable parameters ({missing[:3]} …)")
    with torch.no_grad():
        for name, p in parameters.items():
            p.copy_(trainable[name])
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta["optimizer"]))
    if ema is not None:
        shadow = load_file(str(path / "ema.safetensors"))
        ema_state = dict(meta["ema"])
        ema_state["shadow_params"] = [shadow[str(i)] for i in range(len(shadow))]
        ema.load_state_dict(ema_state)
    rng = load_file(str(path / "rng.safetensors"))
    for name, g in generators.items():
        g.set_state(rng[name])
    return int(meta["step"]), meta["state"]
