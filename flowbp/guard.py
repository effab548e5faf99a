"""The reward-hacking guard: stop (or warn) when a held-out metric has clearly fallen since step 0.

A ``guard:`` list in the training config names held-out metrics and a tolerance for each::

    eval_every: 10
    guard:
      - {metric: heldout-correct, tolerance: 0.02, action: stop}
      - {metric: heldout-fd, tolerance: 1.0, action: warn}

The guard runs its own evaluation (the guarded metrics only, no files), at its own cadence
(:class:`Schedule`): at step 0 on the *confirm* set, then every ``guard_every`` steps on the small
*screen* set (its first images), and — once a look's point estimate has used up a quarter of a
tolerance — every ``guard_alert_every`` steps on the larger alert set. A look whose point estimate is
past a tolerance that its bound does not yet exclude is extended, at the same step, to the confirm set.
The images are fixed (prompt × seed, :func:`flowbp.evaluate.plan_keys`), so every image at step t has a
twin at step 0, and each set is the first images of the next larger one.

The decision rule, for one guarded metric with tolerance ε (in the metric's own units):

    d_k = s · (m_k(t) − m_k(0))            one paired change per image k = (prompt, seed);
                                           s = +1 if higher is better, −1 if lower is better
    U = one-sided Student-t upper bound of mean_k d_k at guard_confidence (0.99)
    triggered  ⇔  U < −ε                   "fallen by more than ε, and the bound excludes ε"

so a drop inside the tolerance never triggers, and a drop larger than ε triggers only once the
look is precise enough to say so. The guard looks many times; the per-look 99% bound (not 97.5%) keeps
the chance that a run sitting exactly at the tolerance is ever stopped below 5% over 30 looks when the
looks share their images (tests/test_guard.py measures it on constructed series). The unit is the image:
conditionally on the fixed evaluation prompts the per-image differences are independent, and pooling prompts
into one variance estimate over-states the variance of the (stratified) mean, so the bound is conservative.

Fréchet distance is not a per-image quantity. ``heldout-fd`` (digits) is guarded with a *paired
bootstrap*: resample the image keys with replacement (the same keys at step 0 and at step t), take
FD(step t) − FD(step 0) against the fixed real reference on each resample, and use the 2.5 / 97.5
percentiles of that difference as the interval and its ``guard_confidence`` percentile as the bound U
(the point estimate is the difference on all images).
Pairing keeps the shared variation of the two sets out of the interval, exactly as for per-image metrics.

``action: warn`` logs, and records the event in summary.json; ``action: stop`` also ends training
cleanly after a checkpoint (exit status 0; summary.json says why). Every look that no guard
flags writes a checkpoint, hard-linked to ``RUN/guard/last-good`` (pruning of old checkpoints cannot
remove it); summary.json names it. The guard's state (baseline, evaluations, events) is part of every
checkpoint, so a resumed run keeps it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowbp.stats import mean_ci

ACTIONS = ("warn", "stop")
#: Metrics the guard computes itself from the evaluation images (not per-image scores), per backbone.
SET_METRICS: dict[str, tuple[str, ...]] = {"digits": ("heldout-fd",)}
#: Metrics for which a lower value is better (everything else: higher is better).
LOWER_IS_BETTER = frozenset({"heldout-fd"})
BOOTSTRAP_RESAMPLES = 400
#: One-sided confidence of each look's bound. The guard looks many times in a run; 99% per look keeps the
#: chance that a run whose metric never falls by more than the tolerance is stopped at some look below 5%
#: (the looks share one image set; measured on constructed series in tests/test_guard.py, docs/guard.md).
DEFAULT_CONFIDENCE = 0.99
#: A screen look whose point estimate has used up this fraction of a tolerance puts the guard on alert: it
#: then looks every ``guard_alert_every`` steps with the larger alert image set.
ALERT_FRACTION = 0.25
#: The guard stays on alert while a look at the alert set (or larger) has used up this fraction. Hysteresis:
#: the screen set is coarse, so it raises the alert early; the alert set is precise, so it keeps the alert
#: only for a drift that is really under way (a run sitting a point below step 0 does not pay an alert-set
#: look at every step).
STAY_FRACTION = 0.5
GUARD_DIR = "guard"
LAST_GOOD = "last-good"


@dataclass(frozen=True)
class GuardRule:
    metric: str
    tolerance: float
    action: str = "stop"

    @property
    def sign(self) -> float:
        """+1 when higher is better: a negative signed change is always a fall."""
        return -1.0 if self.metric in LOWER_IS_BETTER else 1.0


def parse_rules(raw: Any) -> tuple[GuardRule, ...]:
    """The ``guard`` list of a config: each entry ``{metric, tolerance, action}``; one clear error per defect."""
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"guard: must be a list of {{metric, tolerance, action}} entries, got {raw!r}")
    rules = []
    for k, entry in enumerate(raw):
        name = f"guard[{k}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{name}: must be a mapping {{metric, tolerance, action}}, got {entry!r}")
        unknown = sorted(set(entry) - {"metric", "tolerance", "action"})
        if unknown:
            raise ValueError(f"{name}: unknown key {unknown[0]!r}; allowed: metric, tolerance, action")
        metric = entry.get("metric")
        if not isinstance(metric, str) or not metric.strip():
            raise ValueError(f"{name}.metric: must be a metric name, got {metric!r}")
        tol = entry.get("tolerance")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise ValueError(f"{name}.tolerance: must be a finite number >= 0 in the metric's units, got {tol!r}")
        action = entry.get("action", "stop")
        if action not in ACTIONS:
            raise ValueError(f"{name}.action: got {action!r}; allowed: {', '.join(ACTIONS)}")
        rules.append(GuardRule(metric.strip(), float(tol), action))
    seen = [r.metric for r in rules]
    dup = next((m for m in seen if seen.count(m) > 1), None)
    if dup is not None:
        raise ValueError(f"guard: metric {dup!r} is guarded twice; give each metric one entry")
    return tuple(rules)


def guardable_metrics(config: Any, backbone_name: str) -> list[str]:
    """What a guard may watch: every metric of the periodic evaluation, plus the backbone's set metrics."""
    from flowbp.evaluate import eval_metric_specs

    return [*eval_metric_specs(config, backbone_name), *SET_METRICS.get(backbone_name, ())]


