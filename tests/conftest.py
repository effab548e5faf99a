"""Shared test fields: a linear velocity field with known Jacobian and a small nonlinear one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

torch.set_num_threads(max(1, torch.get_num_threads()))


def a_of(sigma: float) -> float:
    """∂v/∂x of the linear field (a scalar multiple of the identity)."""
    return 0.5 + sigma


def c_of(sigma: float) -> float:
    """∂v/∂θ of the linear field (a scalar multiple of the identity)."""
    return 1.0 + sigma**2


class LinearField(nn.Module):
    """v(x, σ) = a(σ)·x + c(σ)·θ with θ ∈ R^D shared by the batch: every Jacobian is known by hand."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.linspace(-1.0, 1.0, dim, dtype=dtype))

    def forward(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return a_of(sigma) * x + c_of(sigma) * self.theta


class MLPField(nn.Module):
    """A small nonlinear, σ-conditioned velocity field for finite-difference checks."""

    def __init__(self, dim: int, hidden: int = 16, dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(dim, hidden, generator=g, dtype=dtype) * 0.5)
        self.b1 = nn.Parameter(torch.randn(hidden, generator=g, dtype=dtype) * 0.1)
        self.s1 = nn.Parameter(torch.randn(hidden, generator=g, dtype=dtype) * 0.5)
        self.w2 = nn.Parameter(torch.randn(hidden, dim, generator=g, dtype=dtype) * 0.5)

    def forward(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return torch.tanh(x @ self.w1 + self.b1 + sigma * self.s1) @ self.w2


@pytest.fixture
def sigmas10() -> torch.Tensor:
    return shifted(10)


def shifted(n: int, shift: float = 3.0) -> torch.Tensor:
    s = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random SD3 pipeline saved once per test session (tests/tiny_pipelines.py)."""
    from tiny_pipelines import build_tiny_sd3

    directory = tmp_path_factory.mktemp("tiny-sd3")
    build_tiny_sd3(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_flux1_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random FLUX.1 (guidance-distilled) pipeline saved once per test session."""
    from tiny_pipelines import build_tiny_flux1

    directory = tmp_path_factory.mktemp("tiny-flux1")
    build_tiny_flux1(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_flux2_klein_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random FLUX.2-Klein pipeline saved once per test session."""
    from tiny_pipelines import build_tiny_flux2_klein

    directory = tmp_path_factory.mktemp("tiny-flux2-klein")
    build_tiny_flux2_klein(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_qwen_image_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Qwen-Image pipeline saved once per test session."""
    from tiny_pipelines import build_tiny_qwen_image

    directory = tmp_path_factory.mktemp("tiny-qwen-image")
    build_tiny_qwen_image(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_z_image_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Z-Image pipeline saved once per test session."""
    from tiny_pipelines import build_tiny_z_image

    directory = tmp_path_factory.mktemp("tiny-z-image")
    build_tiny_z_image(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_flux2_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random FLUX.2-dev (guidance-distilled) pipeline saved once per test session."""
    from tiny_pipelines import build_tiny_flux2

    directory = tmp_path_factory.mktemp("tiny-flux2")
    build_tiny_flux2(directory)
    return directory
