"""The backbone protocol: everything model-specific lives behind it.

A method (a plan generator) never sees a backbone and a backbone never sees a method: the
trainer binds them through the engine. Adding a backbone is one small module implementing
this protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

#: ``velocity(x, sigma) -> v``: the model's velocity after classifier-free guidance, shaped like x.
VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


@runtime_checkable
class Backbone(Protocol):
    """What the trainer, the sampler and the benchmarks need from a model family."""

    #: Registry name, e.g. ``"digits"``, ``"sd3"``.
    name: str
    #: The velocity network whose parameters are trained (LoRA-wrapped or full).
    transformer: nn.Module

    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        """Encode prompts (and the negative / null prompt when the backbone uses real CFG)."""
        ...

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The float64 sigma grid σ_0 = 1 > … > σ_N = 0 of the backbone's scheduler (length N + 1)."""
        ...

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_0 ~ N(0, I) in the latent layout that :meth:`velocity_fn` consumes."""
        ...

    def velocity_fn(
        self, condition: Any, guidance_scale: float | None = None, detach_uncond: bool = False
    ) -> VelocityFn:
        """Bind prompts and guidance into ``velocity(x, sigma)`` (CFG applied inside).

        ``detach_uncond`` stops the gradient through the unconditional / negative branch of real CFG.
        """
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], B×3×H×W float, differentiable."""
        ...

    def add_lora(
        self, rank: int, alpha: float | None = None, target_modules: Sequence[str] | None = None
    ) -> None:
        """Wrap :attr:`transformer` with a peft LoRA adapter; only the adapter trains."""
        ...

    def save_lora(self, path: str | Path) -> None:
        """Save the adapter in the format the backbone's users load (diffusers ``load_lora_weights``)."""
        ...

    def load_lora(self, path: str | Path) -> None:
        """Load an adapter saved by :meth:`save_lora`."""
        ...

    def default_prompts(self) -> list[str]:
        """Training / evaluation prompts used when the config names none."""
        ...
