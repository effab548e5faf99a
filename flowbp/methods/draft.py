"""DRaFT-K (exact backprop through the last K steps) and DRaFT-LV (last step + renoised inputs)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowbp.methods._common import check_min
from flowbp.methods._registry import register
from flowbp.plan import Plan, make_segments


@dataclass(frozen=True)
class DraftKParams:
    k: int = 1  # steps backpropagated through; K − 1 Jacobian factors

    def check(self) -> None:
        check_min("k", self.k, 1)


@register("draft-k", DraftKParams, "exact Euler through the last K steps, α = 1 (K − 1 Jacobians)")
def build_k(sigmas: tuple[float, ...], rng: np.random.Generator, p: DraftKParams) -> Plan:
    n = len(sigmas) - 1
    if p.k > n:
        raise ValueError(f"k: K={p.k} is larger than the number of steps N={n}")
    anchors = tuple(range(n - p.k, n + 1))
    return Plan(
        sigmas=sigmas,
        anchors=anchors,
        segments=make_segments(sigmas, anchors, ["leap"] * p.k),
        active=tuple(range(n - p.k, n)),
        coupling={a: 1.0 for a in anchors[1:-1]},
    )


@dataclass(frozen=True)
class DraftLVParams:
    num_noised: int = 2  # extra renoised inputs averaged with the base input

    def check(self) -> None:
        check_min("num_noised", self.num_noised, 0)


@register("draft-lv", DraftLVParams, "last step + n renoised one-step inputs (lower variance)")
def build_lv(sigmas: tuple[float, ...], rng: np.random.Generator, p: DraftLVParams) -> Plan:
    n = len(sigmas) - 1
    anchors = (n - 1, n)
    return Plan(
        sigmas=sigmas,
        anchors=anchors,
        segments=make_segments(sigmas, anchors, ["leap"]),
        active=(n - 1,),
        renoised=p.num_noised,
    )
