"""scikit-learn's bundled 8×8 digits as the data of the embedded testbed, with fixed splits.

The 1,797 images ship inside scikit-learn, so nothing is downloaded. They are upsampled to
16×16 (bilinear) so that a patch-2 transformer sees an 8×8 token grid, the smallest layout in
which attention over image tokens is meaningful.

Splits (a fixed permutation, independent of any training seed, so every component agrees):

- ``test``    300 images: never trained on; reference set of the held-out metrics.
- ``reward``  ~750 images: trains the reward classifier.
- ``heldout`` ~750 images: trains the independent held-out classifier.
- ``train``   ``reward`` ∪ ``heldout``: trains the flow model (the generative prior may see all
  non-test data; what must stay disjoint is the data of the two judges).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

#: Side length of the images the testbed works with (8×8 digits upsampled ×2).
IMAGE_SIZE = 16
NUM_CLASSES = 10
#: Seed of the split permutation. Changing it changes every shipped asset's meaning.
SPLIT_SEED = 20240607
TEST_SIZE = 300

Split = Literal["train", "reward", "heldout", "test", "all"]
SPLITS: tuple[str, ...] = ("train", "reward", "heldout", "test", "all")


def _load_all() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    # sklearn pixels are integers 0..16 (ink = high); scale to [0, 1] float32.
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)  # B×1×8×8
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images.clamp(0.0, 1.0), torch.from_numpy(data.target.astype(np.int64))


def load_digits_split(split: Split = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: images B×1×16×16 float32 in [0, 1] (1 = ink), labels B int64."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; choose one of {', '.join(SPLITS)}")
    images, labels = _load_all()
    if split == "all":
        return images, labels
    perm = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(labels)))
    test, rest = perm[:TEST_SIZE], perm[TEST_SIZE:]
    half = len(rest) // 2
    index = {"test": test, "reward": rest[:half], "heldout": rest[half:], "train": rest}[split]
    return images[index], labels[index]


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """B×1×H×W in [0, 1] -> B×3×H×W (the layout every reward receives)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def to_gray16(images: torch.Tensor) -> torch.Tensor:
    """Reward-side preprocessing, differentiable: B×C×H×W in [0, 1] -> B×1×16×16 in [0, 1].

    Channels are averaged (the testbed is grayscale; a colour image is judged by its luminance
    proxy) and other resolutions are resized with area interpolation, which is differentiable
    and anti-aliased.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images B×C×H×W, got shape {tuple(images.shape)}")
    gray = images.mean(dim=1, keepdim=True)
    if gray.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        gray = F.interpolate(gray, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return gray
