"""HPSv3 on a tiny random model in the official layout (tests/hpsv3_tiny.py).

Parity is against the official package itself (PyPI hpsv3 1.0.0 with its pinned transformers 4.45.2,
run in a separate environment by tests/hpsv3_official.py; skipped where that environment is absent),
and always against transformers' own Qwen2-VL image processor (patch layout) and finite differences
(the gradient reaches the pixels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hpsv3_tiny import build_tiny_hpsv3
from PIL import Image
from rewards_tiny import assert_pixel_gradient_matches_finite_differences, smooth_images

from flowbp.rewards import load_reward
from flowbp.rewards.hpsv3 import HPSv3Reward, patchify, smart_resize
from flowbp.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, normalize
from flowbp.rewards.weights import RewardWeightsError

OFFICIAL_ENV = Path(os.environ.get("FLOWBP_HPSV3_ENV", "/work/venv-hpsv3"))
PROMPTS = ["a red cube", "two cats on a long sofa", "x", "a bowl of fruit on a wooden table"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_hpsv3(tmp_path_factory.mktemp("hpsv3"))


@pytest.fixture(scope="module")
def reward(tiny) -> HPSv3Reward:
    return load_reward("hpsv3", path=tiny)


def _uint8_images(n: int, size: int, seed: int) -> torch.Tensor:
    return (smooth_images(n, size, size, seed=seed) * 255).round() / 255  # exactly what a PNG holds


def _save(images: torch.Tensor, folder: Path, stem: str) -> list[str]:
    files = []
    for k, img in enumerate(images):
        f = folder / f"{stem}{k}.png"
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(f)
        files.append(str(f))
    return files


@pytest.mark.skipif(not (OFFICIAL_ENV / "hpsv3").is_dir(), reason=f"official hpsv3 environment {OFFICIAL_ENV} absent")
def test_score_equals_the_official_package(tiny, reward, tmp_path):
    """One batch through HPSv3RewardInferencer (4.45.2) vs flowbp (transformers 5) on the same files.

    448×448 images need no resize: μ and σ agree to float error and the token ids are identical (chat
    template, INSTRUCTION, 256 image tokens, right padding). 512×512 images are resized by PIL in uint8
    there and in float here: measured max |Δμ| 0.0100 against a spread (std) of 0.290 over the 4 images
    (3.4 %) for this deliberately pixel-sensitive random model; the bound is 8 % of the spread. (448²: 6e-7.)
    """
    exact, resized = _uint8_images(4, 448, seed=1), _uint8_images(4, 512, seed=5)
    files = _save(exact, tmp_path, "e") + _save(resized, tmp_path, "r")
    prompts = PROMPTS + PROMPTS
    out = tmp_path / "official.json"
    args = [a for pair in zip(files, prompts, strict=True) for a in pair]
    env = {**os.environ, "PYTHONPATH": str(OFFICIAL_ENV)}
    script = Path(__file__).with_name("hpsv3_official.py")
    proc = subprocess.run([sys.executable, str(script), str(tiny), str(out), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    official = json.loads(out.read_text())
    tok = reward.tokens(PROMPTS, 256, torch.device("cpu"))
    assert tok["input_ids"].tolist() == official["input_ids"][:4]  # same length: 448² and 512² both give 32×32 patches
    assert official["image_grid_thw"] == [[1, 32, 32]] * 8
    with torch.no_grad():
        ours_exact = reward.outputs(exact, PROMPTS)
        ours_resized = reward(resized, PROMPTS)
    mu, sigma = torch.tensor(official["mu"]), torch.tensor(official["sigma"])
    torch.testing.assert_close(ours_exact[:, 0], mu[:4], atol=2e-5, rtol=0)
    torch.testing.assert_close(ours_exact[:, 1], sigma[:4], atol=2e-5, rtol=0)
    assert (ours_resized - mu[4:]).abs().max() <= 0.08 * mu[4:].std(), (ours_resized, mu[4:])


def test_patch_layout_matches_transformers_qwen2vl_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = _uint8_images(2, 448, seed=2)
    processor = Qwen2VLImageProcessorPil(min_pixels=256 * 28 * 28, max_pixels=256 * 28 * 28)
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    theirs = processor(images=pil, return_tensors="pt")
    ours = patchify(normalize(images, OPENAI_MEAN, OPENAI_STD))
    assert theirs["image_grid_thw"].tolist() == [[1, 32, 32]] * 2
    torch.testing.assert_close(ours, theirs["pixel_values"], atol=1e-5, rtol=0)


def test_smart_resize_follows_the_official_rounding():
    assert smart_resize(1024, 1024) == (448, 448)  # 37·28 squared is too many pixels -> floor after scaling
    assert smart_resize(512, 512) == (448, 448)
    assert smart_resize(768, 1344) == (336, 588)  # 12×21 patches of 28: 197568 ≤ 200704
    assert smart_resize(100, 100) == (448, 448)  # too few -> ceil after scaling up


def test_gradient_reaches_the_pixels(reward):
    images = _uint8_images(2, 448, seed=3).requires_grad_(True)
    reward(images, PROMPTS[:2]).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


def test_pixel_gradient_matches_finite_differences(tiny, monkeypatch):
    """Autograd's directional derivative of μ equals a central difference, in float64 (rewards_tiny's check).

    Qwen2-VL's RMSNorm and vision rotary embedding cast to float32 whatever the input dtype, which would leave
    float32 rounding in a float64 model; for this check they compute in the input dtype (same formulas).
    """
    from transformers.models.qwen2_vl import modeling_qwen2_vl as m

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary_vision(q, k, cos, sin):
        cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
        return q * cos + m.rotate_half(q) * sin, k * cos + m.rotate_half(k) * sin

    monkeypatch.setattr(m.Qwen2VLRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(m, "apply_rotary_pos_emb_vision", rotary_vision)
    reward = load_reward("hpsv3", path=tiny).double()
    assert_pixel_gradient_matches_finite_differences(reward, _uint8_images(1, 448, seed=4), PROMPTS[:1], 0)


def test_scores_do_not_depend_on_the_batch(reward):
    images = _uint8_images(3, 448, seed=6)
    with torch.no_grad():
        batch = reward(images, PROMPTS[:3])  # padded to the longest prompt
        alone = torch.cat([reward(images[k : k + 1], PROMPTS[k : k + 1]) for k in range(3)])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)


def test_missing_and_mismatched_files_are_one_line(tiny, tmp_path):
    with pytest.raises(RewardWeightsError, match=r"hpsv3: .*nope does not exist; expected HPSv3\.safetensors"):
        load_reward("hpsv3", path=tmp_path / "nope")
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "HPSv3.safetensors").symlink_to(tiny / "HPSv3.safetensors")
    with pytest.raises(RewardWeightsError) as info:
        load_reward("hpsv3", path=alone)
    assert "no Qwen2-VL base files" in str(info.value) and "\n" not in str(info.value)
    pt = tmp_path / "HPSv3_7B.pth"
    pt.write_bytes(b"x")
    with pytest.raises(RewardWeightsError, match="convert it once with `flowbp convert-reward hpsv3"):
        load_reward("hpsv3", path=pt)


def test_convert_reward_hpsv3_from_a_pth(tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    from flowbp.cli import main

    sd = load_file(str(tiny / "HPSv3.safetensors"))
    src = tmp_path / "HPSv3_7B.pth"
    torch.save({"model": sd}, src)
    out = tmp_path / "converted"
    assert main(["convert-reward", "hpsv3", "--src", str(src), "--out", str(out)]) == 0
    converted = load_file(str(out / "HPSv3.safetensors"))
    assert converted.keys() == sd.keys() and all(torch.equal(converted[k], sd[k]) for k in sd)
    # with the base files next to it, the converted folder loads and scores as the original
    images = _uint8_images(1, 448, seed=7)
    a = load_reward("hpsv3", path=tiny)
    b = load_reward("hpsv3", path=out / "HPSv3.safetensors", base=tiny / "base")
    with torch.no_grad():
        torch.testing.assert_close(a(images, PROMPTS[:1]), b(images, PROMPTS[:1]))


def test_flowbp_eval_scores_hpsv3_and_config_accepts_it(tiny, reward, tmp_path):
    from flowbp.cli import main
    from flowbp.config import load_config

    images = _uint8_images(2, 448, seed=8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k, img in enumerate(images):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"p{k:04d}_s0.png")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    out = tmp_path / "run"
    assert main(["eval", "--images", str(folder), "--prompts", str(prompts), "--metrics", "hpsv3",
                 "--reward-path", f"hpsv3={tiny}", "--no-progress", "--out", str(out)]) == 0
    got = [json.loads(line)["scores"]["hpsv3"] for line in (out / "scores.jsonl").read_text().splitlines()]
    with torch.no_grad():
        direct = reward(images, PROMPTS[:2])
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), direct.double(), atol=1e-5, rtol=0)
    config = load_config(None, {"reward": "hpsv3", "reward_paths": {"hpsv3": str(tiny)}})
    assert config.reward == "hpsv3"
