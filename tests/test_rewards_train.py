"""A real reward model trains the digits backbone end to end through the config's reward_paths."""

from __future__ import annotations

import json
import math

from rewards_tiny import clip_folder

from flowbp.config import load_config
from flowbp.train import train


def test_training_with_pickscore_from_reward_paths(tmp_path):
    folder = clip_folder(tmp_path / "pickscore")
    out = tmp_path / "run"
    config = load_config(None, {
        "reward": "pickscore", "reward_paths": {"pickscore": str(folder)}, "loss": "linear",
        "steps": 2, "batch_size": 2, "num_inference_steps": 4, "eval_samples_per_prompt": 2,
        "sample_every": 0, "checkpoint_every": 0, "progress": False, "output_dir": str(out),
        "method_args": {"jk_sampling": "uniform"},
    })
    summary = train(config)
    assert summary is not None and summary["steps"] == 2
    history = json.loads((out / "history.json").read_text())
    # the 16×16 digits go through the 224-pixel CLIP preprocessing and gradients reach the LoRA weights
    assert all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in history), history
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
