"""FlowBP-Bridge: exact Euler 0 → j → N, K active nodes split across j (always active), one coupling α_j.

Matches the released trainers (``trainers/*/flowbp_bridge.py``): j comes from the shared (k, j) sampler
(uniform: j is the later of two distinct nodes, so P(j) ∝ j); the K active nodes are split between
[window start, j) and [j, N) in proportion to the two lengths with at least one on each side; each side
draws its nodes late-biased *within the segment*; j is always one of the post-j nodes; one grad_rescale
factor over the whole training window scales every active node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowbp.methods._common import (
    JKParams,
    check_min,
    check_unit,
    late_biased_choice,
    train_window,
    window_rescale_factor,
)
from flowbp.methods._registry import register
from flowbp.plan import Plan, make_segments


@dataclass(frozen=True)
class BridgeParams(JKParams):
    num_active: int = 5  # K, including j (>= 2: one on each side of j)
    late_bias: float = 2.0
    grad_rescale: float = 1.0
    alpha: float = 0.1  # coupling at the bridge node j

    def check(self) -> None:
        super().check()
        check_min("num_active", self.num_active, 2)
        check_min("grad_rescale", self.grad_rescale, 0.0)
        check_unit("alpha", self.alpha)


def split_active(total: int, pre_len: int, post_len: int) -> tuple[int, int]:
    """Active nodes before / after j: ∝ the segment lengths, ≥ 1 each, capped by each length.

    The trainers' ``_allocate_flowbp_bridge_active_counts``, including Python's round-half-to-even.
    """
    if pre_len <= 0 or post_len <= 0:
        raise ValueError(f"j: both bridge segments must be non-empty, got lengths {pre_len} and {post_len}")
    total = min(int(total), pre_len + post_len)
    pre = min(max(round(total * pre_len / (pre_len + post_len)), 1), pre_len)
    post = total - pre
    if post < 1:
        post, pre = 1, total - 1
    if post > post_len:
        post, pre = post_len, total - post_len
    pre, post = min(max(pre, 1), pre_len), min(max(post, 1), post_len)
    missing = total - pre - post
    if missing > 0:
        add = min(missing, pre_len - pre)
        pre, missing = pre + add, missing - add
    if missing > 0:
        post += min(missing, post_len - post)
    return pre, post


@register("flowbp-bridge", BridgeParams, "euler 0→j→N, K active nodes split across j (incl. j), one α_j coupling")
def build(sigmas: tuple[float, ...], rng: np.random.Generator, p: BridgeParams) -> Plan:
    n = len(sigmas) - 1
    _, j = p.draw_jk(rng, n)
    window = train_window(n, p.tail_ratio, min_window=3)
    pre_count, post_count = split_active(p.num_active, j - window.lo, n - j)
    pre = late_biased_choice(rng, list(range(window.lo, j)), pre_count, p.late_bias, base=window.lo)
    post = late_biased_choice(rng, list(range(j + 1, n)), post_count - 1, p.late_bias, base=j + 1)
    active = sorted([*pre, j, *post])
    f = window_rescale_factor(sigmas, window, active, p.grad_rescale)
    anchors = (0, j, n)
    return Plan(
        sigmas=sigmas,
        anchors=anchors,
        segments=make_segments(sigmas, anchors, ["euler", "euler"]),
        active=tuple(active),
        coupling={j: p.alpha},
        grad_scale={i: f for i in active},
    )
