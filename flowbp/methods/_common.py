"""Index samplers and knobs shared by several methods (windows, (k, j) draws, late-biased draws)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

JK_MODES = ("uniform", "dirichlet", "midpoint", "midpoint_j")


@dataclass(frozen=True)
class Window:
    """Forward nodes [lo, hi] a method may draw from (inclusive)."""

    lo: int
    hi: int

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1

    def nodes(self) -> list[int]:
        return list(range(self.lo, self.hi + 1))


def train_window(n: int, tail_ratio: float = 1.0, min_window: int = 1) -> Window:
    """The trainable forward steps: the last ⌈ratio·N⌉ of them (at least ``min_window``).

    The released trainers' ``resolve_train_step_window``: a tail ratio of 0.7 at N = 25 keeps forward
    steps 7..24. Sparse draws its active nodes here and both Sparse and Bridge measure their
    grad_rescale factor over this window.
    """
    if not (0 < tail_ratio <= 1):
        raise ValueError(f"tail_ratio: must be in (0, 1], got {tail_ratio}")
    min_window = max(1, min(int(min_window), n))
    length = min(max(min_window, math.ceil(n * tail_ratio)), n)
    return Window(lo=n - length, hi=n - 1)


def index_window(n: int, min_idx: int = 1, max_idx: int | None = None, tail_ratio: float = 1.0) -> Window:
    """The paper's reverse-index window [min_idx, max_idx) (r = 1 is the last step) as forward nodes.

    Clipped to :func:`train_window` (at least 3 steps, as the trainers' ``make_jk_window_args``):
    FLUX.2-Klein's tail_ratio 0.7 gives reverse [1, 19), forward nodes 7..24, at N = 25.
    """
    tail = train_window(n, tail_ratio, min_window=3)
    lo_rev = max(min_idx, n - tail.hi)
    hi_rev = min(n + 1 if max_idx is None else max_idx, n - tail.lo + 1)
    if not (1 <= lo_rev < hi_rev <= n + 1):
        raise ValueError(
            f"min_idx/max_idx: need 1 <= min_idx < max_idx <= N+1={n + 1} (after tail_ratio), "
            f"got min_idx={lo_rev}, max_idx={hi_rev}"
        )
    # reverse r in [lo_rev, hi_rev) <-> forward node N - r
    return Window(lo=n - (hi_rev - 1), hi=n - lo_rev)


def sample_jk(
    rng: np.random.Generator,
    n: int,
    window: Window,
    mode: str = "uniform",
    dirichlet: Sequence[float] = (2.5, 6.0, 2.0),
    max_j_rev: int | None = None,
) -> tuple[int, int]:
    """Two forward nodes k < j inside ``window`` (LeapAlign, FlowBP-Lagrange).

    ``dirichlet`` splits the window into three runs A | B | C (in reverse order: A ends at j, B is the
    gap j–k, C runs from k to the window's noisy end) with proportions ~ Dir(α_a, α_b, α_c); larger
    concentrations mean less variance in the placement. ``max_j_rev`` caps how far j may sit from the
    end (overflow moves to C, preserving the gap).
    """
    if window.size < 2:
        raise ValueError(f"window: needs at least 2 nodes to draw k < j, has {window.size}")
    min_rev, span = n - window.hi, window.size  # reverse indices [min_rev, min_rev + span)
    if mode == "uniform":
        if max_j_rev is not None:
            j_rev_hi = min(max_j_rev, min_rev + span - 2)
            if j_rev_hi < min_rev:
                raise ValueError(f"max_j_rev: {max_j_rev} leaves no room for j in the window")
            j_rev = int(rng.integers(min_rev, j_rev_hi + 1))
            k_rev = int(rng.integers(j_rev + 1, min_rev + span))
        else:
            pair = rng.choice(span, size=2, replace=False) + min_rev
            k_rev, j_rev = int(max(pair)), int(min(pair))
    elif mode == "dirichlet":
        if span < 3:
            raise ValueError(f"window: dirichlet (k, j) sampling needs at least 3 nodes, has {span}")
        if len(dirichlet) != 3 or any(c <= 0 for c in dirichlet):
            raise ValueError(f"dirichlet: need three positive concentrations, got {list(dirichlet)}")
        props = rng.dirichlet(np.asarray(dirichlet, dtype=np.float64))
        lengths = np.rint(props * span).astype(int)
        lengths[int(np.argmax(props))] += span - lengths.sum()
        lengths = np.maximum(lengths, 1)
        lengths[int(np.argmax(lengths))] += span - lengths.sum()
        if max_j_rev is not None:
            cap = max(1, max_j_rev - min_rev)
            if lengths[0] > cap:
                lengths[2] += lengths[0] - cap
                lengths[0] = cap
        j_rev = int(lengths[0]) + min_rev
        k_rev = int(lengths[0] + lengths[1]) + min_rev
        # The three runs fill the window, so k_rev may equal min_rev + span; keep k inside it.
        k_rev = min(k_rev, min_rev + span - 1)
        j_rev = min(j_rev, k_rev - 1)
    elif mode == "midpoint":
        k_rev = int(rng.integers(min_rev + 1, min_rev + span))
        k = n - k_rev
        j = max((k + n) // 2, k + 1)
        return k, min(j, window.hi)
    elif mode == "midpoint_j":
        j_rev = int(rng.integers(min_rev, min_rev + span - 1))
        j = n - j_rev
        return max(window.lo, min(j // 2, j - 1)), j
    else:
        raise ValueError(f"jk_sampling: unknown mode {mode!r}; allowed: {', '.join(JK_MODES)}")
    return n - k_rev, n - j_rev


def late_biased_choice(
    rng: np.random.Generator, candidates: Sequence[int], count: int, late_bias: float, base: int = 0
) -> list[int]:
    """``count`` distinct nodes drawn without replacement with probability ∝ (i − base + 1)^late_bias.

    Successive draws among the remaining nodes, as ``torch.multinomial(replacement=False)`` in the
    released trainers. ``base`` = 0 biases by the absolute node (Sparse); Bridge passes each segment's
    first node, so the bias applies within the segment (the trainers' offsets 0..length−1).
    """
    if count > len(candidates):
        raise ValueError(
            f"num_active: K={count} is larger than the {len(candidates)} nodes available "
            f"({min(candidates) if candidates else '-'}..{max(candidates) if candidates else '-'})"
        )
    if count <= 0:
        return []
    cand = np.asarray(candidates, dtype=np.int64)
    p = (cand - base + 1.0) ** float(late_bias)
    picked = rng.choice(cand, size=count, replace=False, p=p / p.sum())
    return sorted(int(i) for i in picked)


def rescale_factor(weights: Sequence[float], active_positions: Sequence[int], strength: float) -> float:
    """f = 1 + gr · (Σ|w| over the segment / Σ|w| over its active nodes − 1).

    A few active nodes then carry the gradient magnitude of the whole interval (gr = 1) or part of it.
    """
    if strength == 0 or not active_positions:
        return 1.0
    total = sum(abs(w) for w in weights)
    act = sum(abs(weights[p]) for p in active_positions)
    if act <= 1e-12:
        return 1.0
    return 1.0 + strength * (total / act - 1.0)


def window_rescale_factor(
    sigmas: Sequence[float], window: Window, active: Sequence[int], strength: float
) -> float:
    """Sparse's and Bridge's single factor: Σ|Δ_i| over the training window / Σ|Δ_i| over the active nodes."""
    steps = [abs(sigmas[i + 1] - sigmas[i]) for i in range(window.lo, window.hi + 1)]
    return rescale_factor(steps, [i - window.lo for i in active], strength)


def check_unit(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name}: must be in [0, 1], got {value}")


def check_min(name: str, value: float, low: float) -> None:
    if not value >= low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")


@dataclass(frozen=True)
class JKParams:
    """Knobs of the (k, j) index draw shared by LeapAlign and FlowBP-Lagrange (reverse-index window)."""

    jk_sampling: str = "uniform"
    dirichlet: tuple[float, ...] = (2.5, 6.0, 2.0)
    max_j_rev: int | None = None
    min_idx: int = 1
    max_idx: int | None = None
    tail_ratio: float = 1.0

    def check(self) -> None:
        if self.jk_sampling not in JK_MODES:
            raise ValueError(f"jk_sampling: got {self.jk_sampling!r}; allowed: {', '.join(JK_MODES)}")

    def draw_jk(self, rng: np.random.Generator, n: int) -> tuple[int, int]:
        window = index_window(n, self.min_idx, self.max_idx, self.tail_ratio)
        return sample_jk(rng, n, window, self.jk_sampling, self.dirichlet, self.max_j_rev)
