"""Crash-safe training checkpoints: safetensors + JSON, hashed, written atomically.

No pickles: every tensor goes to a ``.safetensors`` file and everything else to ``state.json``, so a
checkpoint can be inspected and loaded without executing code.

Layout of ``run_dir/checkpoints/step-000042/``::

    trainable.safetensors   the trained parameters (LoRA adapter or full transformer)
    optimizer.safetensors   AdamW moments (scalars and param groups live in state.json)
    ema.safetensors         EMA shadow weights (when EMA is on)
    rng-rank<R>.safetensors every rank's own random streams, restored to that rank
    state.json              step, optimizer/EMA/scheduler scalars, the run state, the config
    manifest.json           sha256 and size of every file above + the config hash (written last)

Crash safety: everything is written into a hidden temporary directory, every file and the directory
are fsynced, and only then is the directory renamed to ``step-N`` (a rename is atomic on POSIX). A
directory without ``manifest.json`` or whose files do not match it is never taken for a checkpoint:
loading names the missing, truncated or corrupt file in one line. An existing checkpoint is only
removed after its replacement is in place (``keep_last`` pruning happens after the rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flowbp._testing_hooks import kill_point

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE = "state.json"
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".old-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


# ----------------------------------------------------------------------------- hashing and fsync
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a config dict (key order and YAML formatting do not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry to disk (a rename is only durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync, rename: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


# ----------------------------------------------------------------------------- optimizer flattening
#: Optimizer-state tensor subclasses a checkpoint may rebuild (by name, from their plain parts: never
#: unpickled). torchao's 8-bit AdamW keeps its moments as OptimState8bit (uint8 codes + block scales).
_STATE_SUBCLASSES = {"OptimState8bit": "torchao.optim.subclass_8bit"}
_SUBCLASS_KEY = "__subclasses__"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if type(value).__name__ in _STATE_SUBCLASSES:  # stored as its plain tensors + attributes
                names, attrs = value.__tensor_flatten__()
                for name in names:
                    tensors[f"{pid}.{key}.{name}"] = getattr(value, name).detach().cpu().contiguous()
                sub = scalars.setdefault(str(pid), {}).setdefault(_SUBCLASS_KEY, {})
                sub[key] = {"class": type(value).__name__, "names": list(names), "attrs": list(attrs)}
            elif isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    # torchao's optimizers keep the learning rate as a 0-d tensor (so that a schedule can fill_ it):
    # stored as a number, with the names of such keys, and made a tensor again on load
    groups, tensor_keys = [], sorted({k for g in state["param_groups"] for k, v in g.items()
                                      if isinstance(v, torch.Tensor)})
    for group in state["param_groups"]:
        groups.append({k: v.item() if isinstance(v, torch.Tensor) else v for k, v in group.items()})
    meta: dict[str, Any] = {"param_groups": groups, "scalars": scalars}
    if tensor_keys:
        meta["tensor_group_keys"] = tensor_keys
    return tensors, meta


def _numbers(value: Any) -> Any:
    """``value`` with every 0-d tensor (in dicts and lists) replaced by its number, for ``state.json``."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_numbers(v) for v in value]
    return value


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    import importlib

    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta["scalars"].items():
        entries = dict(entries)
        slot = state.setdefault(int(pid), {})
        for key, spec in entries.pop(_SUBCLASS_KEY, {}).items():
            if spec["class"] not in _STATE_SUBCLASSES:
                raise CheckpointError(f"optimizer state {pid}.{key}: unknown tensor type {spec['class']!r}")
            cls = getattr(importlib.import_module(_STATE_SUBCLASSES[spec["class"]]), spec["class"])
            parts = {n: slot.pop(f"{key}.{n}") for n in spec["names"]}
            slot[key] = cls.__tensor_unflatten__(parts, spec["attrs"], None, None)
        slot.update(entries)
    groups = [
        {k: torch.tensor(v, dtype=torch.float32) if k in meta.get("tensor_group_keys", ()) else v
         for k, v in group.items()}
        for group in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- save
def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{_PREFIX}{step:06d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    ema_state: dict[str, Any] | None,
    rng_states: list[dict[str, torch.Tensor]],
    state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int = 0,
    scheduler_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and prune to the ``keep_last`` newest (0: keep all).

    ``rng_states[r]`` holds rank r's generator states (gathered by the caller); each rank gets its
    own file so that resuming restores every rank's own streams. Called by the main process only.
    """
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    if final.is_dir() and (final / MANIFEST).is_file():
        try:  # re-reaching a saved step (a resumed finish): the same run writes the same bytes
            verify_checkpoint(final)
            return final
        except CheckpointError:
            pass  # a damaged copy: replace it below
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files: list[str] = []

    def put(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / name))
        files.append(name)

    put("trainable.safetensors", trainable)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    put("optimizer.safetensors", opt_tensors)
    kill_point("checkpoint-write", step)
    meta: dict[str, Any] = {
        "step": step,
        "world_size": len(rng_states),
        "optimizer": opt_meta,
        "scheduler": _numbers(scheduler_state),  # torchao's tensor learning rates as numbers
        "state": state,
        "config": config,
    }
    if ema_state is not None:
        ema_meta = dict(ema_state)
        shadow = ema_meta.pop("shadow_params")
        put("ema.safetensors", {str(i): t for i, t in enumerate(shadow)})
        meta["ema"] = ema_meta
    for rank, streams in enumerate(rng_states):
        put(f"rng-rank{rank}.safetensors", streams)
    (tmp / STATE).write_text(json.dumps(meta, indent=1))
    files.append(STATE)
    manifest = {
        "step": step,
        "config_sha256": config_hash(config),
        "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in files},
    }
    for name in files:
        fsync_path(tmp / name)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    fsync_path(tmp / MANIFEST)
    fsync_path(tmp)
    if final.exists():  # a damaged copy of this step: move it aside first, delete it once replaced
        trash = root / f"{_TRASH_PREFIX}{final.name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_path(root)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- find, verify, load
def list_checkpoints(run_dir: Path) -> list[Path]:
    """Completed checkpoint directories (renamed into place), oldest first; temporaries are ignored."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def clean_temporaries(run_dir: Path) -> list[Path]:
    """Remove what an interrupted save left behind (never a completed checkpoint); returns what went."""
    root = Path(run_dir) / CHECKPOINTS
    gone = [p for p in root.glob(".*") if p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX))] if root.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def verify_checkpoint(path: Path, hashes: bool = True) -> dict[str, Any]:
    """Check every file against the manifest; returns the manifest or raises one-line CheckpointError.

    ``hashes=False`` checks presence and sizes only (other ranks, while rank 0 reads every byte: a
    full fine-tuning checkpoint of a 12B model is ~150 GB, hashed once, not once per process).
    """
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is missing (an incomplete or foreign checkpoint)")
    try:
        manifest = json.loads(manifest_file.read_text())
        entries = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {manifest_file}: corrupt manifest ({exc})") from exc
    for name, entry in entries.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: file {name} is missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {file}: truncated or altered ({size} bytes, expected {entry['bytes']})")
        if hashes and sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {file}: corrupt (sha256 does not match the manifest)")
    return manifest


