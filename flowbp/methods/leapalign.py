"""LeapAlign: two leaps k → j → N between two random nodes, one coupled anchor, similarity weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowbp.methods._common import JKParams, check_unit
from flowbp.methods._registry import register
from flowbp.plan import Plan, make_segments


@dataclass(frozen=True)
class LeapAlignParams(JKParams):
    alpha: float = 0.3  # coupling at j
    tau: float = 0.1  # similarity floor

    def check(self) -> None:
        super().check()
        check_unit("alpha", self.alpha)


@register("leapalign", LeapAlignParams, "leap k→j, leap j→N, α_j coupling, similarity sample weights")
def build(sigmas: tuple[float, ...], rng: np.random.Generator, p: LeapAlignParams) -> Plan:
    n = len(sigmas) - 1
    k, j = p.draw_jk(rng, n)
    anchors = (k, j, n)
    return Plan(
        sigmas=sigmas,
        anchors=anchors,
        segments=make_segments(sigmas, anchors, ["leap", "leap"]),
        active=(k, j),
        coupling={j: p.alpha},
        sample_weight="similarity",
        similarity_tau=p.tau,
    )
