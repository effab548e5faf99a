"""The reward-hacking guard: its decision rule on constructed series, its config checks, and a run it stops.

The decision rule is checked against what it must mean, not against itself: a real drop triggers, a
drop smaller than the tolerance never does (even when the evaluation is precise enough to see it), and
pure evaluation noise triggers at most at the rate a one-sided 97.5% bound allows.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from flowbp.config import load_config, validate_against_components
from flowbp.guard import Guard, GuardRule, fd_paired_change, paired_change, parse_rules, triggered


def _bernoulli(p: float, n: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=gen, dtype=torch.float64) < p).double()


# ----------------------------------------------------------------------------- the decision rule
def test_a_real_drop_triggers() -> None:
    gen = torch.Generator().manual_seed(0)
    before = torch.ones(200, dtype=torch.float64)  # every image correct at step 0
    after = before.clone()
    after[torch.randperm(200, generator=gen)[:24]] = 0.0  # 12 points lost
    change = paired_change(before, after, +1.0)
    assert change["mean"] == pytest.approx(-0.12)
    assert triggered(change, 0.02)
    # the same drop on a metric where lower is better is an *increase*
    assert triggered(paired_change(-before, -after, -1.0), 0.02)
    assert not triggered(paired_change(before, after, -1.0), 0.02)  # for lower-is-better, that was a gain


def test_noise_does_not_trigger() -> None:
    """No true change: step-0 and step-t correctness are two independent draws of the same p per image."""
    gen = torch.Generator().manual_seed(1)
    fired = 0
    trials = 400
    for _ in range(trials):
        p = torch.rand(200, generator=gen, dtype=torch.float64) * 0.2 + 0.8  # per-image difficulty
        before = (torch.rand(200, generator=gen, dtype=torch.float64) < p).double()
        after = (torch.rand(200, generator=gen, dtype=torch.float64) < p).double()
        fired += triggered(paired_change(before, after, +1.0), 0.02)
    # the rule is a one-sided 97.5% bound shifted by the tolerance: with ε = 0.02 the false-alarm rate is
    # far below 2.5%; allow 2.5% + 3 binomial standard deviations
    assert fired / trials < 0.025 + 3 * (0.025 * 0.975 / trials) ** 0.5
    # with no tolerance the rule is exactly the one-sided bound: the rate is ≈ 2.5%, not 0 (the test can fail)
    fired0 = 0
    for _ in range(trials):
        p = torch.rand(200, generator=gen, dtype=torch.float64) * 0.2 + 0.8
        before = (torch.rand(200, generator=gen, dtype=torch.float64) < p).double()
        after = (torch.rand(200, generator=gen, dtype=torch.float64) < p).double()
        fired0 += triggered(paired_change(before, after, +1.0), 0.0)
    assert 0 < fired0 / trials < 0.025 + 3 * (0.025 * 0.975 / trials) ** 0.5


def test_a_drop_inside_the_tolerance_does_not_trigger() -> None:
    """A 1-point drop, measured so precisely that the interval excludes 0, stays inside a 2-point tolerance."""
    gen = torch.Generator().manual_seed(2)
    n = 20000
    before = torch.ones(n, dtype=torch.float64)
    after = 1.0 - _bernoulli(0.01, n, gen)
    change = paired_change(before, after, +1.0)
    assert change["ci95_high"] < 0  # the drop is real ...
    assert not triggered(change, 0.02)  # ... but inside the tolerance
    assert triggered(change, 0.005)  # and it is larger than a tighter tolerance


def test_an_imprecise_large_drop_waits_for_evidence() -> None:
    """Three images, one lost: a 33-point drop, but the t interval (2 d.f.) still reaches above −tolerance."""
    change = paired_change([1.0, 1.0, 1.0], [1.0, 1.0, 0.0], +1.0)
    assert change["mean"] < -0.3 and not triggered(change, 0.02)


def _look_series(p_wrong: list[float], n: int, persist: float, gen: torch.Generator) -> list[torch.Tensor]:
    """Per-image correctness at each look of one run: image k is wrong when its draw is below the look's
    population error rate; with probability ``persist`` the draw is the image's own fixed one (the guard
    samples the same seeds at every look, so an image that is fragile stays fragile), else a fresh one."""
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    out = []
    for p in p_wrong:
        keep = torch.rand(n, generator=gen, dtype=torch.float64) < persist
        draw = torch.where(keep, u, torch.rand(n, generator=gen, dtype=torch.float64))
        out.append((draw >= p).double())
    return out


def _run_fires(
    p_wrong: list[float], n: int, persist: float, confidence: float, gen: torch.Generator, confirm: int | None = None
) -> int | None:
    """The first look at which the rule (tolerance 0.02) fires in one constructed run, or None. ``confirm``: a look
    of n images whose estimate is past the tolerance, unresolved, is judged again on the first ``confirm`` images
    (the guard's confirm set; the look's n images are its first)."""
    size = confirm or n
    before = torch.ones(size, dtype=torch.float64)  # every image correct at step 0, as on digits
    for j, after in enumerate(_look_series(p_wrong, size, persist, gen)):
        change = paired_change(before[:n], after[:n], +1.0, confidence)
        if triggered(change, 0.02):
            return j
        if confirm and change["mean"] < -0.02 and triggered(paired_change(before, after, +1.0, confidence), 0.02):
            return j
    return None


def test_noise_over_many_looks_keeps_the_false_alarm_rate() -> None:
    """A run that sits exactly at the tolerance (2 points lost) for 30 looks of 1000 images is the hardest
    case for a rule that looks many times. With the guard's per-look 99% bound and the same images at every
    look (90% of each image's draws persistent) fewer than 5% of such runs are ever stopped; the 97.5% bound
    on fresh images at every look stops far more than 5% (each look is another chance): the test can fail."""
    gen = torch.Generator().manual_seed(5)
    runs = 200
    at_tolerance = [0.02] * 30
    guard = sum(_run_fires(at_tolerance, 1000, 0.9, 0.99, gen) is not None for _ in range(runs)) / runs
    assert guard < 0.05
    naive = sum(_run_fires(at_tolerance, 1000, 0.0, 0.975, gen) is not None for _ in range(runs)) / runs
    assert naive > 0.15  # measured 0.335 over 1000 runs (and 0.078 with the 99% bound on fresh images)
    # the confirm set (2000 images, judged again whenever a 1000-image look is past the tolerance) is one more
    # look at about half the looks: still below 5% (measured 0.033 over 300 runs; 3000 images: 0.07)
    confirmed = [_run_fires(at_tolerance, 1000, 0.9, 0.99, gen, confirm=2000) is not None for _ in range(runs)]
    assert sum(confirmed) / runs < 0.05


def test_a_drop_inside_the_tolerance_never_triggers_over_many_looks() -> None:
    """Half the tolerance lost (1 point) at each of 60 looks of the 200-image screen set, fresh images every
    look (no help from persistence): never stopped in 200 runs."""
    gen = torch.Generator().manual_seed(6)
    assert all(_run_fires([0.01] * 60, 200, 0.0, 0.99, gen) is None for _ in range(200))


def test_a_real_drop_over_looks_triggers_soon_after_crossing() -> None:
    """Accuracy falling by one point per look on 1000 images: the rule fires once the drop is clearly past
    2 points, in every run, and (in 95% of runs) by 5 points lost, the acceptance margin on digits."""
    gen = torch.Generator().manual_seed(7)
    ramp = [0.01 * j for j in range(12)]  # 0, 1, ..., 11 points lost
    fired = [_run_fires(ramp, 1000, 0.9, 0.99, gen) for _ in range(100)]
    assert all(f is not None for f in fired)
    assert min(fired) >= 3  # never before 3 points are lost (2 points is the tolerance)
    assert sorted(fired)[94] <= 5  # and in 95% of runs by 5 points
    # the confirm set stops the same fall a look earlier: in 95% of runs by 4 points lost (digits: above 0.96)
    confirmed = [_run_fires(ramp, 1000, 0.9, 0.99, gen, confirm=2000) for _ in range(100)]
    assert all(f is not None and f >= 3 for f in confirmed)
    assert sorted(confirmed)[94] <= 4 and sum(confirmed) < sum(fired)


def test_fd_paired_bootstrap() -> None:
    """FD: features drifting away from the reference trigger; a re-draw from the same distribution does not."""
    gen = torch.Generator().manual_seed(3)
    reference = torch.randn(300, 8, generator=gen, dtype=torch.float64)
    before = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    same = before + 0.05 * torch.randn(200, 8, generator=gen, dtype=torch.float64)
    shifted = before + 0.6  # every image moves: FD grows by ≈ 8·0.36 ≈ 2.9
    worse = fd_paired_change(before, shifted, reference, resamples=200)
    assert worse["mean"] < -2.0 and triggered(worse, 1.0)
    assert not triggered(worse, 5.0)  # larger than the change: inside the tolerance
    assert not triggered(fd_paired_change(before, same, reference, resamples=200), 0.5)


def test_guard_state_survives_a_round_trip_through_json() -> None:
    rules = parse_rules([{"metric": "heldout-correct", "tolerance": 0.02, "action": "warn"}])
    g = Guard(rules)
    keys = [[i, 7] for i in range(50)]
    g.set_baseline(keys, {"heldout-correct": [1.0] * 50}, reward=0.1)
    fired = g.observe(10, keys, {"heldout-correct": [1.0] * 40 + [0.0] * 10}, reward=0.2)
    assert [e["metric"] for e in fired] == ["heldout-correct"] and fired[0]["action"] == "warn"
    h = Guard(rules)
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert h.state_dict() == g.state_dict()
    with pytest.raises(RuntimeError, match="evaluation images differ"):  # an image step 0 did not sample
        h.observe(20, [*keys[:-1], [0, 99]], {"heldout-correct": [1.0] * 50}, reward=0.3)
    # a subset of step 0's images (the screen set) pairs with their own step-0 values
    fired = h.observe(20, keys[40:], {"heldout-correct": [0.0] * 10}, reward=0.3)
    assert h.evaluations[-1]["n"] == 10 and h.evaluations[-1]["metrics"]["heldout-correct"]["change"] == -1.0


# ----------------------------------------------------------------------------- config validation
@pytest.mark.parametrize(
    ("guard", "eval_every", "message"),
    [
        ([{"metric": "heldout-correct", "tolerance": -0.1}], 5, r"guard\[0\]\.tolerance: .*-0\.1"),
        ([{"metric": "heldout-correct", "tolerance": "big"}], 5, r"guard\[0\]\.tolerance: .*'big'"),
        (
            [{"metric": "heldout-correct", "tolerance": 0.02, "action": "halt"}],
            5,
            r"guard\[0\]\.action: got 'halt'; allowed: warn, stop",
        ),
        ([{"metric": "heldout-correct", "tolerance": 0.02, "when": 3}], 5, r"guard\[0\]: unknown key 'when'"),
        (
            [{"metric": "pickscore", "tolerance": 0.02}],
            5,
            r"guard\[0\]\.metric: 'pickscore' is not evaluated for backbone 'digits'; allowed: .*heldout-correct",
        ),
        ([{"metric": "heldout-correct", "tolerance": 0.02}], 0, r"guard: needs a cadence; set guard_every"),
        (
            [{"metric": "heldout-correct", "tolerance": 0.02}] * 2,
            5,
            r"guard: metric 'heldout-correct' is guarded twice",
        ),
    ],
)
def test_bad_guard_config_is_one_clear_error(guard, eval_every, message) -> None:
    with pytest.raises(ValueError, match=message):
        validate_against_components(load_config(None, {"guard": guard, "eval_every": eval_every}))


def test_bad_guard_in_the_cli_writes_nothing(tmp_path: Path, capsys) -> None:
    from flowbp.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--set",
            "eval_every=5",
            "--set",
            "guard=[{metric: heldout-fd, tolerance: 1, action: pause}]",
            "--output-dir",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not out.exists()
    assert err[-1].endswith("guard[0].action: got 'pause'; allowed: warn, stop")


def test_good_guard_config_is_accepted() -> None:
    c = load_config(
        None,
        {
            "eval_every": 10,
            "guard": [
                {"metric": "heldout-correct", "tolerance": 0.02, "action": "stop"},
                {"metric": "heldout-fd", "tolerance": 1.0, "action": "warn"},
                {"metric": "digit-alignment+5*digit-contrast", "tolerance": 0},
            ],
        },
    )
    validate_against_components(c)
    assert [r.action for r in parse_rules(c.guard)] == ["stop", "warn", "stop"]
    assert GuardRule("heldout-fd", 1.0).sign == -1.0 and GuardRule("heldout-correct", 1.0).sign == 1.0


# ----------------------------------------------------------------------------- end to end
def test_guard_stops_a_hacking_run_and_resume_keeps_its_state(tmp_path: Path) -> None:
    """Contrast alone with a high learning rate: held-out accuracy collapses within a few steps.

    The run is split in two (``stop_after``) and resumed, so the guard's baseline and verdicts must come
    back from the checkpoint; it then stops the run with exit 0 semantics (a summary, a reason, the last
    unflagged checkpoint hard-linked to RUN/guard/last-good).
    """
    from flowbp.train import train

    out = tmp_path / "run"
    config = load_config(
        None,
        {
            "steps": 40,
            "batch_size": 8,
            "num_inference_steps": 6,
            "eval_samples_per_prompt": 6,
            "sample_every": 0,
            "checkpoint_every": 0,
            "progress": False,
            "reward": "digit-contrast",
            "loss": "linear",
            "learning_rate": 0.01,
            "eval_every": 1,
            "guard_alert_samples_per_prompt": 6,  # one image set: looks every step reuse the periodic evaluation
            "guard_confirm_samples_per_prompt": 6,
            "output_dir": str(out),
            "log_with": "none",
            "guard": [
                {"metric": "heldout-correct", "tolerance": 0.02, "action": "stop"},
                {"metric": "heldout-fd", "tolerance": 1000.0, "action": "warn"},  # exercised, never flags,
            ],
        },
    )
    assert train(config, stop_after=1) is None  # step 1: the EMA has barely moved; not flagged
    first = json.loads(next((out / "checkpoints").iterdir()).joinpath("state.json").read_text())["state"]["guard"]
    assert [e["step"] for e in first["evaluations"]] == [0, 1]
    summary = train(resume=out)
    g = summary["guard"]
    assert g["stopped"] is not None, g
    stop = g["stopped"]["step"]
    assert summary["steps"] == stop < 40
    evals = json.loads((out / "guard" / "guard.json").read_text())["evaluations"]
    assert [e["step"] for e in evals] == list(range(stop + 1))  # resumed, not restarted
    last = evals[-1]["metrics"]["heldout-correct"]
    assert last["flagged"] and last["ci95_high"] < -0.02
    good = g["last_good_checkpoint"]
    assert good["step"] == max(e["step"] for e in evals if not e["flagged"]) >= 1
    assert Path(good["checkpoint"]).joinpath("state.json").is_file()
    assert json.loads(Path(good["checkpoint"]).joinpath("state.json").read_text())["step"] == good["step"]
    assert (out / "guard" / "pareto.png").is_file() and (out / "summary.json").is_file()


def test_schedule_defaults_and_alert_cadence() -> None:
    """Defaults derive from eval_every; a look that used a quarter of a tolerance brings the next look sooner,
    on the alert set; a clear look goes back to the screen cadence."""
    from flowbp.guard import schedule_of

    s = schedule_of(load_config(None, {"eval_every": 10}))
    assert (s.every, s.samples_per_prompt, s.alert_every, s.alert_samples_per_prompt) == (2, 20, 1, 100)
    assert s.confirm_samples_per_prompt == 200 and s.largest == 200
    assert s.confidence == 0.99 and s.seed == 2024
    s = schedule_of(load_config(None, {"guard_every": 12, "guard_samples_per_prompt": 4}))
    assert (s.every, s.alert_every, s.alert_samples_per_prompt, s.confirm_samples_per_prompt) == (12, 2, 20, 40)
    g = Guard(parse_rules([{"metric": "heldout-correct", "tolerance": 0.12}]), s)
    keys = [[p, 2024 + k] for p in range(10) for k in range(20)]
    g.set_baseline(keys, {"heldout-correct": [1.0] * 200}, reward=None)
    assert (g.next_look(), g.look_size()) == (12, 4)
    screen = [k for k in keys if k[1] < 2024 + 4]
    g.observe(12, screen, {"heldout-correct": [1.0] * 39 + [0.0]}, reward=None)  # −0.025: under a quarter of 0.12
    assert (g.next_look(), g.look_size()) == (24, 4)
    g.observe(24, screen, {"heldout-correct": [1.0] * 38 + [0.0] * 2}, reward=None)  # −0.05: on alert
    assert g.alert and (g.next_look(), g.look_size()) == (26, 20)
    g.observe(26, keys, {"heldout-correct": [1.0] * 200}, reward=None)  # clear again
    assert (g.next_look(), g.look_size()) == (38, 4)
    # hysteresis: the alert set (precise) keeps the alert only past half the tolerance, the screen raises it at
    # a quarter: −0.05 (0.42 of 0.12) raises the alert on the screen set but ends it on the alert set
    g.observe(38, screen, {"heldout-correct": [1.0] * 38 + [0.0] * 2}, reward=None)
    assert g.alert
    g.observe(39, keys, {"heldout-correct": [1.0] * 190 + [0.0] * 10}, reward=None)
    assert not g.alert and (g.next_look(), g.look_size()) == (51, 4)
    g.observe(51, keys, {"heldout-correct": [1.0] * 186 + [0.0] * 14}, reward=None)  # −0.07: over half
    assert g.alert and not g.needs_confirm()  # not past the tolerance: no confirm look


def test_a_look_past_the_tolerance_is_confirmed_on_more_images() -> None:
    """An alert-set look whose estimate is past the tolerance but whose bound is not: the guard asks for the
    confirm set at the same step; with twice the images the same fall is resolved and fires. A resolved look,
    a look inside the tolerance and a look already on the confirm set ask for nothing more."""
    from flowbp.guard import schedule_of

    s = schedule_of(load_config(None, {"guard_every": 2, "guard_samples_per_prompt": 20}))
    assert (s.alert_samples_per_prompt, s.confirm_samples_per_prompt) == (100, 200)
    g = Guard(parse_rules([{"metric": "heldout-correct", "tolerance": 0.02}]), s)
    keys = [[p, 2024 + k] for p in range(10) for k in range(200)]
    g.set_baseline(keys, {"heldout-correct": [1.0] * 2000}, reward=None)
    alert_keys = [k for k in keys if k[1] < 2024 + 100]
    lost = {(p, 2024 + k) for p in range(10) for k in (1, 3, 5)}  # 30 of 1000 lost: 0.97
    assert not g.observe(20, alert_keys, {"heldout-correct": [0.0 if tuple(k) in lost else 1.0 for k in alert_keys]},
                         reward=None)
    assert g.evaluations[-1]["metrics"]["heldout-correct"]["upper"] > -0.02  # 1000 images cannot resolve 0.97 ...
    assert g.needs_confirm()
    lost |= {(p, 2024 + k) for p in range(10) for k in (101, 103, 105, 107)}  # 70 of 2000: 0.965
    fired = g.observe(20, keys, {"heldout-correct": [0.0 if tuple(k) in lost else 1.0 for k in keys]}, reward=None)
    assert [e["metric"] for e in fired] == ["heldout-correct"]  # ... 2000 images at 0.965 do
    assert not g.needs_confirm()  # flagged: nothing to confirm
    g2 = Guard(g.rules, s)
    g2.set_baseline(keys, {"heldout-correct": [1.0] * 2000}, reward=None)
    g2.observe(20, alert_keys, {"heldout-correct": [1.0] * 985 + [0.0] * 15}, reward=None)  # 0.985: inside
    assert not g2.needs_confirm()
    g2.observe(21, keys, {"heldout-correct": [1.0] * 1950 + [0.0] * 50}, reward=None)  # 0.975 on the confirm set
    assert not g2.evaluations[-1]["flagged"] and not g2.needs_confirm()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("guard_every", 0, r"guard_every: must be a whole number >= 1 .*got 0"),
        ("guard_alert_samples_per_prompt", -1, r"guard_alert_samples_per_prompt: must be a whole number >= 1 .*got -1"),
        ("guard_confidence", 1.0, r"guard_confidence: must be a number in \(0.5, 1\) .*got 1.0"),
    ],
)
def test_bad_schedule_is_one_clear_error(key, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, {key: value})
    with pytest.raises(ValueError, match=r"guard_alert_samples_per_prompt: 3 is below guard_samples_per_prompt \(4\)"):
        load_config(None, {"guard_samples_per_prompt": 4, "guard_alert_samples_per_prompt": 3})
    with pytest.raises(ValueError, match=r"guard_confirm_samples_per_prompt: 5 is below the alert set's .*\(6\)"):
        load_config(None, {"guard_alert_samples_per_prompt": 6, "guard_confirm_samples_per_prompt": 5})


def test_looks_happen_at_the_claimed_steps(tmp_path: Path) -> None:
    """A fast hacking run (contrast alone, high learning rate): the guard's own looks come every guard_every
    steps on the screen set and, once on alert, every guard_alert_every steps on the alert set, exactly as the
    schedule says; the periodic evaluation (eval_every) goes its own way and writes its files."""
    from flowbp.train import train

    out = tmp_path / "run"
    config = load_config(
        None,
        {
            "steps": 10, "batch_size": 8, "num_inference_steps": 4, "eval_samples_per_prompt": 2,
            "eval_at_start": False, "sample_every": 0, "checkpoint_every": 0, "progress": False,
            "reward": "digit-contrast", "loss": "linear", "learning_rate": 0.01, "eval_every": 5,
            "output_dir": str(out), "log_with": "none",
            "guard": [{"metric": "heldout-correct", "tolerance": 0.02, "action": "warn"}],  # one lost image: alert
            "guard_every": 3, "guard_samples_per_prompt": 2, "guard_alert_every": 1,
            "guard_alert_samples_per_prompt": 4,
        },
    )
    summary = train(config)
    evals = json.loads((out / "guard" / "guard.json").read_text())["evaluations"]
    assert evals[0]["step"] == 0 and evals[0]["n"] == 80  # the baseline: the confirm set (2 × the alert set)
    for prev, cur in itertools.pairwise(evals):
        if cur.get("confirm"):  # the same step, on the confirm set, after a look past the tolerance, unresolved
            m = prev["metrics"]["heldout-correct"]
            assert cur["step"] == prev["step"] and cur["n"] == 80 and prev["n"] < 80, (prev, cur)
            assert m["change"] < -0.02 and not m["flagged"], (prev, cur)
            continue
        alert = bool(prev.get("alert"))
        assert cur["step"] - prev["step"] == (1 if alert else 3), (prev, cur)
        assert cur["n"] == (40 if alert else 20), (prev, cur)
    assert evals[-1]["step"] > 10 - 3 and summary["guard"]["looks"] == len(evals)
    assert any(e.get("alert") for e in evals[1:-1]), "the run never went on alert: the test shows nothing"
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["step-000005", "step-000010"]


def test_a_confirm_look_samples_only_the_images_it_lacks(tmp_path: Path, monkeypatch) -> None:
    """The confirm look extends a smaller look of the same step: it samples only the seeds that look lacks, and
    what it returns (images, per-image scores, guarded values) is what a fresh look at the larger set returns."""
    import flowbp.evaluate
    from flowbp import guard
    from flowbp.train import setup

    config = load_config(
        None,
        {
            "num_inference_steps": 4, "eval_every": 5, "progress": False, "log_with": "none",
            "output_dir": str(tmp_path / "run"), "reward": "digit-contrast",
            "guard": [{"metric": "heldout-correct", "tolerance": 0.02, "action": "stop"},
                      {"metric": "heldout-fd", "tolerance": 1.0, "action": "warn"}],
            "guard_samples_per_prompt": 1, "guard_alert_samples_per_prompt": 2, "guard_confirm_samples_per_prompt": 4,
        },
    )
    run = setup(config, tmp_path / "run")
    sampled: list[tuple[int, int]] = []
    generate = flowbp.evaluate.generate

    def counting(backbone, prompts, keys, *args, **kwargs):
        sampled.extend(tuple(k) for k in keys)
        return generate(backbone, prompts, keys, *args, **kwargs)

    monkeypatch.setattr(flowbp.evaluate, "generate", counting)
    small, _, _ = guard.look(run, 2)
    assert len(sampled) == 20
    sampled.clear()
    big, values, reward = guard.look(run, 4, reuse=small)
    assert sorted(sampled) == sorted((p, 2024 + k) for p in range(10) for k in (2, 3))  # only the lacking seeds
    assert [tuple(k) for k in big.keys] == [(p, 2024 + k) for p in range(10) for k in range(4)]
    fresh, fresh_values, fresh_reward = guard.look(run, 4)
    for a, b in zip(big.images, fresh.images, strict=True):  # uint8; batches of another make-up may round apart
        assert (a.int() - b.int()).abs().max() <= 1
    assert values["heldout-correct"] == fresh_values["heldout-correct"]
    assert torch.allclose(values["heldout-fd"], fresh_values["heldout-fd"], atol=1e-2)
    assert reward == pytest.approx(fresh_reward, abs=1e-4)
    reused = [i for i, k in enumerate(big.keys) if k[1] < 2024 + 2]
    assert all(big.images[i] is small.images[small.keys.index(big.keys[i])] for i in reused)  # not re-sampled


def test_tensorboard_and_pareto_outputs(tmp_path: Path) -> None:
    """Each evaluation logs guard/<metric>/{change,ci95_high,flagged} and the Pareto figure; the report files exist."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from flowbp.guard import log_tensorboard, write_report

    g = Guard(parse_rules([{"metric": "heldout-correct", "tolerance": 0.02}]))
    keys = [[i, 1] for i in range(40)]
    g.set_baseline(keys, {"heldout-correct": [1.0] * 40}, reward=0.02)
    writer = SummaryWriter(str(tmp_path / "tb"))
    for step, lost in ((10, 0), (20, 12)):
        g.observe(step, keys, {"heldout-correct": [1.0] * (40 - lost) + [0.0] * lost}, reward=0.02 + step / 1000)
        log_tensorboard(writer, g, step, "test")
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    flagged = [(e.step, e.value) for e in events.Scalars("guard/heldout-correct/flagged")]
    assert flagged == [(10, 0.0), (20, 1.0)]
    assert [round(e.value, 6) for e in events.Scalars("guard/heldout-correct/change")] == [0.0, -0.3]
    assert [e.step for e in events.Images("guard/pareto")] == [10, 20]
    write_report(tmp_path, g, "test")
    record = json.loads((tmp_path / "guard" / "guard.json").read_text())
    assert [e["step"] for e in record["evaluations"]] == [0, 10, 20] and record["events"][0]["step"] == 20
    assert (tmp_path / "guard" / "pareto.png").stat().st_size > 0
