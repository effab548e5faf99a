"""Differentiable rewards of the digits testbed.

Every reward is an ``nn.Module`` with frozen parameters, called as
``reward(images, prompts) -> Tensor[B]`` with images B×3×H×W in [0, 1] (any H×W: they are
brought to 16×16 grayscale differentiably), and differentiable with respect to the images.

- ``digit-alignment``: log p(prompted class | image) under the reward classifier (shipped
  weights). Like an in-domain text-image alignment score; a good base model is already near its
  maximum 0, so alone it has little headroom.
- ``digit-contrast``: stroke contrast / edge energy, the mean squared difference between
  neighbouring pixels, normalised to [0, 1] (1 = a 0/1 checkerboard). A preference-style
  reward in the spirit of aesthetic / sharpness scores: the smooth upsampled digits of the base
  model score LOW (≈ 0.02), sharper and bolder strokes score higher, and the maximum is reached
  by high-frequency texture that is no digit at all — so pursuing it alone destroys held-out
  accuracy, while mixing it with alignment gives a trade-off (a Pareto front).
- ``digit-ink``: mean ink coverage in [0, 1] (the blunt brightness reward: hacked fastest,
  kept as the degenerate baseline).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from flowbp.backbones.digits import ASSETS_DIR, prompt_labels
from flowbp.testbed.data import to_gray16

REWARD_CLASSIFIER = "digits_reward_classifier"


class DigitClassifier(nn.Module):
    """The reward classifier: a small 3×3 CNN with SiLU (smooth, so reward gradients are smooth).

    Input B×1×16×16 in [0, 1]; output 10 logits. ~90 k parameters.
    """

    def __init__(self, width: int = 16, feature_dim: int = 64) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),  # 8×8
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),  # 4×4
            nn.Flatten(),
            nn.Linear(4 * w * 16, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2 - 1)  # centre the input like the flow model's latents

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(cls: type[nn.Module], stem: str, path: str | Path | None = None) -> nn.Module:
    """Load ``<stem>.safetensors`` + ``<stem>.json`` (constructor kwargs) from ``path`` or the assets."""
    directory = ASSETS_DIR if path is None else Path(path)
    weights, config = directory / f"{stem}.safetensors", directory / f"{stem}.json"
    if not weights.is_file():
        raise FileNotFoundError(f"missing {weights}; create it with `flowbp pretrain digits --out DIR`")
    kwargs = json.loads(config.read_text()).get("model", {}) if config.is_file() else {}
    model = cls(**kwargs)
    model.load_state_dict(load_file(str(weights)))
    return model.eval().requires_grad_(False)


class _FrozenReward(nn.Module):
    """Base: frozen parameters, eval mode forever (train() on a parent must not enable dropout)."""

    def train(self, mode: bool = True) -> _FrozenReward:
        return super().train(False)


class DigitAlignmentReward(_FrozenReward):
    """``digit-alignment``: log-probability of the prompted class under the reward classifier."""

    def __init__(self, path: str | Path | None = None, classifier: nn.Module | None = None) -> None:
        super().__init__()
        self.classifier = classifier if classifier is not None else load_classifier(
            DigitClassifier, REWARD_CLASSIFIER, path
        )
        self.classifier.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        labels = prompt_labels(prompts).to(images.device)
        logits = self.classifier(to_gray16(images).to(next(self.classifier.parameters()).dtype))
        return logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1).to(images.dtype)


class DigitContrastReward(_FrozenReward):
    """``digit-contrast``: edge energy (mean squared neighbour difference), in [0, 1].

    r = (mean (x[:, :, 1:] − x[:, :, :-1])² + mean (x[1:, :] − x[:-1, :])²) / 2 on the 16×16
    grayscale image. Prompt-independent. Real upsampled digits score ≈ 0.02; a 0/1
    checkerboard scores 1.
    """

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        x = to_gray16(images)
        dx = (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean(dim=(1, 2, 3))
        dy = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean(dim=(1, 2, 3))
        return (dx + dy) / 2


class DigitInkReward(_FrozenReward):
    """``digit-ink``: mean ink coverage in [0, 1] (real digits ≈ 0.31; an all-white image scores 1)."""

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return to_gray16(images).mean(dim=(1, 2, 3))


class CombinedReward(_FrozenReward):
    """Weighted sum ``Σ_k w_k r_k(images, prompts)`` of named rewards; ``parts`` exposes each term."""

    def __init__(self, rewards: dict[str, nn.Module], weights: dict[str, float]) -> None:
        super().__init__()
        if set(rewards) != set(weights):
            raise ValueError(f"rewards {sorted(rewards)} and weights {sorted(weights)} differ")
        self.rewards = nn.ModuleDict({_key(k): v for k, v in rewards.items()})
        self.names = list(rewards)
        self.weights = dict(weights)

    def parts(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {name: self.rewards[_key(name)](images, prompts) for name in self.names}

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        parts = self.parts(images, prompts)
        return sum(self.weights[n] * parts[n] for n in self.names)  # type: ignore[return-value]


def _key(name: str) -> str:
    # ModuleDict keys may not contain '.'; reward names use '-' which is fine.
    return name.replace(".", "_")


def combine(rewards: dict[str, nn.Module], weights: dict[str, float] | None = None) -> CombinedReward:
    """Weighted sum of named rewards (weights default to 1 each)."""
    return CombinedReward(rewards, {k: 1.0 for k in rewards} if weights is None else weights)


#: Name -> constructor(**kwargs). Kwargs: ``path`` (assets directory) for classifier rewards.
DIGIT_REWARDS: dict[str, Any] = {
    "digit-alignment": lambda path=None, **_: DigitAlignmentReward(path),
    "digit-contrast": lambda **_: DigitContrastReward(),
    "digit-ink": lambda **_: DigitInkReward(),
}
