"""Method registry and typed, validated parameters.

A method is a function ``build(sigmas, rng, params) -> Plan`` plus a dataclass of its knobs with the
paper's defaults. Registering one is a decorator in one small module: no trainer changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flowbp.plan import Plan
from flowbp.trajectory import as_sigma_grid
from flowbp.typecheck import build_dataclass

BuildFn = Callable[[tuple[float, ...], np.random.Generator, Any], Plan]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params_cls: type
    build: BuildFn
    summary: str


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, params_cls: type, summary: str) -> Callable[[BuildFn], BuildFn]:
    def wrap(build: BuildFn) -> BuildFn:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = MethodSpec(name, params_cls, build, summary)
        return build

    return wrap


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise ValueError(f"method: unknown method {name!r}; known methods: {', '.join(available_methods())}")
    return _REGISTRY[name]


def make_params(spec: MethodSpec, overrides: Mapping[str, Any]) -> Any:
    return build_dataclass(spec.params_cls, overrides, spec.name, what="parameter")


def rng_from(generator: torch.Generator | int | None) -> np.random.Generator:
    """One draw from the torch generator seeds the plan's own numpy stream.

    Every rank that seeds its generator identically therefore draws the identical plan (DESIGN 3.5.7).
    """
    if generator is None:
        return np.random.default_rng()
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return np.random.default_rng(seed)


def make_plan(
    name: str,
    sigmas: Sequence[float] | torch.Tensor,
    generator: torch.Generator | int | None = None,
    **overrides: Any,
) -> Plan:
    """Draw a plan of method ``name`` on the sigma grid, with the paper's defaults unless overridden."""
    spec = get_method(name)
    grid = tuple(float(s) for s in as_sigma_grid(sigmas))
    params = make_params(spec, overrides)
    plan = spec.build(grid, rng_from(generator), params)
    return dataclasses.replace(plan, method=name, params=dataclasses.asdict(params))
