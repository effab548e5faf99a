"""The reward-hacking guard: its decision rule on constructed series, its config checks, and a run it stops.

The decision rule is checked against what it must mean, not against itself: a real drop triggers, a
drop smaller than the tolerance never does (even when the evaluation is precise enough to see it), and
pure evaluation noise triggers at most at the rate a one-sided 97.5% bound allows.
"""

from __future__ import annotations

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
    with pytest.raises(RuntimeError, match="evaluation images differ"):
        h.observe(20, keys[:-1], {"heldout-correct": [1.0] * 49}, reward=0.3)


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
        ([{"metric": "heldout-correct", "tolerance": 0.02}], 0, r"guard: needs periodic evaluation; set eval_every"),
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
