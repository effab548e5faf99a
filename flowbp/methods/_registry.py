"""Method registry and typed, validated parameters.

A method is a function ``build(sigmas, rng, params) -> Plan`` plus a dataclass of its knobs with the
paper's defaults. Registering one is a decorator in one small module: no trainer changes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flowbp.plan import Plan
from flowbp.trajectory import as_sigma_grid

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


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check one override against its declared type; accept ints for floats and lists for tuples."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(name, value, option)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        inner = typing.get_args(annotation)
        elem = inner[0] if inner else Any
        return tuple(_coerce(f"{name}[]", v, elem) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{name}: expected a string, got {value!r}")
    if typing.get_origin(annotation) is typing.Literal:
        allowed = typing.get_args(annotation)
        if value in allowed:
            return value
        raise ValueError(f"{name}: got {value!r}; allowed: {', '.join(map(str, allowed))}")
    return value


def make_params(spec: MethodSpec, overrides: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(spec.params_cls)}
    hints = typing.get_type_hints(spec.params_cls)
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise ValueError(
            f"{spec.name}: unknown parameter {unknown[0]!r}; allowed: {', '.join(sorted(fields)) or '(none)'}"
        )
    values = {k: _coerce(f"{spec.name}.{k}", v, hints[k]) for k, v in overrides.items()}
    params = spec.params_cls(**values)
    check = getattr(params, "check", None)
    if check is not None:
        check()
    return params


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
