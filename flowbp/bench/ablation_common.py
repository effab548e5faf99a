"""What the four ablations share: their sizes, the sweeps, the holds / fails / not-resolved rule and the plot.

Each ablation tests one design claim of the paper (its release's "ablation takeaways") on the digits testbed, where
the exact gradient is known and every comparison is paired (same batches, same plan draws, same training seeds).
A claim is decided only by a paired Student-t interval (:func:`flowbp.stats.paired_difference`):

- **holds**  the 95% interval of the difference in the claim's direction lies above 0;
- **fails**  it lies below 0 (the opposite of the claim is resolved);
- **not resolved**  it contains 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flowbp.bench.context import MethodConfig

#: the ablation sections of ``flowbp bench --only``; ``ablations`` selects all four
ABLATIONS = ("ablation-input", "ablation-k", "ablation-alpha", "ablation-leap")
HOLDS, FAILS, UNRESOLVED = "holds", "fails", "not resolved"

#: the paper's final choices (DESIGN 3.4 and shared/reference/paper_hyperparameters.md), marked on the plots
PAPER_K = {"flowbp-sparse": (3, 4), "flowbp-bridge": (3, 5), "flowbp-lagrange": (2,)}
PAPER_ALPHA = {"flowbp-bridge": (0.1, 0.5, 1.0), "flowbp-lagrange": (0.1,)}


@dataclass(frozen=True)
class AblationSettings:
    """Sizes of the ablation runs (``ABLATION_QUICK`` / ``ABLATION_FULL`` below)."""

    num_steps: int = 25  # N of the gradient and deviation measurements
    batch_size: int = 4
    batches: int = 6  # the unit of the gradient intervals
    draws: int = 2  # R plan draws per batch (shared by the variants of one method: paired by draw too)
    cost_repeats: int = 3  # (rollout, step) timing pairs per configuration
    leap_batches: int = 8  # deviation rollouts; each sample of a batch is one trajectory (the unit)
    input_methods: tuple[str, ...] = ("refl", "drtune")
    k_methods: tuple[str, ...] = ("flowbp-sparse", "flowbp-bridge", "flowbp-lagrange")
    k_values: tuple[int, ...] = (1, 2, 3, 5, 8)
    lagrange_max_active: tuple[int, ...] = (1, 2, 3)
    alphas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.3, 0.5, 1.0)
    alpha_methods: tuple[str, ...] = ("flowbp-bridge", "flowbp-lagrange")
    train: bool = True  # the sample-efficiency runs of the input and α ablations
    seeds: int = 5  # training seeds (the unit of the training intervals)
    train_steps: int = 10
    train_batch_size: int = 4
    train_num_steps: int = 8
    train_eval_samples: int = 3  # per prompt, 10 prompts
    seed: int = 0


ABLATION_FULL = AblationSettings()
ABLATION_QUICK = AblationSettings(
    num_steps=10,
    batch_size=2,
    batches=3,
    draws=2,
    cost_repeats=1,
    leap_batches=2,
    k_values=(1, 2, 3),
    lagrange_max_active=(1, 3),
    alphas=(0.0, 0.1, 1.0),
    seeds=2,
    train_steps=2,
    train_batch_size=2,
    train_num_steps=4,
    train_eval_samples=2,
)


# ---------------------------------------------------------------------------------------------- the sweeps
def input_configs(s: AblationSettings) -> list[MethodConfig]:
    """Each method with its posterior-mean input (the paper default) and the endpoint-faithful one."""
    return [
        MethodConfig(m, {"reward_input": kind}, default=kind == "posterior_mean")
        for m in s.input_methods
        for kind in ("posterior_mean", "endpoint")
    ]


def k_configs(s: AblationSettings) -> list[tuple[MethodConfig, int]]:
    """(configuration, K) of the active-set sweep.

    Bridge needs K >= 2 (j is always active and each side of j gets at least one node), so its K = 1 is skipped.
    Lagrange's knob is the number of active supports per segment: with ``support_mode='all'`` the first
    ``max_active`` supports re-forward, which for 1 and 2 is exactly the paper default (midpoint, 2) rule and
    for 3 adds the last interior support.
    """
    out: list[tuple[MethodConfig, int]] = []
    for k in s.k_values:
        out.append((MethodConfig("flowbp-sparse", {"num_active": k}, default=k == 3), k))
    for k in s.k_values:
        if k >= 2:
            out.append((MethodConfig("flowbp-bridge", {"num_active": k}, default=k == 5), k))
    for k in s.lagrange_max_active:
        out.append((MethodConfig("flowbp-lagrange", {"support_mode": "all", "max_active": k}, default=k == 2), k))
    return [(c, k) for c, k in out if c.method in s.k_methods]


def restrict_methods(s: AblationSettings, methods: Sequence[str]) -> AblationSettings:
    """Only ``methods`` in every sweep (to split one ablation over processes; the numbers stay the same, since
    batches, plan draws and training seeds depend on the method, never on which others run)."""
    import dataclasses

    known = {*s.input_methods, *s.k_methods, *s.alpha_methods}
    bad = [m for m in methods if m not in known]
    if bad or not methods:
        raise ValueError(f"--ablation-methods: unknown method(s) {bad}; allowed: {', '.join(sorted(known))}")
    keep = set(methods)
    return dataclasses.replace(s, input_methods=tuple(m for m in s.input_methods if m in keep),
                               k_methods=tuple(m for m in s.k_methods if m in keep),
                               alpha_methods=tuple(m for m in s.alpha_methods if m in keep))


def alpha_configs(s: AblationSettings) -> list[tuple[MethodConfig, float]]:
    """(configuration, α) of the coupling sweep; every other knob at the method's default."""
    return [
        (MethodConfig(m, {"alpha": a}, default=a == 0.1), a) for m in s.alpha_methods for a in s.alphas
    ]


