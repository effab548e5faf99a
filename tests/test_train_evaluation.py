"""Training's evaluation fits the run: sized by default, announced, validated first, stoppable by a signal.

Counts come from the sampler itself (every evaluation and grid image goes through ``flowbp.evaluate.rollout``),
signals are real (``os.kill`` of this process while an evaluation runs, with training's own handler installed).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

import flowbp.evaluate as ev
import flowbp.train as train_module
from flowbp.cli import main
from flowbp.config import load_config
from flowbp.train import TrainingStopped, train

DIGITS = {"steps": 2, "batch_size": 4, "num_inference_steps": 4, "sample_every": 0, "checkpoint_every": 0,
          "progress": False, "log_with": "none", "method_args": {"jk_sampling": "uniform"}}


class Counter:
    """Wraps flowbp.evaluate.rollout: counts sampled images, optionally acts at a given call."""

    def __init__(self, monkeypatch, limit: int | None = None) -> None:
        self.images = 0
        self.calls = 0
        self.limit = limit
        self.before_training: int | None = None
        self.action = None  # (call number, function)
        original = ev.rollout

        def counted(velocity, x0, sigmas, *args, **kwargs):
            self.calls += 1
            self.images += x0.shape[0]
            if self.limit is not None and self.images > self.limit:
                raise AssertionError(f"sampled {self.images} images, more than {self.limit}")
            if self.action is not None and self.calls == self.action[0]:
                self.action[1]()
            return original(velocity, x0, sigmas, *args, **kwargs)

        monkeypatch.setattr(ev, "rollout", counted)
        step = train_module.train_step

        def first_step(run):
            if self.before_training is None:
                self.before_training = self.images
            return step(run)

        monkeypatch.setattr(train_module, "train_step", first_step)


def test_plain_sd3_run_starts_training_after_a_small_announced_evaluation(tiny_sd3_dir: Path, tmp_path: Path,
                                                                        monkeypatch, capsys) -> None:
    """No evaluation setting at all: 8 prompts × 2 images before step 1 (and the grid of the same size)."""
    counter = Counter(monkeypatch, limit=200)  # today's default would be 400 prompts × 20 images
    out = tmp_path / "run"
    code = main(["train", "--backbone", "sd3", "--backbone-path", str(tiny_sd3_dir), "--set", "resolution=32",
                 "--set", "prompts=[a red cube, two dogs]", "--set", "steps=1", "--set", "batch_size=1",
                 "--set", "num_inference_steps=3", "--set", "method_args={jk_sampling: uniform}",
                 "--set", "reward=digit-contrast", "--set", "log_with=none", "--set", "progress=false",
                 "--set", "sample_every=0", "--output-dir", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert counter.before_training == 16 + 16  # evaluation 8 × 2, grid min(10, 8) prompts × min(8, 2) images
    assert "evaluation before training: 16 images (8 prompts × 2), 3 sampling steps, about" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_samples"] == 16


def test_eval_at_start_false_samples_nothing_before_step_one(tmp_path: Path, monkeypatch) -> None:
    counter = Counter(monkeypatch)
    summary = train(load_config(None, {**DIGITS, "eval_at_start": False, "eval_max_prompts": 4,
                                       "eval_samples_per_prompt": 2, "output_dir": str(tmp_path / "r")}))
    assert counter.before_training == 0
    assert summary["before"] is None and summary["reward_improvement"] is None
    assert summary["eval_samples"] == 8  # the evaluation after training still runs
    assert not (tmp_path / "r" / "samples" / "step-000000.png").exists()
    assert (tmp_path / "r" / "samples" / "final.png").is_file()


def test_an_evaluation_that_cannot_be_scored_fails_before_anything_exists(tmp_path: Path, monkeypatch,
                                                                           capsys) -> None:
    """digits with one image per prompt: no class has two images, so no diversity; caught before sampling."""
    counter = Counter(monkeypatch)
    out = tmp_path / "r1"
    code = main(["train", "--set", "eval_samples_per_prompt=1", "--output-dir", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert "eval_samples_per_prompt:" in captured.err and "diversity needs at least two images" in captured.err
    assert captured.err.count("\n") == 1
    assert "run directory" not in captured.out and not out.exists()
    assert counter.images == 0


def test_sigterm_during_the_final_evaluation_stops_within_a_batch_and_resumes(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "r"
    config = load_config(None, {**DIGITS, "eval_max_prompts": 4, "eval_samples_per_prompt": 2, "eval_batch_size": 2,
                                "output_dir": str(out)})
    counter = Counter(monkeypatch)
    # each evaluation is 4 batches (4 prompts × 2 images / 2); the signal comes during the third of the final one
    calls_before_final: list[int] = []

    original_finish = train_module.finish

    def finish(run, start):
        calls_before_final.append(counter.calls)
        counter.action = (counter.calls + 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
        return original_finish(run, start)

    monkeypatch.setattr(train_module, "finish", finish)
    with pytest.raises(TrainingStopped) as stopped:
        train(config)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert "during the final evaluation" in str(stopped.value) and "--resume" in str(stopped.value)
    assert counter.calls == calls_before_final[0] + 3  # the batch running when the signal came, then no more
    assert not (out / "summary.json").exists()
    assert (out / "checkpoints" / "step-000002").is_dir()
    monkeypatch.setattr(train_module, "finish", original_finish)
    counter.action = None
    summary = train(resume=out)
    assert summary is not None and summary["steps"] == 2 and (out / "summary.json").is_file()


def test_sigterm_before_the_first_step_leaves_nothing_and_says_so(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "r"
    counter = Counter(monkeypatch)
    counter.action = (2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(TrainingStopped) as stopped:
        train(load_config(None, {**DIGITS, "eval_max_prompts": 4, "eval_samples_per_prompt": 2, "eval_batch_size": 2,
                                 "output_dir": str(out)}))
    assert "before the first training step" in str(stopped.value) and "removed" in str(stopped.value)
    assert counter.calls == 2 and counter.before_training is None
    assert not out.exists()
