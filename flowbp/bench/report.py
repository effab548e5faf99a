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