@dataclass(frozen=True)
class Schedule:
    """When the guard looks and at how many images (its own evaluation: the guarded metrics only, no files).

    Every ``every`` steps it looks at the *screen* set (``samples_per_prompt`` images per evaluation prompt).
    A screen look whose point estimate has used up ``ALERT_FRACTION`` of a tolerance puts it on alert: the
    next looks come every ``alert_every`` steps on the larger *alert* set (``alert_samples_per_prompt`` per
    prompt), while they have used up ``STAY_FRACTION`` of it. A look whose point estimate is past a
    tolerance that its bound does not exclude yet is extended at once, at the same step, to the *confirm*
    set (``confirm_samples_per_prompt``): near the decision the bound is what limits how early a real fall
    is stopped, and more images tighten it. Image k of every prompt uses seed ``seed + k``, so each set is
    the first images of the next, and step 0's baseline (of the confirm set) pairs with all three.
    """

    every: int
    samples_per_prompt: int
    alert_every: int
    alert_samples_per_prompt: int
    confidence: float = DEFAULT_CONFIDENCE
    seed: int = 2024
    confirm_samples_per_prompt: int | None = None  # None: no confirm set (the alert set is the largest)

    @property
    def largest(self) -> int:
        """Images per prompt of the baseline: the largest set any look uses."""
        return max(self.alert_samples_per_prompt, self.confirm_samples_per_prompt or 0)


