"""FlowBP-Lagrange: two Lagrange-quadrature connectors k → j → N with a few active supports each."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowbp.methods._common import JKParams, check_min, check_unit, rescale_factor
from flowbp.methods._registry import register
from flowbp.plan import Plan, Segment, make_segments

SUPPORT_MODES = ("none", "start", "midpoint", "all")


@dataclass(frozen=True)
class LagrangeParams(JKParams):
    jk_sampling: str = "dirichlet"
    alpha: float = 0.1  # coupling at j
    tau: float = 0.2  # similarity floor
    order: int = 3  # P support nodes per segment
    weights: str = "lagrange"  # or "uniform" (ablation)
    support_mode: str = (
        "midpoint"  # which supports re-forward: none | start | midpoint (start + 1st interior) | all
    )
    support_scale: float = 0.25  # backward scale of the non-start active supports
    max_active: int = 2  # per segment (<= 0: no cap)
    grad_rescale: float = 0.5
    anchor_lambda: float = 1.0  # 1: Lagrange connector; 0: the leap from the start; between: blend
    sample_weight: str = "similarity"
    detach_history: bool = True  # cached velocities are always detached (kept for config compatibility)

    def check(self) -> None:
        super().check()
        check_unit("alpha", self.alpha)
        check_unit("anchor_lambda", self.anchor_lambda)
        check_min("order", self.order, 1)
        check_min("grad_rescale", self.grad_rescale, 0.0)
        if self.weights not in ("lagrange", "uniform"):
            raise ValueError(f"weights: got {self.weights!r}; allowed: lagrange, uniform")
        if self.support_mode not in SUPPORT_MODES:
            raise ValueError(f"support_mode: got {self.support_mode!r}; allowed: {', '.join(SUPPORT_MODES)}")
        if self.sample_weight not in ("none", "similarity"):
            raise ValueError(f"sample_weight: got {self.sample_weight!r}; allowed: none, similarity")
        if not self.detach_history:
            raise ValueError(
                "detach_history: only true is meaningful — the cached rollout carries no gradient, so a "
                "non-active support velocity is always a constant"
            )


def _active_supports(seg: Segment, mode: str, max_active: int) -> list[int]:
    chosen = {"none": [], "start": [seg.start], "midpoint": list(seg.support[:2]), "all": list(seg.support)}[
        mode
    ]
    return chosen[:max_active] if max_active > 0 else chosen


@register("flowbp-lagrange", LagrangeParams, "lagrange(P) k→j→N, start + interior supports, α_j, similarity")
def build(sigmas: tuple[float, ...], rng: np.random.Generator, p: LagrangeParams) -> Plan:
    n = len(sigmas) - 1
    k, j = p.draw_jk(rng, n)
    anchors = (k, j, n)
    segments = []
    active: list[int] = []
    scale: dict[int, float] = {}
    for index, seg in enumerate(make_segments(sigmas, anchors, [p.weights, p.weights], p.order)):
        mine = _active_supports(seg, p.support_mode, p.max_active)
        # The factor comes from the Lagrange weights before any blend (the trainers' _lagrange_quadrature_predict).
        f = rescale_factor(seg.weights, [seg.support.index(i) for i in mine], p.grad_rescale)
        coeff = {i: seg.weights[seg.support.index(i)] * f * (1.0 if i == seg.start else p.support_scale)
                 for i in mine}  # backward coefficient of each active velocity: g_i · w_i
        w = list(seg.weights)
        if index == 0 and p.anchor_lambda != 1.0:
            # Only k → j is blended with the leap from k: x̂_j = λ·lagrange + (1 − λ)·(x_k + (σ_j − σ_k)·v_k),
            # where v_k always carries gradient in the leap part, unscaled.
            lam, leap = p.anchor_lambda, sigmas[seg.end] - sigmas[seg.start]
            w = [lam * x for x in w]
            w[0] += (1.0 - lam) * leap
            coeff = {i: lam * c for i, c in coeff.items()}
            coeff[seg.start] = coeff.get(seg.start, 0.0) + (1.0 - lam) * leap
            seg = Segment(seg.start, seg.end, seg.support, tuple(w), seg.rule)
            mine = sorted(coeff)
        segments.append(seg)
        for i in mine:
            wi = w[seg.support.index(i)]
            scale[i] = coeff[i] / wi if wi != 0.0 else f
        active.extend(mine)
    return Plan(
        sigmas=sigmas,
        anchors=anchors,
        segments=tuple(segments),
        active=tuple(active),
        coupling={j: p.alpha},
        grad_scale=scale,
        sample_weight=p.sample_weight,
        similarity_tau=p.tau,
    )
