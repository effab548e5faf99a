"""Formatting shared by every section: Markdown tables, ``mean ± half-width`` cells, matplotlib without a display."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def fmt(ci: dict[str, float], digits: int = 3) -> str:
    """``mean ± half-width`` of a mean_ci dict."""
    half = (ci["ci95_high"] - ci["ci95_low"]) / 2
    if not math.isfinite(half):
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} ± {half:.{digits}f}"


def half(ci: dict[str, float]) -> float | None:
    half = (ci["ci95_high"] - ci["ci95_low"]) / 2
    return half if math.isfinite(half) else None


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


# ---------------------------------------------------------------------------------------------- paired comparisons
def paired_comparisons(
    values: dict[str, Sequence[float]], reference: str, top: int = 3, higher_is_better: bool = True
) -> list[dict[str, Any]]:
    """Each label's paired difference to ``reference``, then between the ``top`` labels by mean.

    ``values[label]`` holds one number per shared unit (batch or seed), in the same order for every label —
    the methods saw the same batches / seeds, so differences are paired and their t interval is far tighter
    than two independent intervals. Each row: ``a``, ``b``, the difference ``a − b`` (mean, CI, ``significant``:
    the CI excludes 0) and ``verdict`` — ``a > b``, ``a < b`` (by the metric's better direction) or ``not
    resolved``. Labels without ``reference`` in ``values`` get only the top-method rows.
    """
    from flowbp.stats import paired_difference

    rows: list[dict[str, Any]] = []

    def add(a: str, b: str, kind: str) -> None:
        d = paired_difference(values[a], values[b])
        better = (d["mean"] > 0) == higher_is_better
        verdict = (f"{a} better" if better else f"{b} better") if d["significant"] else "not resolved"
        rows.append({"a": a, "b": b, "kind": kind, "verdict": verdict, **d})

    if reference in values:
        for label in values:
            if label != reference:
                add(label, reference, "vs reference")
    sign = 1.0 if higher_is_better else -1.0
    ranked = sorted(values, key=lambda k: -sign * sum(values[k]) / len(values[k]))[:top]
    for i, a in enumerate(ranked):
        for b in ranked[i + 1 :]:
            if reference not in (a, b):
                add(a, b, "top methods")
    return rows


def signed(ci: dict[str, Any], digits: int = 3) -> str:
    """``+0.012 [−0.004, +0.028]``: a difference with its CI, ``*`` when the CI excludes 0."""
    star = " *" if ci.get("significant") else ""
    if not math.isfinite(ci["ci95_low"]):
        return f"{ci['mean']:+.{digits}f}{star}"
    return f"{ci['mean']:+.{digits}f} [{ci['ci95_low']:+.{digits}f}, {ci['ci95_high']:+.{digits}f}]{star}"


def comparison_table(rows: Sequence[dict[str, Any]], metric: str, digits: int = 3) -> str:
    """Markdown table of :func:`paired_comparisons` rows."""
    return md_table(
        ["a", "b", f"{metric}: a − b [95% CI]", "verdict"],
        [[r["a"], r["b"], signed(r, digits), r["verdict"]] for r in rows],
        align="llrl",
    )
