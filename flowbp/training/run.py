"""What a training run holds (:class:`Run`), and the exception that ends one early but resumably."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the CLI imports TrainingStopped without paying for torch, and
    import torch  # flowbp.config's guard validation reaches this module (no import cycle)

    from flowbp.config import TrainConfig


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
    guard: Any = None  # flowbp.guard.Guard when the config has a guard list

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
