"""The cached rollout (DESIGN.md 3.1): sample once without gradient, keep every latent and velocity."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


def as_sigma_grid(sigmas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Validate a sigma grid and return it as a float64 CPU tensor.

    The grid must be strictly decreasing and end at exactly 0 (σ_N = 0 is the image).
    """
    grid = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().flatten()
    if grid.numel() < 2:
        raise ValueError(f"sigmas: need at least 2 values (N >= 1 steps), got {grid.numel()}")
    if not torch.isfinite(grid).all():
        raise ValueError(f"sigmas: all values must be finite, got {grid.tolist()}")
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(f"sigmas: must be strictly decreasing (σ_0 > σ_1 > … > σ_N), got {grid.tolist()}")
    if grid[-1].item() != 0.0:
        raise ValueError(f"sigmas: must end at 0 (σ_N = 0 is the sample), got last value {grid[-1].item()}")
    return grid


def training_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """The paper's training grid (DESIGN.md 3.1), the one every backbone trains and samples on.

    s = linspace(1, 1/N, N), σ = shift(s), then the terminal 0, as float64 (length N + 1). The last
    step runs from shift(1/N) to 0 (0.111 for SD3.5's S = 3 at N = 25, 0.04 for S = 1), never from a
    near-zero σ: diffusers' default ``set_timesteps(N)`` ends at 0.001 (≈ 0.009 in the SD3 pipeline),
    and a step that short carries almost no gradient. It is exactly what the diffusers pipelines'
    schedulers yield when called with ``sigmas=linspace(1, 1/N, N)`` (static shift for SD3, ``e^μ``
    for FLUX); ``flowbp plan``, config validation and every backbone take it from here.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: must be an integer >= 1, got {num_steps!r}")
    if not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"shift: must be a finite number > 0, got {shift!r}")
    s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    sigma = shift * s / (1 + (shift - 1) * s)
    sigma[0] = 1.0  # shift(1) = 1 exactly; keep it so in floating point
    return torch.cat([sigma, sigma.new_zeros(1)])


@dataclass(frozen=True)
class Trajectory:
    """A detached Euler rollout.

    ``latents[i]`` is x_i for i = 0..N (``latents[N]`` is the sample) and ``velocities[i]`` is
    v_i = v_θ(x_i, σ_i) for i = 0..N-1, both stacked along a new leading axis.
    """

    sigmas: torch.Tensor  # (N + 1,) float64, CPU
    latents: torch.Tensor  # (N + 1, *x.shape)
    velocities: torch.Tensor  # (N, *x.shape)

    @property
    def num_steps(self) -> int:
        return self.velocities.shape[0]

    @property
    def sample(self) -> torch.Tensor:
        return self.latents[-1]

    def step(self, i: int) -> float:
        """Δ_i = σ_{i+1} − σ_i (negative)."""
        return float(self.sigmas[i + 1] - self.sigmas[i])

    def posterior_mean(self, i: int) -> torch.Tensor:
        """One-step estimate of the image at node i: x_i − σ_i · v_i."""
        return self.latents[i] - float(self.sigmas[i]) * self.velocities[i]


@torch.no_grad()
def rollout(velocity: VelocityFn, noise: torch.Tensor, sigmas: Sequence[float] | torch.Tensor) -> Trajectory:
    """Euler-integrate ``velocity`` from ``noise`` over ``sigmas`` without gradient, caching everything.

    ``velocity(x, sigma)`` is any callable returning a tensor shaped like ``x``; a backbone binds
    prompts and guidance into it. Memory: the cache holds (2N + 1) latents, which for latent-space
    models is tiny next to one network's activations.
    """
    grid = as_sigma_grid(sigmas)
    n = grid.numel() - 1
    latents = torch.empty((n + 1, *noise.shape), dtype=noise.dtype, device=noise.device)
    velocities = torch.empty((n, *noise.shape), dtype=noise.dtype, device=noise.device)
    x = noise.detach()
    latents[0] = x
    for i in range(n):
        v = velocity(x, float(grid[i]))
        if v.shape != x.shape:
            raise ValueError(
                f"velocity: returned shape {tuple(v.shape)} but the latent has shape {tuple(x.shape)}"
            )
        velocities[i] = v
        x = x + float(grid[i + 1] - grid[i]) * v
        latents[i + 1] = x
    return Trajectory(sigmas=grid, latents=latents, velocities=velocities)
