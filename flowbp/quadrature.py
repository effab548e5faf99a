"""Integration weights of a segment (DESIGN.md 3.3).

A segment from node ``start`` to node ``end`` replaces x_end − x_start = ∫ v dσ by Σ_i w_i · v_i over
a support of nodes in [start, end). All weights are computed in float64 from the sigma grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

RULES = ("euler", "leap", "lagrange", "uniform")


def _sig(sigmas: Sequence[float] | torch.Tensor) -> np.ndarray:
    return np.asarray(torch.as_tensor(sigmas, dtype=torch.float64).cpu().numpy(), dtype=np.float64)


def _check_segment(start: int, end: int, n: int) -> None:
    if not (0 <= start < end <= n):
        raise ValueError(f"segment: need 0 <= start < end <= N={n}, got start={start}, end={end}")


def euler(sigmas: Sequence[float] | torch.Tensor, start: int, end: int) -> tuple[list[int], list[float]]:
    """Every node of the segment with its own step Δ_i: exact (reproduces the cached latent)."""
    s = _sig(sigmas)
    _check_segment(start, end, len(s) - 1)
    nodes = list(range(start, end))
    return nodes, [float(s[i + 1] - s[i]) for i in nodes]


def leap(sigmas: Sequence[float] | torch.Tensor, start: int, end: int) -> tuple[list[int], list[float]]:
    """One velocity (the start's) carries the whole interval: w = σ_end − σ_start."""
    s = _sig(sigmas)
    _check_segment(start, end, len(s) - 1)
    return [start], [float(s[end] - s[start])]


def support_nodes(start: int, end: int, order: int) -> list[int]:
    """``order`` nodes of [start, end): the start plus evenly spread interior nodes (never ``end``).

    If the segment has no more than ``order`` nodes, all of them are used.
    """
    if order < 1:
        raise ValueError(f"order: must be >= 1 (number of support nodes), got {order}")
    interval = list(range(start, end))
    if len(interval) <= order:
        return interval
    positions = np.rint(np.linspace(0, len(interval) - 1, order)).astype(int)
    nodes: list[int] = []
    for p in positions:
        node = interval[int(p)]
        if node not in nodes:
            nodes.append(node)
    return nodes


def lagrange_weights(support_sigmas: Sequence[float], sigma_start: float, sigma_end: float) -> list[float]:
    """w_i = ∫_{σ_start}^{σ_end} L_i(σ) dσ with L_i the Lagrange basis on ``support_sigmas`` (float64).

    Exact for polynomials of degree < len(support); the weights sum to σ_end − σ_start.
    """
    pts = np.asarray(support_sigmas, dtype=np.float64)
    if len(np.unique(pts)) != len(pts):
        raise ValueError(f"support sigmas must be distinct, got {pts.tolist()}")
    # Work in t = (σ − σ_start) / (σ_end − σ_start) ∈ [0, 1]: the monomial basis stays well conditioned.
    length = sigma_end - sigma_start
    t = (pts - sigma_start) / length
    weights = []
    for i in range(len(t)):
        others = np.delete(t, i)
        # L_i(t) = Π_{j≠i} (t − t_j) / (t_i − t_j); np.poly gives the monic polynomial with those roots.
        basis = np.poly1d(np.poly(others) if len(others) else [1.0]) / float(np.prod(t[i] - others))
        antiderivative = np.polyint(basis)
        weights.append(float(antiderivative(1.0) - antiderivative(0.0)) * length)
    return weights


def lagrange(
    sigmas: Sequence[float] | torch.Tensor, start: int, end: int, order: int
) -> tuple[list[int], list[float]]:
    """Lagrange rule on ``order`` support nodes of the segment. ``order = 1`` is the leap."""
    s = _sig(sigmas)
    _check_segment(start, end, len(s) - 1)
    nodes = support_nodes(start, end, order)
    return nodes, lagrange_weights(s[nodes], float(s[start]), float(s[end]))


def uniform(
    sigmas: Sequence[float] | torch.Tensor, start: int, end: int, order: int
) -> tuple[list[int], list[float]]:
    """Equal weights (σ_end − σ_start)/|S| on the Lagrange support (ablation only)."""
    s = _sig(sigmas)
    _check_segment(start, end, len(s) - 1)
    nodes = support_nodes(start, end, order)
    return nodes, [float(s[end] - s[start]) / len(nodes)] * len(nodes)


def weights(
    rule: str, sigmas: Sequence[float] | torch.Tensor, start: int, end: int, order: int = 3
) -> tuple[list[int], list[float]]:
    """Dispatch by rule name: ``euler``, ``leap``, ``lagrange`` (uses ``order``), ``uniform`` (uses ``order``)."""
    if rule == "euler":
        return euler(sigmas, start, end)
    if rule == "leap":
        return leap(sigmas, start, end)
    if rule == "lagrange":
        return lagrange(sigmas, start, end, order)
    if rule == "uniform":
        return uniform(sigmas, start, end, order)
    raise ValueError(f"weights: unknown rule {rule!r}; allowed: {', '.join(RULES)}")
