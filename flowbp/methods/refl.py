"""ReFL: one re-forward at a late node τ, reward on the one-step posterior mean x_τ − σ_τ·v_τ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from flowbp.methods._common import check_min
from flowbp.methods._registry import register
from flowbp.plan import Plan, make_segments


@dataclass(frozen=True)
class ReFLParams:
    # τ = N − U{1..last_n_steps}; unset: the paper's 11 of 25 steps, scaled to N.
    last_n_steps: int | None = None
    # 'endpoint' adds the final connector: the paper's Table 4 endpoint-faithful ablation.
    reward_input: Literal["posterior_mean", "endpoint"] = "posterior_mean"

    def check(self) -> None:
        if self.last_n_steps is not None:
            check_min("last_n_steps", self.last_n_steps, 1)


@register("refl", ReFLParams, "leap from a random late node τ; reward on the posterior mean")
def build(sigmas: tuple[float, ...], rng: np.random.Generator, p: ReFLParams) -> Plan:
    n = len(sigmas) - 1
    last = max(1, round(11 * n / 25)) if p.last_n_steps is None else p.last_n_steps
    if last > n:
        raise ValueError(f"last_n_steps: {last} is larger than the number of steps N={n}")
    tau = n - int(rng.integers(1, last + 1))
    anchors = (tau, n)
    return Plan(
        sigmas=sigmas,
        anchors=anchors,
        segments=make_segments(sigmas, anchors, ["leap"]),
        active=(tau,),
        final_connector=p.reward_input == "endpoint",
        reward_input=p.reward_input,
    )
