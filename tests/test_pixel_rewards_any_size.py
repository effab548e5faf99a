"""The prompt-independent pixel rewards score images of any size, so real backbones smoke-test without weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flowbp.rewards import load_reward


@pytest.mark.parametrize("name", ["digit-contrast", "digit-ink"])
@pytest.mark.parametrize("size", [(32, 32), (48, 32), (64, 64), (20, 28)])
def test_pixel_reward_any_size(name: str, size: tuple[int, int]) -> None:
    reward = load_reward(name)
    small = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    # a 16×16 image blown up by an integer factor is the same picture: same score
    if size[0] % 16 == 0 and size[1] % 16 == 0:
        big = F.interpolate(small, size=size, mode="nearest")
        assert torch.allclose(reward(big, ["x", "y"]), reward(small, ["x", "y"]), atol=1e-6)
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    scores = reward(images, ["a prompt", "another"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert ((0 <= scores) & (scores <= 1)).all()
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
