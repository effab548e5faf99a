"""Confidence intervals that hold up at the sample sizes flowbp actually has (3 seeds, 8 batches).

Every interval is a Student-t interval on the mean of i.i.d. values, with n − 1 degrees of freedom:
the normal z = 1.96 understates a 3-seed interval by a factor 4.30 / 1.96 = 2.2. Comparisons between
methods (or before/after training) are *paired*: both sides share seeds, batches, prompts and noise,
so the interval is the t interval of the per-unit differences, which removes the variance the two
sides share. A ranking is claimed only where that paired interval excludes zero
(:func:`paired_difference` sets ``significant``).

The t quantile comes from scipy (already a dependency of scikit-learn, which the testbed uses).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Values = torch.Tensor | Sequence[float]


def t_quantile(prob: float, df: int) -> float:
    """The ``prob`` quantile of Student's t with ``df`` degrees of freedom (``df = inf`` gives the normal)."""
    from scipy.stats import norm, t

    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob: must be in (0, 1), got {prob}")
    if df == math.inf:
        return float(norm.ppf(prob))
    if df < 1:
        raise ValueError(f"df: must be >= 1, got {df}")
    return float(t.ppf(prob, df))


def _as_float64(values: Values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).flatten()
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def mean_ci(values: Values, level: float = 0.95) -> dict[str, float]:
    """Mean and Student-t confidence interval (``level``, default 95%) of i.i.d. values.

    Returns ``mean``, ``ci95_low``, ``ci95_high`` (the keys keep the 95 name whatever ``level`` is, so
    tables and JSON stay uniform), ``half`` (the half-width), ``std`` (sample standard deviation) and
    ``n``. With one value the interval is infinite: one seed says nothing about the spread.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    v = _as_float64(values)
    n = v.numel()
    if n == 0:
        raise ValueError("values: need at least one value for a mean")
    mean = float(v.mean())
    if n > 1:
        std = float(v.std(unbiased=True))
        half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    else:
        std, half = float("nan"), float("inf")
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half, "half": half, "std": std, "n": n}


def paired_difference(a: Values, b: Values, level: float = 0.95) -> dict[str, float | bool]:
    """Mean of ``a − b`` over paired units (shared seeds / batches / prompts) with its t interval.

    ``significant`` is true when the interval excludes 0: only then may ``a`` be ranked above or below
    ``b``. The two sides must have the same number of units, in the same order.
    """
    x, y = _as_float64(a), _as_float64(b)
    if x.shape != y.shape:
        raise ValueError(f"paired values: both sides need the same units, got {x.numel()} and {y.numel()}")
    out: dict[str, float | bool] = dict(mean_ci(x - y, level))
    out["significant"] = bool(out["ci95_low"] > 0 or out["ci95_high"] < 0)
    return out


def group_means(values: Values, groups: Sequence[object]) -> torch.Tensor:
    """Average ``values`` within each group (in order of first appearance): one value per independent unit.

    Draws that share a unit (several plans on one trajectory, several images of one prompt) are not
    independent; average them first, then take :func:`mean_ci` over the units.
    """
    v = _as_float64(values)
    if v.numel() != len(groups):
        raise ValueError(f"groups: need one group label per value, got {len(groups)} labels for {v.numel()} values")
    order: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        order.setdefault(g, []).append(i)
    return torch.stack([v[idx].mean() for idx in order.values()])


__all__ = ["group_means", "mean_ci", "paired_difference", "t_quantile"]
