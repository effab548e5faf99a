"""Coarse-leap (beyond the paper): backprop through a K-step leap solver laid over the cached trajectory.

Anchors a_0 < a_1 < … < a_{K−1} < N spread over the trajectory; every anchor is active and leaps to the next
one with its own velocity (weight σ_{a_{l+1}} − σ_{a_l}); every anchor after the first is coupled with α.
With the connectors the forward value is still the cached sample, and the gradient is *exactly* the gradient
of the coarse K-step Euler sampler through the cached states: each velocity's parameter gradient meets an
adjoint carried back through K − 1 Jacobian factors (I + w_l ∂v/∂x) instead of the raw ∂L/∂x_N that the
depth-1 surrogates use for every node. Cost: K grad forwards (K = 4 by default), activation memory of K
forwards, chain depth K − 1 (the paper bounds depth by 1 against explosion on large models; where the exact
gradient does not explode, the depth buys a better adjoint).

Placement ``sigma`` puts anchor l at the first node with σ ≤ σ_start·(1 − l/K) (equal σ-length strata;
deterministic: one plan, no draw variance); ``index`` spaces them evenly in steps; ``stratified`` draws
anchor l uniformly inside stratum l (a random plan, for comparison).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowbp.methods._common import check_min, check_unit, train_window
from flowbp.methods._registry import register
from flowbp.plan import Plan, make_segments

PLACEMENTS = ("sigma", "index", "stratified")


@dataclass(frozen=True)
class CoarseLeapParams:
    num_active: int = 4  # K anchors, all re-forwarded
    placement: str = "sigma"
    alpha: float = 1.0  # coupling at every anchor after the first
    tail_ratio: float = 1.0  # the anchors cover the last ⌈ratio·N⌉ steps

    def check(self) -> None:
        check_min("num_active", self.num_active, 1)
        check_unit("alpha", self.alpha)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement: got {self.placement!r}; allowed: {', '.join(PLACEMENTS)}")
        if not (0 < self.tail_ratio <= 1):
            raise ValueError(f"tail_ratio: must be in (0, 1], got {self.tail_ratio}")


def strata(sigmas: tuple[float, ...], lo: int, hi: int, k: int) -> list[tuple[int, int]]:
    """K consecutive, non-empty node ranges [a, b) covering [lo, hi], cut at equal σ-length from σ_lo to 0."""
    top = sigmas[lo]
    cuts = [lo]
    for s in range(1, k):
        target = top * (1.0 - s / k)
        node = next((i for i in range(cuts[-1] + 1, hi + 1) if sigmas[i] <= target), hi + 1)
        cuts.append(min(node, hi - (k - 1 - s)))  # leave at least one node per later stratum
    cuts = [max(c, cuts[i - 1] + 1) if i else c for i, c in enumerate(cuts)]
    return list(zip(cuts, [*cuts[1:], hi + 1], strict=True))


@register("coarse-leap", CoarseLeapParams, "K coupled leaps spread over the trajectory (coarse-solver adjoint)")
def build(sigmas: tuple[float, ...], rng: np.random.Generator, p: CoarseLeapParams) -> Plan:
    n = len(sigmas) - 1
    window = train_window(n, p.tail_ratio)
    k = min(p.num_active, window.size)
    if p.placement == "index":
        anchors = sorted({window.lo + (s * window.size) // k for s in range(k)})
    else:
        ranges = strata(sigmas, window.lo, window.hi, k)
        if p.placement == "sigma":
            anchors = [a for a, _ in ranges]
        else:
            anchors = [int(rng.integers(a, b)) for a, b in ranges]
    anchors = [*anchors, n]
    return Plan(
        sigmas=sigmas,
        anchors=tuple(anchors),
        segments=make_segments(sigmas, anchors, ["leap"] * (len(anchors) - 1)),
        active=tuple(anchors[:-1]),
        coupling={a: p.alpha for a in anchors[1:-1]},
    )
