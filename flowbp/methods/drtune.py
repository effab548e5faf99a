"""DRTune: Euler to a random stop node m with detached inputs on a few strided nodes, then leap to x̂_0.

Matches the released trainers (``trainers/*/drtune.py``): m = N − U{1..round(ratio·N)}; the trained nodes
are ``num_train_steps`` nodes with a fixed stride ⌊(m+1)/K⌋ from a start drawn uniformly so that the last
one stays ≤ m. The reward scores the posterior mean at m, x_m − σ_m·v_m: v_m carries gradient only when the
stride lands on m (otherwise it is the cached velocity), and every trained node reaches x_m through the
Euler sum with its input detached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from flowbp.methods._common import check_min, check_unit
from flowbp.methods._registry import register
from flowbp.plan import Plan, make_segments


@dataclass(frozen=True)
class DRTuneParams:
    num_train_steps: int = 3  # K strided trained nodes in [0, m]
    early_stop_ratio: float = 0.4  # m = N − U{1..round(ratio·N)}
    early_stop_steps: int | None = None  # overrides the ratio when set
    # 'endpoint' adds the final connector (same draw, same active set): the paper's Table 4 endpoint-faithful
    # ablation, as ReFL's option of the same name.
    reward_input: Literal["posterior_mean", "endpoint"] = "posterior_mean"

    def check(self) -> None:
        check_min("num_train_steps", self.num_train_steps, 1)
        check_unit("early_stop_ratio", self.early_stop_ratio)
        if self.early_stop_steps is not None:
            check_min("early_stop_steps", self.early_stop_steps, 0)


def stop_node(rng: np.random.Generator, n: int, p: DRTuneParams) -> int:
    """m = N − r, r ~ U{1..S}, S = round(ratio·N) (Python's rounding, as the trainer) or early_stop_steps."""
    steps = p.early_stop_steps if p.early_stop_steps is not None else round(n * p.early_stop_ratio)
    if steps <= 0:
        return n - 1
    return n - int(rng.integers(1, min(steps, n) + 1))


def strided_nodes(rng: np.random.Generator, count: int, k: int) -> list[int]:
    """``k`` nodes of [0, count) with a fixed stride from a uniform start (the trainers' equally spaced draw)."""
    k = min(k, count)
    if k == count:
        return list(range(count))
    stride = max(1, count // k)
    max_start = count - 1 - (k - 1) * stride
    if max_start < 0:
        stride = max(1, (count - 1) // max(1, k - 1))
        max_start = count - 1 - (k - 1) * stride
    start = int(rng.integers(0, max(0, max_start) + 1))
    return [start + t * stride for t in range(k)]


@register("drtune", DRTuneParams, "euler 0→m (inputs detached, K strided nodes in [0, m]), leap m→N on x̂_0")
def build(sigmas: tuple[float, ...], rng: np.random.Generator, p: DRTuneParams) -> Plan:
    n = len(sigmas) - 1
    m = stop_node(rng, n, p)
    active = strided_nodes(rng, m + 1, p.num_train_steps)
    anchors = (0, m, n) if m > 0 else (0, n)
    return Plan(
        sigmas=sigmas,
        anchors=anchors,
        segments=make_segments(sigmas, anchors, ["euler", "leap"] if m > 0 else ["leap"]),
        active=tuple(active),
        final_connector=p.reward_input == "endpoint",
        reward_input=p.reward_input,
    )
