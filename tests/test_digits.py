"""The embedded digits testbed: backbone, shipped weights, rewards, held-out metrics, pretrain CLI.

Kept fast (small batches, one shared backbone) so the whole file runs in well under 90 s on two
CPU cores. The rollout here is a plain Euler loop on purpose: it checks the backbone against the
flow-matching convention directly, independent of the core engine.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowbp.backbones import available_backbones, load_backbone
from flowbp.backbones.base import Backbone
from flowbp.backbones.digits import PROMPTS, DigitsBackbone, parse_prompt
from flowbp.rewards import load_reward
from flowbp.rewards.digits import DIGIT_REWARDS
from flowbp.testbed.data import load_digits_split, to_rgb
from flowbp.testbed.heldout_metrics import diversity, frechet_distance, heldout_accuracy
from flowbp.trajectory import training_sigmas


@pytest.fixture(scope="module")
def backbone() -> DigitsBackbone:
    return DigitsBackbone.from_pretrained()


@pytest.fixture(scope="module")
def real_test() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits_split("test")
    return to_rgb(images), labels


def euler_rollout(backbone: DigitsBackbone, prompts: list[str], steps: int, g: float | None, seed: int):
    cond = backbone.encode_prompts(prompts)
    velocity = backbone.velocity_fn(cond, g)
    x = backbone.initial_noise(len(prompts), torch.Generator().manual_seed(seed))
    sig = backbone.sigmas(steps)
    with torch.no_grad():
        for i in range(steps):
            x = x + float(sig[i + 1] - sig[i]) * velocity(x, float(sig[i]))
    return backbone.decode(x)


def test_protocol_and_registry(backbone: DigitsBackbone) -> None:
    assert isinstance(backbone, Backbone)
    assert {"digits", "sd3"} <= set(available_backbones())
    assert isinstance(load_backbone("digits"), DigitsBackbone)
    with pytest.raises(ValueError, match=r"unknown backbone 'sd9'.*digits"):
        load_backbone("sd9")
    n_params = sum(p.numel() for p in backbone.transformer.parameters())
    assert 100_000 < n_params < 1_000_000


def test_decode_shapes_ranges_and_gradient(backbone: DigitsBackbone) -> None:
    latents = (torch.randn(4, 1, 16, 16) * 2).requires_grad_(True)
    images = backbone.decode(latents)
    assert images.shape == (4, 3, 16, 16)
    assert images.min() >= 0 and images.max() <= 1
    images.sum().backward()
    inside = latents.detach().abs() < 1
    # d(image)/d(latent) = 1/2 per channel, 3 channels; zero where clamped.
    assert torch.allclose(latents.grad[inside], torch.full_like(latents.grad[inside], 1.5))
    assert (latents.grad[~inside] == 0).all()


def test_sigma_grid_is_the_papers_and_matches_diffusers(backbone: DigitsBackbone) -> None:
    for n in (1, 10, 25):
        sig = backbone.sigmas(n)
        assert sig.dtype == torch.float64 and sig.shape == (n + 1,)
        assert sig[0] == 1.0 and sig[-1] == 0.0 and (sig[1:] < sig[:-1]).all()
        # The last step starts at shift(1/N) = 1/N for the shipped shift 1, not at diffusers' default 0.001.
        assert backbone.shift == 1.0 and sig[-2].item() == pytest.approx(1.0 / n, abs=1e-12)
        ref = FlowMatchEulerDiscreteScheduler(shift=backbone.shift)
        ref.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n))
        assert torch.allclose(sig, ref.sigmas.double(), atol=1e-6)
    # SD3.5's shift 3 at N = 25: the last non-zero node is 3·0.04 / (1 + 2·0.04) = 0.1111.
    sd3 = training_sigmas(25, 3.0)
    assert sd3[-2].item() == pytest.approx(0.12 / 1.08, abs=1e-12) and sd3[-1] == 0.0
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1.0 / 25, 25))
    assert torch.allclose(sd3, ref.sigmas.double(), atol=1e-6)
    noise = backbone.initial_noise(3, torch.Generator().manual_seed(0))
    assert noise.shape == (3, 1, 16, 16)
    assert torch.equal(noise, backbone.initial_noise(3, torch.Generator().manual_seed(0)))


def test_cfg_combines_cond_and_uncond(backbone: DigitsBackbone) -> None:
    prompts = ["digit 3", "digit 8"]
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    v_c = backbone.velocity_fn(backbone.encode_prompts(prompts), 1.0)(x, 0.6)
    v_u = backbone.velocity_fn(backbone.encode_prompts(["", ""]), 1.0)(x, 0.6)
    v_g = backbone.velocity_fn(backbone.encode_prompts(prompts), 3.0)(x, 0.6)
    assert torch.allclose(v_g, v_u + 3.0 * (v_c - v_u), atol=1e-5)
    default = backbone.velocity_fn(backbone.encode_prompts(prompts))(x, 0.6)
    g0 = backbone.default_guidance_scale
    assert torch.allclose(default, v_u + g0 * (v_c - v_u), atol=1e-5)
    # One encoded prompt drives a whole batch.
    one = backbone.velocity_fn(backbone.encode_prompts(["digit 3"]), 3.0)(x, 0.6)
    assert torch.allclose(one[0], v_g[0], atol=1e-5)

    # detach_uncond: same value, gradient only through the conditional branch (g · J_c).
    xg = x.clone().requires_grad_(True)
    cond = backbone.encode_prompts(prompts)
    v_det = backbone.velocity_fn(cond, 3.0, detach_uncond=True)(xg, 0.6)
    assert torch.equal(v_det, v_g.detach()) or torch.allclose(v_det, v_g, atol=1e-6)
    (grad_det,) = torch.autograd.grad(v_det.sum(), xg)
    xc = x.clone().requires_grad_(True)
    (grad_c,) = torch.autograd.grad(backbone.velocity_fn(cond, 1.0)(xc, 0.6).sum(), xc)
    assert torch.allclose(grad_det, 3.0 * grad_c, atol=1e-4)


def test_bad_prompt_is_a_clear_error(backbone: DigitsBackbone) -> None:
    assert parse_prompt("digit 7") == 7 and parse_prompt(" digit 0 ") == 0 and parse_prompt("") == 10
    for bad in ("a cat", "digit 10", "Digit 7", "7"):
        with pytest.raises(ValueError, match=r"unknown prompt .*'digit 0' … 'digit 9'"):
            backbone.encode_prompts([bad])
    with pytest.raises(ValueError, match="'a photo of a dog'"):
        load_reward("digit-alignment")(torch.rand(1, 3, 16, 16), ["a photo of a dog"])


def test_lora_save_load_round_trip(backbone: DigitsBackbone, tmp_path) -> None:
    model = DigitsBackbone.from_pretrained()
    model.add_lora(rank=4, alpha=8)
    trainable = model.trainable_parameters()
    assert trainable and all("lora" in n for n, p in model.transformer.named_parameters() if p.requires_grad)
    with torch.no_grad():  # make the adapter non-trivial (B is zero-initialised)
        gen = torch.Generator().manual_seed(0)
        for p in trainable:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    x = torch.randn(2, 1, 16, 16, generator=gen)
    cond = model.encode_prompts(["digit 1", "digit 2"])
    with torch.no_grad():
        v_lora = model.velocity_fn(cond, 2.0)(x, 0.5)
        v_base = backbone.velocity_fn(cond, 2.0)(x, 0.5)
    assert not torch.allclose(v_lora, v_base, atol=1e-4)
    model.save_lora(tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()

    fresh = DigitsBackbone.from_pretrained()
    fresh.load_lora(tmp_path)
    with torch.no_grad():
        v_loaded = fresh.velocity_fn(cond, 2.0)(x, 0.5)
    assert torch.allclose(v_loaded, v_lora, atol=1e-6)  # alpha restored from the saved metadata
    fresh.load_lora(tmp_path / "pytorch_lora_weights.safetensors")  # a file path; replaces the adapter
    with torch.no_grad():
        assert torch.allclose(fresh.velocity_fn(cond, 2.0)(x, 0.5), v_lora, atol=1e-6)


def test_base_samples_are_recognised_by_the_heldout_classifier(backbone: DigitsBackbone) -> None:
    prompts = [p for p in PROMPTS for _ in range(10)]
    images = euler_rollout(backbone, prompts, steps=25, g=None, seed=0)
    assert images.shape == (100, 3, 16, 16)
    acc = heldout_accuracy(images, prompts)
    assert acc >= 0.90, f"base model held-out accuracy {acc:.2f} < 0.90"
    # The shipped sampler is this same loop.
    same = backbone.sample(prompts[:4], 25, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(same, images[:4], atol=1e-6)


def test_rewards_are_differentiable_and_alignment_prefers_the_right_prompt(real_test) -> None:
    images, labels = real_test
    images, labels = images[:20], labels[:20]
    right = [f"digit {int(c)}" for c in labels]
    wrong = [f"digit {(int(c) + 1) % 10}" for c in labels]
    for name in sorted(DIGIT_REWARDS):  # the real reward models need weights: tests/test_rewards_*.py
        reward = load_reward(name)
        assert all(not p.requires_grad for p in reward.parameters())
        x = images.clone().requires_grad_(True)
        r = reward(x, right)
        assert r.shape == (20,) and torch.isfinite(r).all()
        r.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, name
    align = load_reward("digit-alignment")
    with torch.no_grad():
        r_right, r_wrong = align(images, right), align(images, wrong)
    assert (r_right > r_wrong).float().mean() >= 0.95
    assert r_right.mean() > -0.5 > r_wrong.mean()


def test_reward_spec_combines_and_validates(real_test) -> None:
    images = real_test[0][:6]
    prompts = ["digit 0"] * 6
    combo = load_reward("digit-alignment+0.5*digit-contrast")
    expected = load_reward("digit-alignment")(images, prompts) + 0.5 * load_reward("digit-contrast")(images, prompts)
    assert torch.allclose(combo(images, prompts), expected, atol=1e-6)
    assert torch.allclose(load_reward({"digit-ink": 2.0})(images, prompts), 2 * images.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match=r"unknown reward.*known rewards: .*digit-alignment, digit-contrast"):
        load_reward("hpsv9")


def test_style_reward_has_headroom_and_is_hackable(real_test) -> None:
    images = real_test[0][:50]
    contrast = load_reward("digit-contrast")
    base = contrast(images, ["digit 0"] * 50).mean()
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).float().expand(1, 3, 16, 16)
    assert base < 0.1 and contrast(checker, ["digit 0"]).item() == pytest.approx(1.0)
    assert heldout_accuracy(checker.expand(10, 3, 16, 16), list(PROMPTS)) <= 0.2  # max reward is no digit


def test_heldout_metrics_sanity(real_test) -> None:
    test_images, test_labels = real_test
    reward_images, _ = load_digits_split("reward")
    reward_images = to_rgb(reward_images[:300])
    assert heldout_accuracy(test_images, test_labels) >= 0.95
    fd_real = frechet_distance(reward_images, test_images)
    noise = torch.rand(300, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fd_noise = frechet_distance(noise, test_images)
    assert fd_real < 0.1 * fd_noise, (fd_real, fd_noise)
    assert frechet_distance(test_images, test_images) < 1e-6
    div = diversity(test_images, test_labels)
    assert 0.1 < div < 1.0
    assert diversity(test_images[:1].expand(5, 3, 16, 16), ["digit 0"] * 5) == pytest.approx(0.0, abs=1e-6)


def test_pretrain_command_and_flow_pretraining_round_trip(tmp_path) -> None:
    from flowbp.commands.pretrain import register
    from flowbp.testbed.pretrain import pretrain_flow

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pretrain", "digits", "--out", str(tmp_path), "--seed", "3", "--steps", "7"])
    assert (args.target, args.out, args.seed, args.steps) == ("digits", str(tmp_path), 3, 7)
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "cifar"])

    trained = pretrain_flow(tmp_path, seed=0, steps=2, batch_size=8, progress=False)
    loaded = DigitsBackbone.from_pretrained(tmp_path)
    x = torch.randn(2, 1, 16, 16)
    cond = loaded.encode_prompts(["digit 5", "digit 6"])
    with torch.no_grad():
        v1 = trained.velocity_fn(trained.encode_prompts(["digit 5", "digit 6"]))(x, 0.3)
        v2 = loaded.velocity_fn(cond)(x, 0.3)
    assert torch.allclose(v1, v2, atol=1e-6)
