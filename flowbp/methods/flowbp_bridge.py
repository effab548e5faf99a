"""FlowBP-Bridge: exact Euler 0 → j → N, K active nodes split across j (always active), one coupling α_j."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowbp.methods._common import check_min, check_unit, index_window, late_biased_choice, rescale_factor
from flowbp.methods._registry import register
from flowbp.plan import Plan, make_segments


@dataclass(frozen=True)
class BridgeParams:
    num_active: int = 5  # K, including j
    late_bias: float = 2.0
    grad_rescale: float = 1.0
    alpha: float = 0.1  # coupling at the bridge node j
    min_idx: int = 1  # j is drawn uniformly from the reverse-index window [min_idx, max_idx)
    max_idx: int | None = None
    tail_ratio: float = 1.0

    def check(self) -> None:
        check_min("num_active", self.num_active, 1)
        check_min("grad_rescale", self.grad_rescale, 0.0)
        check_unit("alpha", self.alpha)


@register("flowbp-bridge", BridgeParams, "euler 0→j→N, K active nodes incl. j, one α_j coupling")
def build(sigmas: tuple[float, ...], rng: np.random.Generator, p: BridgeParams) -> Plan:
    n = len(sigmas) - 1
    window = index_window(n, p.min_idx, p.max_idx, p.tail_ratio)
    # j > 0 so that the first segment is not empty.
    j_choices = [i for i in window.nodes() if i >= 1]
    if not j_choices:
        raise ValueError(f"window: no bridge node j >= 1 in [{window.lo}, {window.hi}]")
    j = int(rng.choice(j_choices))
    others = [i for i in range(n) if i != j]
    if p.num_active - 1 > len(others):
        raise ValueError(f"num_active: K={p.num_active} is larger than the {n} nodes of the trajectory")
    active = sorted([j, *late_biased_choice(rng, others, p.num_active - 1, p.late_bias)])
    anchors = (0, j, n)
    segments = make_segments(sigmas, anchors, ["euler", "euler"])
    scale: dict[int, float] = {}
    for seg in segments:
        mine = [i for i in active if seg.start <= i < seg.end]
        f = rescale_factor(seg.weights, [seg.support.index(i) for i in mine], p.grad_rescale)
        scale.update({i: f for i in mine})
    return Plan(
        sigmas=sigmas,
        anchors=anchors,
        segments=segments,
        active=tuple(active),
        coupling={j: p.alpha},
        grad_scale=scale,
    )
