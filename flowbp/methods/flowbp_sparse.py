"""FlowBP-Sparse: exact Euler connector over the whole trajectory, K late-biased active nodes, no Jacobian.

Matches the released trainers (``trainers/*/flowbp_sparse.py``): the K nodes are drawn ∝ (i + 1)^late_bias
from the training window (the last ⌈tail_ratio·N⌉ steps) and one grad_rescale factor, Σ|Δ| over that
window / Σ|Δ| over the active nodes, scales them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowbp.methods._common import check_min, late_biased_choice, train_window, window_rescale_factor
from flowbp.methods._registry import register
from flowbp.plan import Plan, make_segments


@dataclass(frozen=True)
class SparseParams:
    num_active: int = 3  # K
    late_bias: float = 2.0  # P(i) ∝ (i + 1)^late_bias
    grad_rescale: float = 1.0
    tail_ratio: float = 1.0  # draw only from the last ⌈ratio·N⌉ steps

    def check(self) -> None:
        check_min("num_active", self.num_active, 1)
        check_min("grad_rescale", self.grad_rescale, 0.0)


@register("flowbp-sparse", SparseParams, "euler 0→N, K late-biased active nodes, no Jacobian")
def build(sigmas: tuple[float, ...], rng: np.random.Generator, p: SparseParams) -> Plan:
    n = len(sigmas) - 1
    window = train_window(n, p.tail_ratio)
    active = late_biased_choice(rng, window.nodes(), p.num_active, p.late_bias)
    f = window_rescale_factor(sigmas, window, active, p.grad_rescale)
    anchors = (0, n)
    return Plan(
        sigmas=sigmas,
        anchors=anchors,
        segments=make_segments(sigmas, anchors, ["euler"]),
        active=tuple(active),
        grad_scale={i: f for i in active},
    )
