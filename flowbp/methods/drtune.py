"""DRTune: Euler to a random stop node m with detached inputs on a few spread nodes, then leap to x̂_0."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flowbp.methods._common import check_min, check_unit
from flowbp.methods._registry import register
from flowbp.plan import Plan, make_segments


@dataclass(frozen=True)
class DRTuneParams:
    num_train_steps: int = 3  # evenly spaced active nodes in [0, m)
    early_stop_ratio: float = 0.4  # m = N − U{1..round(ratio·N)}
    early_stop_steps: int | None = None  # overrides the ratio when set

    def check(self) -> None:
        check_min("num_train_steps", self.num_train_steps, 1)
        check_unit("early_stop_ratio", self.early_stop_ratio)


@register("drtune", DRTuneParams, "euler 0→m (inputs detached, K spread active nodes), leap m→N on x̂_0")
def build(sigmas: tuple[float, ...], rng: np.random.Generator, p: DRTuneParams) -> Plan:
    n = len(sigmas) - 1
    stop = (
        p.early_stop_steps
        if p.early_stop_steps is not None
        else math.floor(p.early_stop_ratio * n + 0.5)
    )
    stop = max(1, min(stop, n - 1))
    m = n - int(rng.integers(1, stop + 1))
    if p.num_train_steps > m:
        raise ValueError(
            f"num_train_steps: K={p.num_train_steps} is larger than the {m} nodes before the stop node m={m}"
        )
    # Evenly spaced with a random offset (DRTune's strided selection), so every node can be trained.
    stride = m / p.num_train_steps
    offset = rng.uniform(0, stride)
    spread = sorted({min(m - 1, int(offset + stride * t)) for t in range(p.num_train_steps)})
    anchors = (0, m, n)
    return Plan(
        sigmas=sigmas,
        anchors=anchors,
        segments=make_segments(sigmas, anchors, ["euler", "leap"]),
        active=(*spread, m),
        final_connector=False,
        reward_input="posterior_mean",
    )
