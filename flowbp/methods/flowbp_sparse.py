"""FlowBP-Sparse: exact Euler connector over the whole trajectory, K late-biased active nodes, no Jacobian."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowbp.methods._common import check_min, index_window, late_biased_choice, rescale_factor
from flowbp.methods._registry import register
from flowbp.plan import Plan, make_segments


@dataclass(frozen=True)
class SparseParams:
    num_active: int = 3  # K
    late_bias: float = 2.0  # P(i) ∝ (i + 1)^late_bias
    grad_rescale: float = 1.0
    tail_ratio: float = 1.0  # draw only from the last ratio·N steps

    def check(self) -> None:
        check_min("num_active", self.num_active, 1)
        check_min("grad_rescale", self.grad_rescale, 0.0)


@register("flowbp-sparse", SparseParams, "euler 0→N, K late-biased active nodes, no Jacobian")
def build(sigmas: tuple[float, ...], rng: np.random.Generator, p: SparseParams) -> Plan:
    n = len(sigmas) - 1
    window = index_window(n, tail_ratio=p.tail_ratio)
    active = late_biased_choice(rng, window.nodes(), p.num_active, p.late_bias)
    anchors = (0, n)
    segments = make_segments(sigmas, anchors, ["euler"])
    f = rescale_factor(segments[0].weights, [segments[0].support.index(i) for i in active], p.grad_rescale)
    return Plan(
        sigmas=sigmas,
        anchors=anchors,
        segments=segments,
        active=tuple(active),
        grad_scale={i: f for i in active},
    )
