"""AlignProp: full backprop through every step (α = 1 everywhere), optional randomized truncation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowbp.methods._common import check_min
from flowbp.methods._registry import register
from flowbp.plan import Plan, make_segments


@dataclass(frozen=True)
class AlignPropParams:
    checkpoint: bool = True  # per-forward gradient checkpointing: activation memory of ~one call
    truncation: bool = False  # backprop only through the last K ~ U{truncation_min..N} steps
    truncation_min: int = 1

    def check(self) -> None:
        check_min("truncation_min", self.truncation_min, 1)


@register("alignprop", AlignPropParams, "exact backprop through all N steps (N − 1 Jacobians)")
def build(sigmas: tuple[float, ...], rng: np.random.Generator, p: AlignPropParams) -> Plan:
    n = len(sigmas) - 1
    if p.truncation_min > n:
        raise ValueError(f"truncation_min: {p.truncation_min} is larger than the number of steps N={n}")
    k = int(rng.integers(p.truncation_min, n + 1)) if p.truncation else n
    anchors = tuple(range(n - k, n + 1))
    return Plan(
        sigmas=sigmas,
        anchors=anchors,
        segments=make_segments(sigmas, anchors, ["leap"] * k),
        active=tuple(range(n - k, n)),
        coupling={a: 1.0 for a in anchors[1:-1]},
        checkpoint=p.checkpoint,
    )