# ---------------------------------------------------------------------------------------------- the rule
def verdict(diff: dict[str, Any]) -> str:
    """holds / fails / not resolved from a paired difference oriented so that > 0 supports the claim."""
    if diff["ci95_low"] > 0:
        return HOLDS
    if diff["ci95_high"] < 0:
        return FAILS
    return UNRESOLVED


def claim_difference(a: Sequence[float], b: Sequence[float], higher_is_better: bool = True) -> dict[str, Any]:
    """The paired difference a − b (or b − a when lower is better: always "> 0 = a is better") and its verdict."""
    from flowbp.stats import paired_difference

    d = paired_difference(a, b) if higher_is_better else paired_difference(b, a)
    return {**d, "verdict": verdict(d)}


def combine(verdicts: Sequence[str]) -> str:
    """A claim made of several parts: fails if any part fails, holds if all hold, else not resolved."""
    if any(v == FAILS for v in verdicts):
        return FAILS
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return UNRESOLVED


def intermediate_optimum(values: dict[float, Sequence[float]], higher_is_better: bool = True) -> dict[str, Any]:
    """Is an intermediate knob value (0 < α < 1) better than both ends? ``values[α]``: one number per paired unit.

    best = the intermediate α with the best mean. **holds** when it beats α = 0 *and* α = 1 with paired
    intervals excluding 0; **fails** when an end beats every intermediate α that way (one end dominates);
    otherwise **not resolved**. Also reports the overall best α and its paired differences to both ends.
    """
    sign = 1.0 if higher_is_better else -1.0
    lo, hi = min(values), max(values)
    mean = {a: sign * sum(v) / len(v) for a, v in values.items()}
    middle = [a for a in values if lo < a < hi]
    best_all = max(values, key=lambda a: mean[a])
    out: dict[str, Any] = {"best": best_all, "ends": [lo, hi]}
    if not middle:
        out["verdict"] = UNRESOLVED
        return out
    best = max(middle, key=lambda a: mean[a])
    out["best_intermediate"] = best
    out["vs_low"] = claim_difference(values[best], values[lo], higher_is_better)
    out["vs_high"] = claim_difference(values[best], values[hi], higher_is_better)
    if best_all not in (lo, hi):
        out["best_vs_low"], out["best_vs_high"] = out["vs_low"], out["vs_high"]
    else:
        other = hi if best_all == lo else lo
        out["best_vs_other_end"] = claim_difference(values[best_all], values[other], higher_is_better)
    if out["vs_low"]["verdict"] == HOLDS and out["vs_high"]["verdict"] == HOLDS:
        out["verdict"] = HOLDS
    elif any(
        all(claim_difference(values[end], values[a], higher_is_better)["verdict"] == HOLDS for a in middle)
        for end in (lo, hi)
    ):
        out["verdict"] = FAILS
    else:
        out["verdict"] = UNRESOLVED
    return out


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least-squares y = a + b·x and the largest residual relative to y (0 for an exactly linear cost)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    rel = max((abs(y - (a + b * x)) / abs(y) if y else 0.0) for x, y in zip(xs, ys, strict=True))
    return {"intercept": a, "slope": b, "max_rel_residual": rel}


def linear_verdict(fit: dict[str, float], tol: float = 0.01) -> str:
    """A deterministic cost (bytes saved for backward) is linear when every point is within ``tol`` of the fit."""
    return HOLDS if fit["slope"] > 0 and fit["max_rel_residual"] <= tol else FAILS


def mark(v: str) -> str:
    return f"**{v}**"


# ---------------------------------------------------------------------------------------------- the plot
def errorbar_series(ax: Any, xs: Sequence[float], cis: Sequence[dict[str, float]], label: str, color: str,
                    marker: str = "o", offset: float = 0.0) -> None:
    """Means with their 95% interval as error bars (an infinite interval, from one unit, is drawn without)."""
    ys = [c["mean"] for c in cis]
    err = [[c["mean"] - c["ci95_low"] for c in cis], [c["ci95_high"] - c["mean"] for c in cis]]
    if not all(math.isfinite(e) for e in err[0] + err[1]):
        err = None
    ax.errorbar([x + offset for x in xs], ys, yerr=err, fmt=marker + "-", color=color, capsize=3, label=label, ms=5)


def mark_paper_choice(ax: Any, x: float, color: str, label: str | None = None) -> None:
    ax.axvline(x, color=color, ls=":", lw=1.2, alpha=0.8, label=label)
