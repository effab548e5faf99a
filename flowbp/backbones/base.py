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


def expand_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """A condition of batch 1 drives a whole latent batch; any other mismatch is an error."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"condition batch {t.shape[0]} does not match latent batch {batch}")


@runtime_checkable
class Backbone(Protocol):
    """What the trainer, the sampler and the benchmarks need from a model family."""

    #: Registry name, e.g. ``"digits"``, ``"sd3"``.
    name: str
    #: The velocity network whose parameters are trained (LoRA-wrapped or full).
    transformer: nn.Module
    #: Whether :meth:`default_prompts` may also serve as training prompts. True for digits (its prompts
    #: are the ten class labels); False for text-to-image models, whose default set is an evaluation
    #: set (the HPDv2 test prompts): training on it would inflate every evaluation.
    trains_on_default_prompts: bool

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

    def save_lora(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Save the adapter in the format the backbone's users load (diffusers ``load_lora_weights``).

        ``state_dict``: the adapter's parameters as whole tensors, named as in the transformer (a
        sharded model's, gathered by every rank first); ``None`` reads them from the transformer.
        """
        ...

    def load_lora(self, path: str | Path) -> None:
        """Load an adapter saved by :meth:`save_lora`."""
        ...

    def default_prompts(self) -> list[str]:
        """Training / evaluation prompts used when the config names none."""
        ...
