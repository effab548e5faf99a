"""Evaluation suites for ``flowbp eval --suite NAME``: a fixed prompt set, sampling settings and metrics.

``paper``: the FlowBP paper's HPDv2 table (arXiv 2606.11075, its release's final configs; see
docs/unifiedreward.md). The 400 HPDv2 test prompts, 1 image per prompt, seed 42, 512×512, and per backbone
the release's evaluation steps / guidance (FLUX.1-dev 50 / 4.0, FLUX.2-Klein-base 50 / 4.0, SD3.5-M 40 / 3.5).
Metrics in the paper's column order: HPSv2.1, PickScore, ImageReward, UR-Align, UR-IQ, then HPSv3 (scored
by the release, not in the paper's tables) when flowbp has it registered.

Every metric is loaded before anything is sampled: a metric whose weights or server are missing is skipped
with one line saying why, listed in summary.json and in the table; the rest of the evaluation runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets" / "prompts"


@dataclass(frozen=True)
class Suite:
    name: str
    prompts: Path
    #: (metric name, column title) in the table's order; names not registered in flowbp are left out.
    columns: tuple[tuple[str, str], ...]
    images_per_prompt: int
    seed: int
    resolution: int
    #: backbone -> (sampling steps, guidance scale)
    sampling: Mapping[str, tuple[int, float]] = field(default_factory=dict)

    def metrics(self) -> list[str]:
        """The suite's metrics that this flowbp has (``hpsv3`` only once registered)."""
        from flowbp.rewards import JUDGES, REWARDS

        return [m for m, _ in self.columns if m in REWARDS or m in JUDGES]

    def title(self, metric: str) -> str:
        return dict(self.columns).get(metric, metric)


PAPER = Suite(
    name="paper",
    prompts=ASSETS / "hpdv2_test_400.txt",
    columns=(
        ("hpsv2", "HPSv2.1"),
        ("pickscore", "PickScore"),
        ("imagereward", "ImageReward"),
        ("unifiedreward-align", "UR-Align"),
        ("unifiedreward-iq", "UR-IQ"),
        ("hpsv3", "HPSv3"),
    ),
    images_per_prompt=1,
    seed=42,
    resolution=512,
    sampling={"flux1": (50, 4.0), "flux2-klein": (50, 4.0), "sd3": (40, 3.5)},
)

SUITES: dict[str, Suite] = {"paper": PAPER}


def unavailable_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:400]


def preflight(
    metrics: Sequence[str], load: Callable[[str], Any], report: Callable[[str], None] = print
) -> tuple[dict[str, Any], dict[str, str]]:
    """Load every metric now; the ones that cannot be loaded are skipped with one line each.

    Returns (scorers, skipped: metric -> reason). What counts as unavailable: missing or unreadable weights,
    an unreachable judge server or a wrong served model name, a missing optional package.
    """
    from flowbp.rewards.unifiedreward import JudgeError
    from flowbp.rewards.weights import RewardWeightsError

    scorers: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for metric in metrics:
        try:
            scorers[metric] = load(metric)
        except (RewardWeightsError, JudgeError, ImportError, OSError, ValueError) as exc:
            skipped[metric] = unavailable_reason(exc).removeprefix(f"{metric}: ")
            report(f"skipping {metric}: {skipped[metric]}")
    return scorers, skipped


def _cell(s: Mapping[str, Any] | None) -> str:
    if s is None or s.get("mean") is None:
        return "missing"
    half = s.get("half")
    text = f"{s['mean']:.4f}" + (f" ± {half:.4f}" if half is not None and math.isfinite(half) else "")
    return text + (f" ({s['n_missing']} missing)" if s.get("n_missing") else "")


def _diff_cell(c: Mapping[str, Any] | None) -> str:
    if c is None or c.get("diff") is None:
        return "–"
    text = f"{c['diff']:+.4f} [{c['ci95_low']:+.4f}, {c['ci95_high']:+.4f}]"
    return text + (" *" if c["significant"] else "")


def table(
    suite: Suite,
    rows: Sequence[tuple[str, Mapping[str, Mapping[str, Any]]]],
    skipped: Mapping[str, str],
    comparisons: Sequence[Mapping[str, Any]] = (),
) -> str:
    """A Markdown table in the suite's column order: one row per model (mean ± 95% CI half-width over prompts),
    then one row per paired comparison ``{"a", "b", "metrics"}`` (95% CI; * = the interval excludes 0)."""
    columns = [m for m, _ in suite.columns if m in suite.metrics()]
    lines = [
        "| model | " + " | ".join(suite.title(m) for m in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, metrics in rows:
        cells = ["skipped" if m in skipped and m not in metrics else _cell(metrics.get(m)) for m in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for comparison in comparisons:
        diffs = comparison["metrics"]
        cells = ["skipped" if m in skipped and m not in diffs else _diff_cell(diffs.get(m)) for m in columns]
        lines.append(f"| {comparison['a']} − {comparison['b']} (paired) | " + " | ".join(cells) + " |")
    notes = [
        "",
        "mean ± half-width of the 95% Student-t interval over prompts; paired differences by prompt and seed, "
        "* = the interval excludes 0.",
    ]
    notes += [f"skipped {m}: {reason}" for m, reason in skipped.items()]
    return "\n".join(lines + notes) + "\n"
