"""Evaluation on a fixed prompt × seed set: the reward per sample and the backbone's held-out metrics.

The same noise is used before and after training, so differences are paired and their confidence
intervals are tight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from flowbp.trajectory import rollout

#: Held-out metrics per backbone: "module:function" with (images, prompts) -> (metrics, per-sample values).
#: Training never sees them.
HELDOUT_METRICS: dict[str, str] = {"digits": "flowbp.evaluate:digits_heldout"}


def digits_heldout(images: torch.Tensor, prompts: Sequence[str]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Independent-classifier accuracy, Fréchet distance to real digits, diversity; per-sample correctness."""
    from flowbp.backbones.digits import prompt_labels
    from flowbp.testbed.heldout_metrics import evaluate_images, heldout_logits

    correct = heldout_logits(images).argmax(1).cpu() == prompt_labels(prompts).cpu()
    return evaluate_images(images, prompts), {"heldout_correct": correct.double()}


@dataclass
class EvalResult:
    prompts: list[str]
    rewards: torch.Tensor  # (n,) the training reward per sample
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    per_sample: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. heldout correctness
    images: torch.Tensor | None = None

    def summary(self) -> dict[str, float]:
        out = {"reward": float(self.rewards.mean())}
        out.update({f"reward/{k}": float(v.mean()) for k, v in self.reward_parts.items()})
        out.update(self.metrics)
        return out


def _load(path: str) -> Callable:
    import importlib

    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@torch.no_grad()
def evaluate(
    backbone,
    reward: torch.nn.Module | None,
    prompts: Sequence[str],
    samples_per_prompt: int,
    num_steps: int,
    guidance_scale: float | None,
    seed: int,
    chunk: int = 128,
    heldout: bool = True,
) -> EvalResult:
    """Sample ``samples_per_prompt`` images per prompt from fixed seeds and score them.

    ``reward=None`` skips scoring (rewards are then empty) and ``heldout=False`` the held-out metrics:
    a sample grid needs neither.
    """
    all_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    gen = torch.Generator().manual_seed(seed)
    sigmas = backbone.sigmas(num_steps)
    images, rewards, parts = [], [], {}
    for start in range(0, len(all_prompts), chunk):
        batch = all_prompts[start : start + chunk]
        cond = backbone.encode_prompts(batch)
        noise = backbone.initial_noise(len(batch), gen)
        traj = rollout(backbone.velocity_fn(cond, guidance_scale), noise, sigmas)
        img = backbone.decode(traj.sample).float()
        images.append(img.cpu())
        if reward is None:
            continue
        rewards.append(reward(img, batch).float().cpu())
        if hasattr(reward, "parts"):
            for k, v in reward.parts(img, batch).items():
                parts.setdefault(k, []).append(v.float().cpu())
    result = EvalResult(
        prompts=all_prompts,
        rewards=torch.cat(rewards) if rewards else torch.empty(0),
        reward_parts={k: torch.cat(v) for k, v in parts.items()},
        images=torch.cat(images),
    )
    if heldout and backbone.name in HELDOUT_METRICS:
        result.metrics, result.per_sample = _load(HELDOUT_METRICS[backbone.name])(result.images, all_prompts)
    return result
