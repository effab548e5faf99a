"""The training recipe end to end on the digits testbed: outputs, resume, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flowbp.cli import main
from flowbp.config import TrainConfig, load_config
from flowbp.train import train

TINY = {
    "steps": 4,
    "batch_size": 4,
    "num_inference_steps": 6,
    "eval_samples_per_prompt": 2,
    "sample_every": 2,
    "checkpoint_every": 2,
    "progress": False,
    "method_args": {"jk_sampling": "uniform"},
}


def test_train_writes_every_output(tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train(load_config(None, {**TINY, "output_dir": str(out)}))
    assert summary is not None and summary["steps"] == 4
    for name in (
        "config.yaml",
        "summary.json",
        "history.json",
        "reward_curve.png",
        "lora/pytorch_lora_weights.safetensors",
    ):
        assert (out / name).is_file(), name
    for tag in ("step-000000", "step-000002", "final"):
        grid = Image.open(out / "samples" / f"{tag}.png")
        assert grid.size[0] > 16 * 4 * 2 and grid.mode == "RGB"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert list((out / "tensorboard").iterdir())
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved) >= {"before", "after", "reward_improvement", "heldout_correct_change"}
    assert saved["reward_improvement"]["n"] == 20
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    # the saved LoRA loads back through `flowbp sample` and changes the samples
    base, tuned = tmp_path / "base.png", tmp_path / "tuned.png"
    common = ["sample", "--samples", "2", "--steps", "6", "--prompt", "digit 4"]
    assert main([*common, "--out", str(base)]) == 0
    assert main([*common, "--out", str(tuned), "--lora", str(out / "lora")]) == 0
    assert Image.open(base).tobytes() != Image.open(tuned).tobytes()
    # flowbp-lagrange: start + one interior support per segment (fewer when a segment is one step long)
    assert all(2 <= h["grad_forwards"] <= 4 for h in history)


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    cfg = {
        **TINY,
        "steps": 6,
        "checkpoint_every": 3,
        "sample_every": 0,
        "method": "flowbp-bridge",
        "method_args": {"num_active": 3},
    }
    full = tmp_path / "full"
    train(load_config(None, {**cfg, "output_dir": str(full)}))
    split = tmp_path / "split"
    assert train(load_config(None, {**cfg, "output_dir": str(split)}), stop_after=3) is None
    assert not (split / "summary.json").exists()
    summary = train(resume=split)
    assert summary is not None and summary["steps"] == 6
    for rel in (
        "checkpoints/step-000006/trainable.safetensors",
        "checkpoints/step-000006/ema.safetensors",
        "lora/pytorch_lora_weights.safetensors",
    ):
        a, b = load_file(str(full / rel)), load_file(str(split / rel))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (rel, key)
    with pytest.raises(ValueError, match=r"resume: .* has finished \(summary.json exists\)"):
        train(resume=split)
    with pytest.raises(ValueError, match=r"resume: .* is not a run directory"):
        train(resume=tmp_path)
    # and the run did move: the weights are not the initial LoRA (B = 0)
    trained = load_file(str(full / "checkpoints/step-000006/trainable.safetensors"))
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in trained.items())


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "lerning_rate=0.1"], "config: unknown key 'lerning_rate'; allowed: "),
        (["--set", "steps=many"], "config.steps: expected an integer, got 'many'"),
        (["--set", "learning_rate=-0.001"], "learning_rate: must be > 0, got -0.001"),
        (["--config", "/nonexistent/cfg.yaml"], "config: file not found: /nonexistent/cfg.yaml"),
        (["--set", "prompts_file=/nonexistent/prompts.txt"], "prompts_file: file or directory not found"),
        (
            ["--set", "method=flowbp-sparse", "--set", "method_args={num_active: 30}"],
            "method_args: num_active: K=30 is larger than the 25 nodes",
        ),
        (
            ["--set", "method=flowbp-bridge", "--set", "method_args={alpha: 2}"],
            "method_args: alpha: must be in [0, 1], got 2",
        ),
        (["--set", "method=sparse"], "method: unknown method 'sparse'; known methods: "),
        (["--set", "reward=digit-beauty"], "reward: unknown reward(s) ['digit-beauty']"),
        (["--set", "finetune=half"], "config.finetune: got 'half'; allowed: lora, full"),
        (["--set", "backbone_path=/"], "backbone_path: no digits flow model in /"),
    ],
)
def test_bad_config_is_one_clear_error_and_writes_nothing(tmp_path: Path, capsys, args, message: str) -> None:
    out = tmp_path / "never"
    assert main(["train", "--output-dir", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1  # one line, no traceback
    assert not out.exists()


def test_config_file_round_trip_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("method: leapalign\nsteps: 3\nmethod_args:\n  alpha: 0.5\n")
    cfg = load_config(cfg_file, {"batch_size": 2})
    assert (cfg.method, cfg.steps, cfg.method_args, cfg.batch_size) == ("leapalign", 3, {"alpha": 0.5}, 2)
    assert cfg == TrainConfig(method="leapalign", steps=3, method_args={"alpha": 0.5}, batch_size=2)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["train", "--output-dir", str(busy)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "mine" and len(list(busy.iterdir())) == 1


def test_exponents_without_a_dot_are_numbers(tmp_path: Path, capsys) -> None:
    # PyYAML (YAML 1.1) reads "1e-4" as a string; float keys must still take it, from a file and from --set.
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("learning_rate: 1e-4\nmethod: leapalign\nmethod_args:\n  alpha: 3E-1\n")
    cfg = load_config(cfg_file, {"adam_eps": "1e-9", "weight_decay": "+.5e1"})
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.adam_eps == 1e-9 and cfg.weight_decay == 5.0
    assert cfg.method_args == {"alpha": "3E-1"}  # kept as written; the method's own schema coerces it below
    from flowbp.methods import make_plan
    from flowbp.trajectory import training_sigmas

    plan = make_plan("leapalign", training_sigmas(25), 0, **cfg.method_args)
    assert plan.describe() == make_plan("leapalign", training_sigmas(25), 0, alpha=0.3).describe()
    for bad in ("1e-4x", "e-4", "1e", "abc"):
        assert main(["train", "--output-dir", str(tmp_path / "never"), "--set", f"learning_rate={bad}"]) == 2
        assert f"expected a number, got '{bad}'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_presets_load_and_default_preset_matches_builtin_defaults() -> None:
    default = load_config("digits-default")
    assert default == TrainConfig()
    hacking = load_config("digits-hacking")
    assert hacking.reward == "digit-contrast"
    with pytest.raises(
        ValueError,
        match=r"config: file not found: nope \(shipped presets: digits-coarse-leap, digits-default, digits-hacking",
    ):
        load_config("nope")
