"""A plan: the data that describes one surrogate (DESIGN.md 3.2).

A plan is plain, frozen, validated data. The engine executes it; methods only generate it. Every
method of the paper is a plan, and so is anything a user writes with the ``custom`` method.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

REWARD_INPUTS = ("endpoint", "posterior_mean")
SAMPLE_WEIGHTS = ("none", "similarity")


@dataclass(frozen=True)
class Segment:
    """x̂_end = x̃_start + Σ_i weights[i] · ṽ_{support[i]}; support ⊆ [start, end)."""

    start: int
    end: int
    support: tuple[int, ...]
    weights: tuple[float, ...]
    rule: str = "custom"  # the quadrature rule that produced the weights (for display)


@dataclass(frozen=True)
class Plan:
    """Anchors, segments, active nodes, couplings and scales of one surrogate.

    ``coupling`` maps an anchor to α ∈ [0, 1]: the re-forwarded velocity at that anchor sees
    ``sg(x) + α·(x̃ − sg(x̃))``, the only place where a Jacobian ∂v/∂x enters the gradient.
    ``grad_scale`` maps each active node to g: the backward of its velocity is multiplied by g.
    """

    sigmas: tuple[float, ...]
    anchors: tuple[int, ...]
    segments: tuple[Segment, ...]
    active: tuple[int, ...]
    coupling: Mapping[int, float] = field(default_factory=dict)
    grad_scale: Mapping[int, float] = field(default_factory=dict)
    final_connector: bool = True
    reward_input: str = "endpoint"
    renoised: int = 0
    sample_weight: str = "none"
    similarity_tau: float = 0.1
    checkpoint: bool = False  # recompute each grad forward in backward (activation memory ~ one call)
    method: str = "custom"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalise containers so that equal plans compare equal and plans stay immutable.
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        object.__setattr__(self, "anchors", tuple(int(a) for a in self.anchors))
        object.__setattr__(self, "segments", tuple(self.segments))
        object.__setattr__(self, "active", tuple(sorted(int(i) for i in self.active)))
        object.__setattr__(self, "coupling", {int(k): float(v) for k, v in sorted(self.coupling.items())})
        scales = {int(i): 1.0 for i in self.active}
        scales.update({int(k): float(v) for k, v in self.grad_scale.items()})
        object.__setattr__(self, "grad_scale", dict(sorted(scales.items())))
        object.__setattr__(self, "params", dict(self.params))
        self.validate()

    # ------------------------------------------------------------------ validation
    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def validate(self) -> None:
        n = self.num_steps
        s = self.sigmas
        if (
            n < 1
            or any(not math.isfinite(x) for x in s)
            or any(b >= a for a, b in itertools.pairwise(s))
        ):
            raise ValueError(f"sigmas: must be finite and strictly decreasing with N >= 1, got {list(s)}")
        if s[-1] != 0.0:
            raise ValueError(f"sigmas: must end at 0, got last value {s[-1]}")
        a = self.anchors
        if len(a) < 2 or any(y <= x for x, y in itertools.pairwise(a)) or a[0] < 0 or a[-1] > n:
            raise ValueError(f"anchors: need >= 2 strictly increasing nodes in [0, N={n}], got {list(a)}")
        if len(self.segments) != len(a) - 1:
            raise ValueError(
                f"segments: need one per anchor interval ({len(a) - 1}), got {len(self.segments)}"
            )
        supported: set[int] = set()
        for k, seg in enumerate(self.segments):
            if (seg.start, seg.end) != (a[k], a[k + 1]):
                raise ValueError(
                    f"segments[{k}]: must run from anchor {a[k]} to anchor {a[k + 1]}, got {seg.start}->{seg.end}"
                )
            if len(seg.support) != len(seg.weights) or not seg.support:
                raise ValueError(
                    f"segments[{k}]: support {list(seg.support)} and weights {list(seg.weights)} must be "
                    "non-empty and of equal length"
                )
            if len(set(seg.support)) != len(seg.support) or any(
                not (seg.start <= i < seg.end) for i in seg.support
            ):
                raise ValueError(
                    f"segments[{k}].support: nodes must be distinct and in [{seg.start}, {seg.end}), "
                    f"got {list(seg.support)}"
                )
            if any(not math.isfinite(w) for w in seg.weights):
                raise ValueError(f"segments[{k}].weights: must be finite, got {list(seg.weights)}")
            supported.update(seg.support)
        if len(set(self.active)) != len(self.active):
            raise ValueError(f"active: nodes must be distinct, got {list(self.active)}")
        stray = [i for i in self.active if i not in supported]
        if stray:
            raise ValueError(
                f"active: nodes {stray} are in no segment's support (supported nodes: {sorted(supported)})"
            )
        for j, alpha in self.coupling.items():
            if j not in a:
                raise ValueError(f"coupling: key {j} is not an anchor (anchors: {list(a)})")
            if not (0.0 <= alpha <= 1.0):
                raise ValueError(f"coupling[{j}]: α must be in [0, 1], got {alpha}")
        for i, g in self.grad_scale.items():
            if i not in self.active:
                raise ValueError(f"grad_scale: key {i} is not an active node (active: {list(self.active)})")
            if not math.isfinite(g):
                raise ValueError(f"grad_scale[{i}]: must be finite, got {g}")
        if self.reward_input not in REWARD_INPUTS:
            raise ValueError(f"reward_input: got {self.reward_input!r}; allowed: {', '.join(REWARD_INPUTS)}")
        if self.reward_input == "posterior_mean":
            last = self.segments[-1]
            if self.final_connector or a[-1] != n or last.support != (last.start,):
                raise ValueError(
                    "reward_input: 'posterior_mean' needs a last segment that is a single leap to N from its "
                    "start and final_connector=False"
                )
        elif a[-1] != n:
            raise ValueError(f"anchors: an endpoint plan must end at N={n}, got last anchor {a[-1]}")
        if self.renoised < 0:
            raise ValueError(f"renoised: must be >= 0, got {self.renoised}")
        if self.sample_weight not in SAMPLE_WEIGHTS:
            raise ValueError(
                f"sample_weight: got {self.sample_weight!r}; allowed: {', '.join(SAMPLE_WEIGHTS)}"
            )
        if not (self.similarity_tau > 0):
            raise ValueError(f"similarity_tau: must be > 0, got {self.similarity_tau}")

    # ------------------------------------------------------------------ derived facts
    @property
    def grad_forwards(self) -> int:
        """Network calls made with gradient: one per active node, one per renoised input."""
        return len(self.active) + self.renoised

    def alpha(self, node: int) -> float:
        return self.coupling.get(node, 0.0)

    def _gradient_walk(self) -> tuple[int, frozenset[int]]:
        """Walk the segments tracking, at each anchor, the longest Jacobian chain its x̃ carries."""
        active = set(self.active)
        depth_at: dict[int, int | None] = {self.anchors[0]: None}  # None: x̃ carries no gradient
        coupled: set[int] = set()
        for seg in self.segments:
            best = depth_at[seg.start]
            for i in seg.support:
                if i not in active:
                    continue
                d = 0
                upstream = depth_at.get(i)
                if self.alpha(i) > 0 and upstream is not None:
                    coupled.add(i)
                    d = upstream + 1
                best = d if best is None else max(best, d)
            depth_at[seg.end] = best
        result = depth_at[self.anchors[-1]]
        return (0 if result is None else result), frozenset(coupled)

    @property
    def chain_depth(self) -> int:
        """Longest number of Jacobian factors ∂v/∂x on any gradient path to the reward input.

        A factor appears when an active anchor with α > 0 re-forwards from an x̃ that already carries
        gradient. (DRaFT-LV's renoised inputs start from sg(x_N) and add none.)
        """
        return self._gradient_walk()[0]

    @property
    def coupled_nodes(self) -> frozenset[int]:
        """Active anchors whose re-forward backpropagates into its input (α > 0 and x̃ carries gradient)."""
        return self._gradient_walk()[1]

    # ------------------------------------------------------------------ display
    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "params": dict(self.params),
            "num_steps": self.num_steps,
            "anchors": list(self.anchors),
            "segments": [
                {
                    "start": s.start,
                    "end": s.end,
                    "rule": s.rule,
                    "support": list(s.support),
                    "weights": list(s.weights),
                }
                for s in self.segments
            ],
            "active": list(self.active),
            "coupling": dict(self.coupling),
            "grad_scale": dict(self.grad_scale),
            "final_connector": self.final_connector,
            "reward_input": self.reward_input,
            "renoised": self.renoised,
            "sample_weight": self.sample_weight,
            "similarity_tau": self.similarity_tau,
            "checkpoint": self.checkpoint,
            "grad_forwards": self.grad_forwards,
            "chain_depth": self.chain_depth,
        }

    def describe(self) -> str:
        """A readable table: one row per support node, then the summary."""
        lines = [f"plan: {self.method}  (N={self.num_steps})"]
        if self.params:
            lines.append("params: " + ", ".join(f"{k}={v}" for k, v in self.params.items()))
        lines.append(f"anchors: {' -> '.join(str(a) for a in self.anchors)}")
        header = (
            f"{'segment':>10}  {'rule':<9} {'node':>4} {'sigma':>8} {'weight':>11}  "
            f"{'active':<6} {'g':>6} {'alpha':>6}"
        )
        lines.append(header)
        lines.append("-" * len(header))
        active = set(self.active)
        for seg in self.segments:
            label = f"{seg.start}->{seg.end}"
            for i, w in zip(seg.support, seg.weights, strict=True):
                is_active = i in active
                g = f"{self.grad_scale[i]:.3g}" if is_active else ""
                a = f"{self.coupling[i]:.3g}" if i in self.coupling else ""
                lines.append(
                    f"{label:>10}  {seg.rule:<9} {i:>4} {self.sigmas[i]:>8.4f} {w:>11.6f}  "
                    f"{'yes' if is_active else '':<6} {g:>6} {a:>6}"
                )
                label = ""
        reward = self.reward_input + (f" + renoised({self.renoised})" if self.renoised else "")
        sw = self.sample_weight + (
            f"(tau={self.similarity_tau:g})" if self.sample_weight == "similarity" else ""
        )
        lines.append("-" * len(header))
        lines.append(f"reward input: {reward}   final connector: {'on' if self.final_connector else 'off'}")
        lines.append(f"sample weight: {sw}")
        lines.append(
            f"grad forwards: {self.grad_forwards}   chain depth: {self.chain_depth}"
            + ("   (gradient checkpointing)" if self.checkpoint else "")
        )
        return "\n".join(lines)


def make_segments(
    sigmas: Sequence[float], anchors: Sequence[int], rules: Sequence[str], order: int = 3
) -> tuple[Segment, ...]:
    """Build one segment per anchor interval with the named quadrature rules."""
    from flowbp import quadrature

    if len(rules) != len(anchors) - 1:
        raise ValueError(f"rules: need one per segment ({len(anchors) - 1}), got {list(rules)}")
    segments = []
    for start, end, rule in zip(anchors, anchors[1:], rules, strict=False):
        nodes, weights = quadrature.weights(rule, sigmas, start, end, order)
        segments.append(Segment(start, end, tuple(nodes), tuple(weights), rule))
    return tuple(segments)
