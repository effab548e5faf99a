"""Reward losses (DESIGN.md 3.2): loss = mean_b w_b · φ(r_b), φ = hinge ReLU(λ − r) or linear −r."""

from __future__ import annotations

from collections.abc import Sequence

import torch

LOSSES = ("hinge", "linear")


def reward_transform(rewards: torch.Tensor, kind: str = "hinge", margin: float = 0.55) -> torch.Tensor:
    """φ(r) per sample: ``hinge`` ReLU(margin − r) (the default of every paper here) or ``linear`` −r."""
    if kind == "hinge":
        return torch.relu(margin - rewards)
    if kind == "linear":
        return -rewards
    raise ValueError(f"loss: unknown kind {kind!r}; allowed: {', '.join(LOSSES)}")


def reward_loss(
    rewards: torch.Tensor | Sequence[torch.Tensor],
    sample_weights: torch.Tensor | None = None,
    kind: str = "hinge",
    margin: float = 0.55,
) -> torch.Tensor:
    """Weighted mean over the batch of φ(r).

    ``rewards`` is one tensor of B scores, or one per reward input (DRaFT-LV's renoised inputs): then
    φ is averaged over the inputs of each sample first.
    """
    stacked = torch.stack(list(rewards)) if not isinstance(rewards, torch.Tensor) else rewards.unsqueeze(0)
    per_sample = reward_transform(stacked, kind, margin).mean(0)
    if sample_weights is None:
        return per_sample.mean()
    if sample_weights.shape != per_sample.shape:
        raise ValueError(
            f"sample_weights: shape {tuple(sample_weights.shape)} does not match rewards {tuple(per_sample.shape)}"
        )
    return (sample_weights.to(per_sample.dtype) * per_sample).mean()
