"""Crash safety, preemption, the non-finite guard and gradient accumulation, on real digits runs.

Kills are real SIGKILLs of a real ``python -m flowbp train`` subprocess, placed precisely by the
``FLOWBP_TEST_KILL=point@step`` hook (no timing races); resumes run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowbp.checkpoint import list_checkpoints, verify_checkpoint
from flowbp.cli import main
from flowbp.config import load_config
from flowbp.train import train

ROOT = Path(__file__).resolve().parents[1]
# 4 steps, checkpoints at 2 and (final) 4: small enough for several subprocess runs.
TINY = {
    "steps": 4,
    "batch_size": 4,
    "num_inference_steps": 5,
    "eval_samples_per_prompt": 2,
    "sample_every": 0,
    "checkpoint_every": 2,
    "progress": False,
    "method_args": {"jk_sampling": "uniform"},
}


def cli(args: list[str], env: dict[str, str] | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flowbp", *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )


def set_args(cfg: dict) -> list[str]:
    out: list[str] = []
    for k, v in cfg.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    out = {f"lora/{k}": v for k, v in load_file(str(run / "lora/pytorch_lora_weights.safetensors")).items()}
    final = list_checkpoints(run)[-1]
    out.update({f"ckpt/{k}": v for k, v in load_file(str(final / "trainable.safetensors")).items()})
    out.update({f"ema/{k}": v for k, v in load_file(str(final / "ema.safetensors")).items()})
    return out


def assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=atol, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    train(load_config(None, {**TINY, "output_dir": str(out)}))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "point,resumes_from",
    [
        ("mid-step@1", None),  # before the first checkpoint: starts over from step 0
        ("mid-step@3", "step-000002"),  # mid-step after a checkpoint
        ("checkpoint-write@4", "step-000002"),  # mid-write of the final checkpoint
        ("final-eval@4", "step-000004"),  # during the final evaluation
        ("end-files@4", "step-000004"),  # between history.json and summary.json
    ],
)
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_weights(
    tmp_path: Path, reference: Path, capsys, point: str, resumes_from: str | None
) -> None:
    run = tmp_path / "run"
    proc = cli(["train", "--output-dir", str(run), *set_args(TINY)], env={"FLOWBP_TEST_KILL": point})
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])
    assert not (run / "summary.json").exists()
    # never a half-written checkpoint: every completed directory verifies against its manifest
    for ckpt in list_checkpoints(run):
        verify_checkpoint(ckpt)
    assert (list_checkpoints(run)[-1].name if list_checkpoints(run) else None) == resumes_from
    if point.startswith("checkpoint-write"):
        assert [p.name for p in (run / "checkpoints").glob(".tmp-*")], "the interrupted write left its temporary"
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    if resumes_from is None:
        assert "no checkpoint yet" in err and "starting it over from step 0" in err
    else:
        assert f"from {resumes_from}" in err
    assert not list((run / "checkpoints").glob(".*"))  # temporaries cleaned
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert [h["step"] for h in json.loads((run / "history.json").read_text())] == [1, 2, 3, 4]
    # TensorBoard: each step once (what the killed run logged after its checkpoint is purged on resume)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert_same_weights(run, reference)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_finishes_with_the_same_weights(tmp_path: Path, reference: Path) -> None:
    run = tmp_path / "run"
    cfg = {**TINY, "checkpoint_every": 0}  # the only mid-run checkpoint is the one SIGTERM writes
    proc = cli(["train", "--output-dir", str(run), *set_args(cfg)], env={"FLOWBP_TEST_SIGTERM_AT": "3"})
    assert proc.returncode == 128 + 15, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "stopped by SIGTERM after step 3 of 4" in last and f"flowbp train --resume {run}" in last
    assert [p.name for p in list_checkpoints(run)] == ["step-000003"]
    # the resumed config differs only in checkpoint_every from the reference run: compare weights
    assert train(resume=run) is not None
    assert_same_weights(run, reference)


def test_ctrl_c_finishes_the_step_checkpoints_and_resume_matches(
    tmp_path: Path, reference: Path, monkeypatch, capsys
) -> None:
    """SIGINT (Ctrl-C) in-process: same handler as SIGTERM, exit code 130, one line, resumable."""
    monkeypatch.setenv("FLOWBP_TEST_SIGTERM_AT", "3:SIGINT")
    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), *set_args({**TINY, "checkpoint_every": 0})]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert any("SIGINT received; finishing the current step" in line for line in err)
    assert "stopped by SIGINT after step 3 of 4" in err[-1] and f"flowbp train --resume {run}" in err[-1]
    assert [p.name for p in list_checkpoints(run)] == ["step-000003"]
    monkeypatch.delenv("FLOWBP_TEST_SIGTERM_AT")
    assert train(resume=run) is not None
    assert_same_weights(run, reference)


def test_nan_reward_steps_are_skipped_counted_and_weights_stay_finite(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FLOWBP_TEST_NAN_STEPS", "2,3")
    run = tmp_path / "run"
    cfg = {**TINY, "steps": 5, "checkpoint_every": 1, "checkpoint_keep_last": 0}
    summary = train(load_config(None, {**cfg, "output_dir": str(run)}))
    assert summary is not None and summary["skipped_steps"] == 2
    history = json.loads((run / "history.json").read_text())
    assert [h["skipped"] for h in history] == [False, True, True, False, False]
    assert history[1]["reward"] is None and history[1]["loss"] is None
    # a skipped step changes nothing: weights, EMA and AdamW moments after step 3 equal those after step 1
    for name in ("trainable", "ema", "optimizer"):
        one = load_file(str(run / f"checkpoints/step-000001/{name}.safetensors"))
        three = load_file(str(run / f"checkpoints/step-000003/{name}.safetensors"))
        assert all(torch.equal(one[k], three[k]) for k in one), name
        four = load_file(str(run / f"checkpoints/step-000004/{name}.safetensors"))
        assert any(not torch.equal(three[k], four[k]) for k in three), name  # and training goes on
    assert all(torch.isfinite(v).all() for v in weights(run).values())


def test_too_many_consecutive_non_finite_steps_stop_with_a_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("FLOWBP_TEST_NAN_STEPS", "2,3,4")
    run = tmp_path / "run"
    cfg = {**TINY, "steps": 6, "checkpoint_every": 0, "max_consecutive_skips": 2}
    assert main(["train", "--output-dir", str(run), *set_args(cfg)]) == 3
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("flowbp train: evaluation before training")]
    assert len(errors) == 1 and "training stopped at step 3: 2 consecutive steps had a non-finite" in errors[0]
    assert [p.name for p in list_checkpoints(run)] == ["step-000003"]
    assert not (run / "summary.json").exists()


def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    """k = 2 micro-batches of 2 give the update of one batch of 4 (same noise, same plan per step)."""
    cfg = {**TINY, "steps": 2, "checkpoint_every": 0, "method": "flowbp-sparse", "method_args": {}}
    one, acc = tmp_path / "one", tmp_path / "acc"
    train(load_config(None, {**cfg, "output_dir": str(one)}))
    train(load_config(None, {**cfg, "gradient_accumulation_steps": 2, "output_dir": str(acc)}))
    h1, h2 = (json.loads((r / "history.json").read_text()) for r in (one, acc))
    # the default tracker (accelerate's TensorBoard) got the scalars and the sample grids as images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(one / "tensorboard"))
    events.Reload()
    assert {"samples/step", "samples/final"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    # plans are drawn once per optimizer step (not per micro-batch): the same plans in both runs
    assert [h["plan_digests"] for h in h1] == [h["plan_digests"] for h in h2]
    assert len(h2) == 2
    for a, b in zip(h1, h2, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # Float tolerance: summing 2 + 2 samples rounds differently from 4, and AdamW divides by sqrt(v),
    # so a near-zero gradient component can move by a visible fraction of one step (lr = 1e-3): the
    # largest difference measured is 3.4e-6; 1e-5 is 1 % of one step.
    assert_same_weights(one, acc, atol=1e-5)
    # and it is not vacuous: a different global batch gives weights 100× further apart
    other = tmp_path / "other"
    train(load_config(None, {**cfg, "batch_size": 2, "output_dir": str(other)}))
    w_one, w_other = weights(one), weights(other)
    assert max(float((w_one[k] - w_other[k]).abs().max()) for k in w_one) > 1e-3


def test_lr_schedule_with_warmup_from_diffusers(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = {**TINY, "steps": 3, "checkpoint_every": 0, "lr_scheduler": "linear", "lr_warmup_steps": 2}
    train(load_config(None, {**cfg, "output_dir": str(run)}))
    lrs = [h["lr"] for h in json.loads((run / "history.json").read_text())]
    # the LR each step used: diffusers' linear warm-up over 2 steps (0, lr/2), then decay from lr
    assert lrs == pytest.approx([0.0, 0.5e-3, 1e-3])
    constant = tmp_path / "constant"
    train(load_config(None, {**cfg, "lr_scheduler": "constant", "lr_warmup_steps": 0, "output_dir": str(constant)}))
    assert [h["lr"] for h in json.loads((constant / "history.json").read_text())] == [1e-3] * 3
