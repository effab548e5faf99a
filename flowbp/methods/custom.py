"""``custom``: any plan from the four design axes, given as configuration (no code).

Axes: reward-model input (``reward_input``, ``renoised``), active set (``active``), integration weights
(``weights``, ``order``) and bridge coupling (``coupling``); plus anchors and the sample-weight rule.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from flowbp.methods._common import check_min, late_biased_choice, rescale_factor
from flowbp.methods._registry import register
from flowbp.plan import Plan, make_segments
from flowbp.quadrature import RULES


@dataclass(frozen=True)
class CustomParams:
    # Interior anchors as forward nodes (negative counts from N: -5 is N - 5). The plan always starts at
    # ``start`` and ends at N.
    anchors: tuple[int, ...] = ()
    start: int = 0
    weights: tuple[str, ...] = ("euler",)  # one rule for every segment, or one per segment
    order: int = 3  # support size of lagrange / uniform
    # Active set: "starts" (each segment's start), "all" (every support node), "random" (num_active
    # late-biased supports), or explicit nodes in ``active_nodes``.
    active: str = "starts"
    active_nodes: tuple[int, ...] = ()
    num_active: int = 3
    late_bias: float = 0.0
    grad_rescale: float = 0.0
    coupling: tuple[float, ...] = (0.0,)  # α at each interior anchor (one value for all, or one each)
    reward_input: str = "endpoint"
    renoised: int = 0
    sample_weight: str = "none"
    tau: float = 0.1
    checkpoint: bool = False

    def check(self) -> None:
        bad = [r for r in self.weights if r not in RULES]
        if bad or not self.weights:
            raise ValueError(f"weights: got {list(self.weights)}; allowed rules: {', '.join(RULES)}")
        if self.active not in ("starts", "all", "random", "nodes"):
            raise ValueError(f"active: got {self.active!r}; allowed: starts, all, random, nodes")
        check_min("order", self.order, 1)
        check_min("renoised", self.renoised, 0)


def _resolve(node: int, n: int) -> int:
    return n + node if node < 0 else node


@register("custom", CustomParams, "any plan from the four axes, given as configuration")
def build(sigmas: tuple[float, ...], rng: np.random.Generator, p: CustomParams) -> Plan:
    n = len(sigmas) - 1
    interior = [_resolve(a, n) for a in p.anchors]
    anchors = (_resolve(p.start, n), *interior, n)
    if any(b <= a for a, b in itertools.pairwise(anchors)) or anchors[0] < 0:
        raise ValueError(f"anchors: must be strictly increasing nodes in [0, N={n}], got {list(anchors)}")
    n_seg = len(anchors) - 1
    rules = list(p.weights) * n_seg if len(p.weights) == 1 else list(p.weights)
    if len(rules) != n_seg:
        raise ValueError(f"weights: give one rule or one per segment ({n_seg}), got {list(p.weights)}")
    segments = make_segments(sigmas, anchors, rules, p.order)
    supported = [i for s in segments for i in s.support]
    if p.active == "starts":
        active = [s.start for s in segments]
    elif p.active == "all":
        active = supported
    elif p.active == "random":
        active = late_biased_choice(rng, supported, p.num_active, p.late_bias)
    else:
        active = [_resolve(i, n) for i in p.active_nodes]
    scale: dict[int, float] = {}
    for seg in segments:
        mine = [i for i in active if i in seg.support]
        f = rescale_factor(seg.weights, [seg.support.index(i) for i in mine], p.grad_rescale)
        scale.update({i: f for i in mine})
    alphas = list(p.coupling) * (n_seg - 1) if len(p.coupling) == 1 else list(p.coupling)
    if len(alphas) != n_seg - 1:
        raise ValueError(
            f"coupling: give one α or one per interior anchor ({n_seg - 1}), got {list(p.coupling)}"
        )
    return Plan(
        sigmas=sigmas,
        anchors=anchors,
        segments=segments,
        active=tuple(active),
        coupling={a: x for a, x in zip(anchors[1:-1], alphas, strict=True) if x > 0},
        grad_scale=scale,
        final_connector=p.reward_input == "endpoint",
        reward_input=p.reward_input,
        renoised=p.renoised,
        sample_weight=p.sample_weight,
        similarity_tau=p.tau,
        checkpoint=p.checkpoint,
    )