def read_checkpoint_meta(path: Path, hashes: bool = True) -> dict[str, Any]:
    """Verify and read ``state.json`` (config, step, run state) without touching any model."""
    verify_checkpoint(path, hashes)
    try:
        return json.loads((Path(path) / STATE).read_text())
    except json.JSONDecodeError as exc:  # only reachable if the manifest itself was forged
        raise CheckpointError(f"checkpoint {Path(path) / STATE}: not valid JSON ({exc})") from exc


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {file}: unreadable safetensors file ({exc})") from exc


def load_trainable(path: Path) -> dict[str, torch.Tensor]:
    return _load_tensors(Path(path) / "trainable.safetensors")


def load_optimizer_state(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    return _unflatten_optimizer(_load_tensors(Path(path) / "optimizer.safetensors"), meta["optimizer"])


def load_ema_state(path: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    if "ema" not in meta:
        return None
    shadow = _load_tensors(Path(path) / "ema.safetensors")
    ema_state = dict(meta["ema"])
    ema_state["shadow_params"] = [shadow[str(i)] for i in range(len(shadow))]
    return ema_state


def load_rng_state(path: Path, rank: int) -> dict[str, torch.Tensor]:
    file = Path(path) / f"rng-rank{rank}.safetensors"
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path}: no random state for rank {rank} (saved with fewer processes)")
    return _load_tensors(file)
