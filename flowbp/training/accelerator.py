"""accelerate's set-up, and the helpers that keep ranks in step (collectives every rank must call)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flowbp import _testing_hooks as hooks

if TYPE_CHECKING:  # not imported at run time: flowbp.evaluate uses this package (no import cycle)
    from flowbp.config import TrainConfig


def make_accelerator(config: TrainConfig, run_dir: Path) -> Any:
    """accelerate decides the topology (launcher / config file): DDP for LoRA, FSDP2 if the preset asks.

    Nothing is written here (a config error found later must leave no run folder): TensorBoard joins
    the trackers in :func:`start_trackers`.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but no CUDA device is available")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=[name for name in config.trackers() if name != "tensorboard"] or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
    )
    hooks.fsdp2_on_cpu(accelerator)
    return accelerator


def start_trackers(
    accelerator: Any, config: TrainConfig, run_dir: Path, hparams: dict[str, Any] | None, purge_step: int | None
) -> None:
    """Start the config's trackers (main process only, as accelerate does).

    TensorBoard logs straight into run_dir/tensorboard (accelerate's own would add a project subfolder);
    ``purge_step``: a resumed run logs again from that step, so TensorBoard drops the older copies. The
    tracker object is made here, not in :func:`make_accelerator`: accelerate < 1.7 opens the writer (and
    its folder) in the constructor.
    """
    if "tensorboard" in config.trackers() and accelerator.is_main_process:
        from accelerate.tracking import TensorBoardTracker

        accelerator.log_with.append(TensorBoardTracker("", str(run_dir / "tensorboard"), purge_step=purge_step))
    accelerator.init_trackers("flowbp", config=hparams)


def is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def whole(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor on CPU (FSDP2 shards are gathered: a collective, so every rank must call it)."""
    if is_dtensor(t):
        t = t.full_tensor()
    return t.detach().cpu()


def laid_out_like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out like ``ref`` (sharded again when ``ref`` is an FSDP2 DTensor)."""
    if is_dtensor(ref):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
    return value.to(ref.device, ref.dtype)


def gather_objects(accelerator: Any, obj: Any) -> list[Any]:
    if accelerator.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(out, obj)
    return out


def any_rank(accelerator: Any, flag: bool) -> bool:
    """True when ``flag`` holds on any rank: decisions that change control flow must agree everywhere."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)
