"""Periodic evaluation in training is `flowbp eval`: same images, same scores, logged to history and TensorBoard.

One tiny run trained on stroke contrast (linear loss, high learning rate) with ``eval_every=3``; its LoRA
is then evaluated with the CLI against the base model, paired by prompt and seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from flowbp.cli import main
from flowbp.config import load_config
from flowbp.train import train

PROMPTS = ["digit 1", "digit 4", "digit 6", "digit 8"]
METRICS = ["digit-contrast", "heldout-correct"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_eval")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    run = root / "run"
    config = {
        "steps": 6, "batch_size": 8, "num_inference_steps": 6, "eval_samples_per_prompt": 2,
        "sample_every": 0, "checkpoint_every": 0, "progress": False, "reward": "digit-contrast",
        "loss": "linear", "learning_rate": 0.01, "method_args": {"jk_sampling": "uniform"},
        "eval_every": 3, "eval_prompts_file": str(prompts), "eval_metrics": METRICS, "output_dir": str(run),
    }
    assert train(load_config(None, config)) is not None
    return {"root": root, "prompts": prompts, "run": run}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]


def test_periodic_eval_is_logged_and_written(trained) -> None:
    run = trained["run"]
    history = json.loads((run / "history.json").read_text())
    assert [h["step"] for h in history if "eval" in h] == [3, 6]
    for step in (3, 6):
        written = json.loads((run / "eval" / f"step-{step:06d}" / "summary.json").read_text())
        logged = history[step - 1]["eval"]
        assert list(logged) == METRICS
        for m in METRICS:
            assert logged[m]["mean"] == written["metrics"][m]["mean"] and logged[m]["n_prompts"] == 4
        assert (run / "eval" / f"step-{step:06d}" / "report.html").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("eval/digit-contrast")] == [3, 6]
    assert "eval/digit-contrast/ci95_low" in scalars
    assert history[5]["eval"]["digit-contrast"]["mean"] > history[2]["eval"]["digit-contrast"]["mean"]


def test_cli_eval_of_the_saved_lora_reproduces_the_last_periodic_eval_and_beats_the_base(trained) -> None:
    root, run, prompts = trained["root"], trained["run"], str(trained["prompts"])
    common = ["eval", "--backbone", "digits", "--prompts", prompts, "--metrics", ",".join(METRICS),
              "--images-per-prompt", "2", "--seed", "2024", "--steps", "6", "--no-progress"]
    base, tuned = root / "base", root / "tuned"
    assert main([*common, "--out", str(base)]) == 0
    assert main([*common, "--lora", str(run / "lora"), "--out", str(tuned), "--baseline", str(base)]) == 0
    # the shipped LoRA holds the EMA weights that the step-6 evaluation used: identical images and scores
    periodic = _records(run / "eval" / "step-000006")
    assert [r["scores"] for r in _records(tuned)] == [r["scores"] for r in periodic]
    for r in periodic:
        assert (tuned / r["image"]).read_bytes() == (run / "eval" / "step-000006" / r["image"]).read_bytes()
    # paired comparison tuned − base, checked against scipy's paired t-test on per-prompt means
    got = json.loads((tuned / "comparison.json").read_text())["metrics"]["digit-contrast"]
    a, b = _records(tuned), _records(base)
    pa, pb = ([np.mean([r["scores"]["digit-contrast"] for r in x if r["prompt_index"] == i]) for i in range(4)]
              for x in (a, b))
    d = np.subtract(pa, pb)
    low, high = sps.t.interval(0.95, 3, loc=d.mean(), scale=sps.sem(d))
    assert (got["diff"], got["ci95_low"], got["ci95_high"]) == pytest.approx((d.mean(), low, high), rel=1e-9)
    assert got["significant"] == (sps.ttest_rel(pa, pb).pvalue < 0.05)
    assert got["significant"] and got["diff"] > 0  # training on contrast raised it on held-out prompts


def test_bad_eval_config_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="eval_every: must be >= 0, got -1"):
        load_config(None, {"eval_every": -1})
    with pytest.raises(ValueError, match="eval_prompts_file: file or directory not found"):
        load_config(None, {"eval_prompts_file": str(tmp_path / "missing.txt")})
    from flowbp.config import validate_against_components

    with pytest.raises(ValueError, match="eval_metrics: 'sharpness' is not a metric"):
        validate_against_components(load_config(None, {"eval_metrics": ["digit-ink", "sharpness"]}))


@pytest.mark.slow
def test_periodic_eval_under_two_processes_equals_one_process(tmp_path: Path) -> None:
    """Every rank samples the evaluation (DDP may sync in forward), only rank 0 writes; same scores as 1 process."""
    import os
    import subprocess
    import sys

    prompts = tmp_path / "p.txt"
    prompts.write_text("digit 2\ndigit 5\n")
    cfg = {"steps": 4, "batch_size": 4, "num_inference_steps": 5, "eval_samples_per_prompt": 2, "sample_every": 0,
           "checkpoint_every": 0, "progress": False, "eval_every": 2, "eval_prompts_file": str(prompts)}
    two, one = tmp_path / "two", tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "flowbp",
           "train", "--output-dir", str(two), *[a for k, v in cfg.items() for a in ("--set", f"{k}={json.dumps(v)}")]]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(load_config(None, {**cfg, "output_dir": str(one)}))
    for step in ("step-000002", "step-000004"):
        assert _records(two / "eval" / step) == _records(one / "eval" / step)
    assert [h["step"] for h in json.loads((two / "history.json").read_text()) if "eval" in h] == [2, 4]