def _positive(config: Any, name: str) -> int | None:
    value = getattr(config, name, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a whole number >= 1 (or null for the default), got {value!r}")
    return value


def check_schedule(config: Any) -> None:
    """The guard_* keys on their own (called from TrainConfig.check): one clear line per bad value."""
    for name in (
        "guard_every", "guard_samples_per_prompt", "guard_alert_every", "guard_alert_samples_per_prompt",
        "guard_confirm_samples_per_prompt",
    ):
        _positive(config, name)
    conf = getattr(config, "guard_confidence", DEFAULT_CONFIDENCE)
    if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0.5 < conf < 1:
        raise ValueError(f"guard_confidence: must be a number in (0.5, 1) (one-sided, per look), got {conf!r}")
    screen, alert = config.guard_samples_per_prompt, config.guard_alert_samples_per_prompt
    if screen is not None and alert is not None and alert < screen:
        raise ValueError(
            f"guard_alert_samples_per_prompt: {alert} is below guard_samples_per_prompt ({screen}); the alert "
            "set must contain the screen set (allowed: >= guard_samples_per_prompt)"
        )
    confirm = getattr(config, "guard_confirm_samples_per_prompt", None)
    floor = alert if alert is not None else screen
    if confirm is not None and floor is not None and confirm < floor:
        raise ValueError(
            f"guard_confirm_samples_per_prompt: {confirm} is below the alert set's images per prompt ({floor}); "
            "the confirm set must contain the alert set (allowed: >= guard_alert_samples_per_prompt)"
        )


def schedule_of(config: Any) -> Schedule:
    """The schedule with its defaults filled in: looks every max(1, eval_every // 5) steps at the evaluation's
    images, on alert every max(1, every // 5) steps at five times as many, confirmed at twice the alert
    set's (see :class:`Schedule`)."""
    from flowbp.evaluate import eval_size

    every = _positive(config, "guard_every") or max(1, (config.eval_every or 0) // 5)
    screen = _positive(config, "guard_samples_per_prompt") or eval_size(config)[1]
    alert = _positive(config, "guard_alert_samples_per_prompt") or 5 * screen
    alert_every = _positive(config, "guard_alert_every") or max(1, every // 5)
    alert = max(alert, screen)
    confirm = _positive(config, "guard_confirm_samples_per_prompt") or 2 * alert
    conf = float(getattr(config, "guard_confidence", DEFAULT_CONFIDENCE))
    return Schedule(every, screen, alert_every, alert, conf, config.eval_seed, max(confirm, alert))


def check_config(config: Any) -> None:
    """Everything about ``guard`` that can be checked before anything runs (called with the components)."""
    rules = parse_rules(config.guard)
    if not rules:
        return
    if not config.eval_every and not getattr(config, "guard_every", None):
        raise ValueError(
            "guard: needs a cadence; set guard_every (or eval_every: the guard then looks every eval_every // 5 "
            "steps) to a positive number of steps"
        )
    known = guardable_metrics(config, config.backbone)
    for k, rule in enumerate(rules):
        if rule.metric not in known:
            raise ValueError(
                f"guard[{k}].metric: {rule.metric!r} is not evaluated for backbone {config.backbone!r}; "
                f"allowed: {', '.join(known)} (other metrics: add them to eval_metrics)"
            )


# ----------------------------------------------------------------------------- the decision rule
def paired_change(
    before: Sequence[float] | torch.Tensor,
    after: Sequence[float] | torch.Tensor,
    sign: float,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict:
    """Mean and Student-t 95% interval of the signed per-unit change s·(after − before) (negative: worse),
    and ``upper``: its one-sided upper bound at ``confidence`` (what the decision rule compares)."""
    b = torch.as_tensor(before, dtype=torch.float64).flatten()
    a = torch.as_tensor(after, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"guard: paired values need the same images, got {b.numel()} and {a.numel()}")
    d = sign * (a - b)
    out = mean_ci(d)
    # a one-sided bound at confidence c is the upper end of the two-sided interval at level 2c − 1
    out["upper"] = mean_ci(d, 2 * confidence - 1)["ci95_high"]
    out["confidence"] = confidence
    return out


def fd_paired_change(
    before: torch.Tensor,
    after: torch.Tensor,
    reference: torch.Tensor,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict:
    """Paired bootstrap of −(FD(after) − FD(before)) over image keys (lower FD is better, so a fall is < 0)."""
    from flowbp.testbed.heldout_metrics import frechet_distance_from_features as fd

    if before.shape != after.shape:
        raise ValueError(
            f"guard: paired features need the same images, got {tuple(before.shape)} and {tuple(after.shape)}"
        )
    gen = torch.Generator().manual_seed(seed)
    n = before.shape[0]
    point = -(fd(after, reference) - fd(before, reference))
    draws = []
    for _ in range(resamples):
        idx = torch.randint(0, n, (n,), generator=gen)
        draws.append(-(fd(after[idx], reference) - fd(before[idx], reference)))
    d = torch.tensor(draws, dtype=torch.float64)
    lo, hi, upper = torch.quantile(d, torch.tensor([0.025, 0.975, confidence], dtype=torch.float64)).tolist()
    return {
        "upper": upper,
        "confidence": confidence,
        "mean": point,
        "ci95_low": lo,
        "ci95_high": hi,
        "half": (hi - lo) / 2,
        "std": float(d.std()),
        "n": n,
        "interval": f"paired bootstrap ({resamples} resamples)",
    }


def triggered(change: Mapping[str, float], tolerance: float) -> bool:
    """Fallen by more than the tolerance, with the bound excluding it: the one-sided upper bound is below −ε.

    ``upper`` is the bound at the guard's confidence (per look); a change without it (an old record) is
    judged on the upper end of its 95% interval, the rule of earlier versions.
    """
    return bool(change.get("upper", change["ci95_high"]) < -tolerance)


# ----------------------------------------------------------------------------- values of one evaluation
def _reference_features() -> torch.Tensor:
    """The real ``test`` digits in the held-out feature space: the fixed reference of ``heldout-fd``."""
    from flowbp.testbed.data import load_digits_split, to_rgb
    from flowbp.testbed.heldout_metrics import heldout_features

    return heldout_features(to_rgb(load_digits_split("test")[0])).double()


def eval_values(
    rules: Sequence[GuardRule], images: Sequence[torch.Tensor], scores: Mapping[str, Sequence[float]]
) -> dict:
    """Per guarded metric: per-image scores (a list) or, for FD, the images' held-out features (N × 64)."""
    from flowbp.evaluate import to_float

    out: dict[str, Any] = {}
    for rule in rules:
        if rule.metric == "heldout-fd":
            from flowbp.testbed.heldout_metrics import heldout_features

            x = to_float(torch.stack(list(images)))
            out[rule.metric] = heldout_features(x).double()
        else:
            out[rule.metric] = [float(v) for v in scores[rule.metric]]
    return out


def _to_json(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.tolist() if isinstance(v, torch.Tensor) else list(v) for k, v in values.items()}


# ----------------------------------------------------------------------------- the guard and its state
def _per_prompt(keys: Sequence[Sequence[int]]) -> int:
    """Images per prompt of a look: its distinct seeds (image k of every prompt has seed ``seed + k``)."""
    return len({k[1] for k in keys})


@dataclass
class Guard:
    """The rules, the step-0 baseline, every look's verdict and what was done about it."""

    rules: tuple[GuardRule, ...]
    schedule: Schedule | None = None  # None: judge whatever evaluations are passed (tests, old callers)
    baseline: dict[str, Any] = field(default_factory=dict)  # metric -> per-image values (FD: features)
    keys: list[list[int]] = field(default_factory=list)  # (prompt index, seed) of each image, in order
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    last_good: dict[str, Any] | None = None  # {"step", "checkpoint"}
    stopped: dict[str, Any] | None = None
    _reference: torch.Tensor | None = None

    @property
    def has_baseline(self) -> bool:
        return bool(self.baseline)

    @property
    def confidence(self) -> float:
        return self.schedule.confidence if self.schedule is not None else DEFAULT_CONFIDENCE

    @property
    def alert(self) -> bool:
        """The last look used up a fair part of a tolerance: look sooner, at more images."""
        return bool(self.evaluations and self.evaluations[-1].get("alert"))

    def next_look(self) -> int:
        """The step of the next look: the schedule's cadence after the last one (on alert: the alert cadence)."""
        if self.schedule is None:
            raise RuntimeError("guard: no schedule")
        last = self.evaluations[-1]["step"] if self.evaluations else 0
        return last + (self.schedule.alert_every if self.alert else self.schedule.every)

    def look_size(self) -> int:
        """Images per prompt of the next look: the alert set on alert, else the screen set."""
        if self.schedule is None:
            raise RuntimeError("guard: no schedule")
        return self.schedule.alert_samples_per_prompt if self.alert else self.schedule.samples_per_prompt

    def set_baseline(self, keys: Sequence[Sequence[int]], values: Mapping[str, Any], reward: float | None) -> None:
        self.keys = [list(k) for k in keys]
        self.baseline = dict(values)
        self.evaluations.append({"step": 0, "reward": reward, "metrics": {}, "flagged": [], "n": len(self.keys)})

    def _baseline_of(self, metric: str, keys: Sequence[Sequence[int]]) -> Any:
        """Step 0's values of these images (a subset of the baseline's, in their order)."""
        position = {tuple(k): i for i, k in enumerate(self.keys)}
        try:
            idx = [position[tuple(k)] for k in keys]
        except KeyError:
            raise RuntimeError(
                "guard: the evaluation images differ from step 0's (prompts or seeds changed)"
            ) from None
        base = self.baseline[metric]
        if isinstance(base, torch.Tensor) and base.dim() > 1:
            return base[torch.tensor(idx, dtype=torch.long)]
        return [float(base[i]) for i in idx]

    def observe(
        self, step: int, keys: Sequence[Sequence[int]], values: Mapping[str, Any], reward: float | None
    ) -> list[dict]:
        """Compare one look with step 0 (its images are step 0's or a subset); returns the rules it triggered."""
        record: dict[str, Any] = {"step": step, "reward": reward, "metrics": {}, "flagged": [], "n": len(keys)}
        fired = []
        for rule in self.rules:
            before = self._baseline_of(rule.metric, keys)
            if rule.metric in LOWER_IS_BETTER:
                if self._reference is None:
                    self._reference = _reference_features()
                after = torch.as_tensor(values[rule.metric], dtype=torch.float64)
                change = fd_paired_change(
                    torch.as_tensor(before, dtype=torch.float64), after, self._reference, seed=step,
                    confidence=self.confidence,
                )
                from flowbp.testbed.heldout_metrics import frechet_distance_from_features as fd

                value = fd(after, self._reference)
            else:
                change = paired_change(before, values[rule.metric], rule.sign, self.confidence)
                value = float(torch.as_tensor(values[rule.metric], dtype=torch.float64).mean())
            hit = triggered(change, rule.tolerance)
            record["metrics"][rule.metric] = {
                "value": value,
                "change": change["mean"],
                "ci95_low": change["ci95_low"],
                "ci95_high": change["ci95_high"],
                "upper": change["upper"],
                "confidence": change["confidence"],
                "tolerance": rule.tolerance,
                "flagged": hit,
            }
            if hit:
                record["flagged"].append(rule.metric)
                event = {"step": step, "metric": rule.metric, "action": rule.action, **record["metrics"][rule.metric]}
                self.events.append(event)
                fired.append(event)
        per_prompt = _per_prompt(keys)
        record["per_prompt"] = per_prompt
        precise = self.schedule is not None and per_prompt >= self.schedule.alert_samples_per_prompt
        fraction = STAY_FRACTION if precise else ALERT_FRACTION
        record["alert"] = any(m["change"] < -fraction * m["tolerance"] for m in record["metrics"].values())
        self.evaluations.append(record)
        return fired

    def needs_confirm(self) -> bool:
        """The last look found a point estimate past a tolerance, with a bound that does not exclude it yet, on
        fewer images than the confirm set: look again at this step on the confirm set before judging."""
        if self.schedule is None or not self.schedule.confirm_samples_per_prompt or not self.evaluations:
            return False
        last = self.evaluations[-1]
        confirm = self.schedule.confirm_samples_per_prompt
        if last["flagged"] or last.get("per_prompt", 0) >= confirm:
            return False
        if _per_prompt(self.keys) < confirm:  # a baseline from before the confirm set existed
            return False
        return any(m["change"] < -m["tolerance"] for m in last["metrics"].values())

    def message(self, event: Mapping[str, Any]) -> str:
        rule = next(r for r in self.rules if r.metric == event["metric"])
        direction = "higher" if rule.sign > 0 else "lower"
        return (
            f"guard: {event['metric']} has fallen since step 0 by more than its tolerance {rule.tolerance:g} at step "
            f"{event['step']} (signed change {event['change']:+.4f}, 95% interval [{event['ci95_low']:+.4f}, "
            f"{event['ci95_high']:+.4f}], one-sided {100 * event.get('confidence', 0.975):g}% bound "
            f"{event.get('upper', event['ci95_high']):+.4f}; {direction} is better); action: {event['action']}"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "rules": [{"metric": r.metric, "tolerance": r.tolerance, "action": r.action} for r in self.rules],
            "stopped": self.stopped,
            "events": self.events,
            "last_good_checkpoint": self.last_good,
            "evaluations": self.evaluations,
            "decision_rule": f"one-sided {100 * self.confidence:g}% upper bound of the paired signed change "
            "below -tolerance (at every look)",
            "schedule": None if self.schedule is None else asdict(self.schedule),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline": _to_json(self.baseline),
            "keys": self.keys,
            "evaluations": self.evaluations,
            "events": self.events,
            "last_good": self.last_good,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if not state:
            return
        self.baseline = {
            k: torch.tensor(v, dtype=torch.float64) if k in LOWER_IS_BETTER else list(v)
            for k, v in state["baseline"].items()
        }
        self.keys = [list(k) for k in state["keys"]]
        self.evaluations = list(state["evaluations"])
        self.events = list(state["events"])
        self.last_good = state.get("last_good")
        self.stopped = state.get("stopped")


def make_guard(config: Any) -> Guard | None:
    rules = parse_rules(config.guard)
    return Guard(rules, schedule_of(config)) if rules else None


# ----------------------------------------------------------------------------- outputs
def link_last_good(run_dir: Path, checkpoint: Path) -> Path:
    """Hard-link ``checkpoint`` to RUN/guard/last-good (a copy where links are impossible), replacing the old one."""
    target = Path(run_dir) / GUARD_DIR / LAST_GOOD
    tmp = target.with_name(f".{LAST_GOOD}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(checkpoint, tmp, copy_function=link)
    if target.exists():
        old = target.with_name(f".{LAST_GOOD}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def pareto_figure(guard: Guard, title: str) -> Any:
    """Training reward (evaluation mean) against each guarded metric at every evaluation, step-labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [e for e in guard.evaluations if e["reward"] is not None]
    fig, axes = plt.subplots(1, len(guard.rules), figsize=(5 * len(guard.rules), 4), squeeze=False)
    base = {r.metric: _baseline_value(guard, r) for r in guard.rules}
    for ax, rule in zip(axes[0], guard.rules, strict=True):
        xs, ys, flags, steps = [], [], [], []
        for e in evals:
            m = e["metrics"].get(rule.metric)
            value = base[rule.metric] if e["step"] == 0 else (m["value"] if m else None)
            if value is None:
                continue
            xs.append(e["reward"])
            ys.append(value)
            flags.append(bool(m and m["flagged"]))
            steps.append(e["step"])
        ax.plot(xs, ys, "-", color="0.7", zorder=1)
        ax.scatter(
            [x for x, f in zip(xs, flags, strict=True) if not f],
            [y for y, f in zip(ys, flags, strict=True) if not f],
            color="C0",
            label="not flagged",
            zorder=2,
        )
        ax.scatter(
            [x for x, f in zip(xs, flags, strict=True) if f],
            [y for y, f in zip(ys, flags, strict=True) if f],
            color="C3",
            marker="x",
            label="flagged",
            zorder=3,
        )
        for x, y, s in zip(xs, ys, steps, strict=True):
            ax.annotate(str(s), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        if base[rule.metric] is not None:
            limit = base[rule.metric] - rule.sign * rule.tolerance
            ax.axhline(limit, color="C3", ls="--", lw=0.8, label=f"step 0 − tolerance ({rule.tolerance:g})")
        ax.set_xlabel("training reward (evaluation mean)")
        ax.set_ylabel(rule.metric + (" (lower is better)" if rule.sign < 0 else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_pareto(path: Path, guard: Guard, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig = pareto_figure(guard, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _baseline_value(guard: Guard, rule: GuardRule) -> float | None:
    if rule.metric not in guard.baseline:
        return None
    if rule.metric in LOWER_IS_BETTER:
        from flowbp.testbed.heldout_metrics import frechet_distance_from_features as fd

        if guard._reference is None:
            guard._reference = _reference_features()
        return fd(torch.as_tensor(guard.baseline[rule.metric], dtype=torch.float64), guard._reference)
    return float(torch.as_tensor(guard.baseline[rule.metric], dtype=torch.float64).mean())


def write_report(run_dir: Path, guard: Guard, title: str) -> None:
    """RUN/guard/guard.json (the whole record) and RUN/guard/pareto.png."""
    folder = Path(run_dir) / GUARD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "guard.json").write_text(json.dumps(guard.summary(), indent=1) + "\n")
    plot_pareto(folder / "pareto.png", guard, title)


def log_tensorboard(writer: Any, guard: Guard, step: int, title: str) -> None:
    """Scalars guard/<metric>/{change,ci95_high} and the Pareto figure at this evaluation."""
    if writer is None or not guard.evaluations:
        return
    last = guard.evaluations[-1]
    for name, m in last["metrics"].items():
        writer.add_scalar(f"guard/{name}/change", m["change"], step)
        writer.add_scalar(f"guard/{name}/ci95_high", m["ci95_high"], step)
        writer.add_scalar(f"guard/{name}/flagged", float(m["flagged"]), step)
    writer.add_figure("guard/pareto", pareto_figure(guard, title), step)  # closes the figure


def print_event(guard: Guard, event: Mapping[str, Any]) -> None:
    print(guard.message(event), file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- training-loop hooks
def _reward_of(run: Any, scores: Mapping[str, Sequence[float]]) -> float | None:
    from flowbp.evaluate import eval_metric_specs

    reward_spec = eval_metric_specs(run.config, run.backbone.name)[0]  # the training reward (unless eval_metrics)
    return float(torch.tensor(scores[reward_spec], dtype=torch.float64).mean()) if reward_spec in scores else None


@dataclass
class Look:
    """One look's images and scores, in key order (a larger look at the same step reuses them)."""

    keys: list[list[int]]
    images: list[torch.Tensor]
    scores: dict[str, list[float]]


def look(
    run: Any, per_prompt: int, kept: Mapping[str, Any] | None = None, reuse: Look | None = None
) -> tuple[Look, dict, float | None]:
    """The guard's own evaluation: ``per_prompt`` images of every evaluation prompt (seeds ``seed + k``) from the
    EMA weights, scored with the guarded metrics (and the training reward, for the Pareto plot) only.

    ``kept``: the periodic evaluation of this step (:func:`flowbp.evaluate.periodic_eval`'s ``keep``); when its
    images are exactly these, they are reused instead of sampled again. ``reuse``: a smaller look of this
    step (the same weights); only the images it lacks are sampled and scored.
    """
    from flowbp.evaluate import eval_metric_specs, eval_scorers, generate, plan_keys, score
    from flowbp.training.evaluation import eval_model

    guard: Guard = run.guard
    c = run.config
    prompts = list(run.eval_prompts)
    keys = [list(k) for k in plan_keys(len(prompts), per_prompt, guard.schedule.seed)]
    if kept and [list(k) for k in kept["image_set"].keys] == keys:
        images, scores = list(kept["image_set"].images), {k: list(v) for k, v in kept["scores"].items()}
    else:
        have = {} if reuse is None else {tuple(k): i for i, k in enumerate(reuse.keys)}
        missing = [tuple(k) for k in keys if tuple(k) not in have]
        specs = eval_metric_specs(c, run.backbone.name)
        wanted = {r.metric for r in guard.rules} | {specs[0]}
        scorers = {k: v for k, v in eval_scorers(c, run.backbone.name, run.reward, run.accelerator.device).items()
                   if k in wanted}
        with eval_model(run):
            new = generate(run.backbone, prompts, missing, c.num_inference_steps, c.guidance_scale, c.eval_batch_size)
        new_scores = score(new, [prompts[i] for i, _ in missing], scorers, c.eval_batch_size, run.accelerator.device)
        pool = {k: (reuse.images[i], {n: reuse.scores[n][i] for n in new_scores}) for k, i in have.items()}
        pool.update({k: (new[j], {n: new_scores[n][j] for n in new_scores}) for j, k in enumerate(missing)})
        images = [pool[tuple(k)][0] for k in keys]
        scores = {n: [pool[tuple(k)][1][n] for k in keys] for n in new_scores}
    values = eval_values(guard.rules, images, scores)
    return Look(keys, images, scores), values, _reward_of(run, scores)


def on_start(run: Any) -> None:
    """Step 0: the baseline every later look is paired with, on the largest set (the others are its first images)."""
    guard: Guard | None = run.guard
    if guard is None or guard.has_baseline:
        return
    t0 = time.perf_counter()
    seen, values, reward = look(run, guard.schedule.largest)
    guard.set_baseline(seen.keys, values, reward)
    guard.evaluations[-1]["seconds"] = time.perf_counter() - t0


def due(run: Any) -> bool:
    """Whether the guard looks after this step (its own cadence; see :class:`Schedule`)."""
    guard: Guard | None = run.guard
    return guard is not None and guard.has_baseline and guard.stopped is None and run.step >= guard.next_look()


def on_step(run: Any, checkpoint: Any, kept: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One look; checkpoint it when no guard flags it. Returns the record for history.json.

    ``checkpoint(run) -> Path`` is the training loop's checkpoint writer (a collective: every rank calls
    this, and every rank reaches the same verdict, since the look is replicated).
    """
    from flowbp.checkpoint import checkpoint_dir

    guard: Guard = run.guard

    def judge(per_prompt: int, **sources: Any) -> tuple[Look, list[dict]]:
        """Look at ``per_prompt`` images per prompt and record the verdict (and its seconds)."""
        t0 = time.perf_counter()
        seen, values, reward = look(run, per_prompt, **sources)
        fired = guard.observe(run.step, seen.keys, values, reward)
        guard.evaluations[-1]["seconds"] = time.perf_counter() - t0
        return seen, fired

    seen, fired = judge(guard.look_size(), kept=kept)
    if not fired and guard.needs_confirm():  # past a tolerance, not resolved yet: more images, same weights
        seen, fired = judge(guard.schedule.confirm_samples_per_prompt, reuse=seen)
        guard.evaluations[-1]["confirm"] = True
    if not fired:
        path = checkpoint_dir(run.run_dir, run.step)
        guard.last_good = {
            "step": run.step,
            "checkpoint": str(Path(run.run_dir) / GUARD_DIR / LAST_GOOD),
            "written_as": path.name,
        }
        path = checkpoint(run)
        if run.is_main:
            link_last_good(run.run_dir, path)
    stops = [e for e in fired if e["action"] == "stop"]
    if stops:
        guard.stopped = {
            "step": run.step,
            "metrics": [e["metric"] for e in stops],
            "reason": "; ".join(guard.message(e) for e in stops),
        }
    if run.is_main:
        for event in fired:
            print_event(guard, event)
        if stops:
            print(
                f"flowbp train: stopped by the guard after step {run.step}; the last checkpoint no guard flagged "
                f"is {(guard.last_good or {}).get('checkpoint', 'none (flagged at the first look)')}",
                file=sys.stderr,
                flush=True,
            )
        log_tensorboard(run.writer, guard, run.step, f"{run.config.method} on {run.config.backbone}")
    return guard.evaluations[-1]


def stopped(run: Any) -> bool:
    return run.guard is not None and run.guard.stopped is not None


def on_finish(run: Any, summary: dict[str, Any]) -> None:
    """summary.json's ``guard`` (what it did, the last unflagged checkpoint), RUN/guard/{guard.json,pareto.png}."""
    guard: Guard | None = run.guard
    if guard is None:
        return
    s = guard.summary()
    summary["guard"] = {k: v for k, v in s.items() if k != "evaluations"}
    summary["guard"]["seconds"] = round(sum(e.get("seconds", 0.0) for e in guard.evaluations), 3)
    summary["guard"]["looks"] = len(guard.evaluations)
    summary["guard"]["outcome"] = (
        f"stopped at step {guard.stopped['step']}"
        if guard.stopped
        else (f"warned {len(guard.events)} time(s)" if guard.events else "never triggered")
    )
    if run.is_main:
        write_report(run.run_dir, guard, f"{run.config.method} on {run.config.backbone}: reward vs guarded metrics")
