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
    last_n_steps: int = 11  # τ = N − U{1..last_n_steps}
    # 'endpoint' adds the final connector: the paper's Table 4 endpoint-faithful ablation.
    reward_input: Literal["posterior_mean", "endpoint"] = "posterior_mean"

    def check(self) -> None:
        check_min("last_n_steps", self.last_n_steps, 1)


@register("refl", ReFLParams, "leap from a random late node τ; reward on the posterior mean")
def build(sigmas: tuple[float, ...], rng: np.random.Generator, p: ReFLParams) -> Plan:
    n = len(sigmas) - 1
    if p.last_n_steps > n:
        raise ValueError(f"last_n_steps: {p.last_n_steps} is larger than the number of steps N={n}")
    tau = n - int(rng.integers(1, p.last_n_steps + 1))
    anchors = (tau, n)
    return Plan(
        sigmas=sigmas,
        anchors=anchors,
        segments=make_segments(sigmas, anchors, ["leap"]),
        active=(tau,),
        final_connector=p.reward_input == "endpoint",
        reward_input=p.reward_input,
    )
