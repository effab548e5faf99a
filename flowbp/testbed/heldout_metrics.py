"""Held-out quality metrics of the digits testbed: what training never sees.

The judge is an *independent* classifier: a different architecture (5×5 convolutions, GELU,
max-pooling, dropout) from the reward classifier (3×3, SiLU, average pooling), a different
seed, and trained on a disjoint split of the real digits. A method that hacks the reward
classifier (adversarial texture, exaggerated strokes) does not automatically fool it.

All functions work on tensors: images B×3×H×W (or B×1×H×W) in [0, 1], any resolution (brought to
16×16 grayscale like the rewards do). Metrics return Python floats.

- :func:`heldout_accuracy` — fraction of images the held-out classifier assigns to the prompted class.
- :func:`frechet_distance` — FID-style Fréchet distance between Gaussians fitted to the held-out
  classifier's 64-d penultimate features of two image sets (e.g. samples vs the real ``test`` split).
- :func:`diversity` — mean pairwise RMS pixel distance between samples of the same prompt,
  averaged over prompts (collapse to one image per class -> 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from flowbp.backbones.digits import prompt_labels
from flowbp.rewards.digits import load_classifier
from flowbp.testbed.data import load_digits_split, to_gray16, to_rgb

HELDOUT_CLASSIFIER = "digits_heldout_classifier"


class HeldoutDigitClassifier(nn.Module):
    """The independent judge: LeNet-style 5×5 CNN, GELU, max-pool, dropout; 64-d features."""

    def __init__(self, width: int = 24, feature_dim: int = 64, dropout: float = 0.3) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 5, padding=2), nn.GELU(), nn.MaxPool2d(2),  # 8×8
            nn.Conv2d(w, 2 * w, 5, padding=2), nn.GELU(), nn.MaxPool2d(2),  # 4×4
            nn.Flatten(),
            nn.Linear(2 * w * 16, feature_dim), nn.GELU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # Standardise with the (approximate) mean/std of the real digits rather than ±1 scaling,
        # one more difference from the reward classifier.
        return self.body((x - 0.2) / 0.33)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


_CACHE: dict[str, nn.Module] = {}


def load_heldout_classifier(path: str | Path | None = None) -> nn.Module:
    """The frozen held-out classifier (shipped weights unless ``path``); cached per path."""
    key = str(path)
    if key not in _CACHE:
        _CACHE[key] = load_classifier(HeldoutDigitClassifier, HELDOUT_CLASSIFIER, path)
    return _CACHE[key]


def _labels(targets: Sequence[str] | torch.Tensor) -> torch.Tensor:
    return targets.long() if isinstance(targets, torch.Tensor) else prompt_labels(targets)


@torch.no_grad()
def heldout_logits(images: torch.Tensor, classifier: nn.Module | None = None) -> torch.Tensor:
    """Held-out classifier logits (B×10) of images in [0, 1]."""
    model = load_heldout_classifier() if classifier is None else classifier
    return model(to_gray16(images.float().cpu()))


@torch.no_grad()
def heldout_features(images: torch.Tensor, classifier: nn.Module | None = None) -> torch.Tensor:
    """The held-out classifier's 64-d penultimate features (the space of :func:`frechet_distance`)."""
    model = load_heldout_classifier() if classifier is None else classifier
    return model.features(to_gray16(images.float().cpu()))


def heldout_accuracy(
    images: torch.Tensor, targets: Sequence[str] | torch.Tensor, classifier: nn.Module | None = None
) -> float:
    """Fraction of ``images`` the held-out classifier puts in the prompted class.

    ``targets`` are prompts (``"digit 7"``) or integer class labels.
    """
    pred = heldout_logits(images, classifier).argmax(-1)
    return (pred == _labels(targets)).float().mean().item()


def frechet_distance_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}) of Gaussians fitted to two feature sets.

    Computed in float64 with symmetric eigendecompositions only:
    tr((Σ_a Σ_b)^{1/2}) = Σ √λ(Σ_a^{1/2} Σ_b Σ_a^{1/2}), which is stable (no non-symmetric sqrtm).
    Biased upward for small sets, like FID; compare values computed with similar set sizes.
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eva, eveca = torch.linalg.eigh(cov_a)
    sqrt_a = eveca @ torch.diag(eva.clamp_min(0).sqrt()) @ eveca.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(fd.item(), 0.0)


def frechet_distance(
    images: torch.Tensor, reference: torch.Tensor | None = None, classifier: nn.Module | None = None
) -> float:
    """Fréchet distance between ``images`` and ``reference`` in the held-out feature space.

    ``reference=None`` uses the real ``test`` split (300 digits never trained on). Real-vs-real
    splits score ≈ 2 (reward split vs test); uniform noise scores in the hundreds.
    """
    if reference is None:
        reference = to_rgb(load_digits_split("test")[0])
    feats, ref_feats = heldout_features(images, classifier), heldout_features(reference, classifier)
    return frechet_distance_from_features(feats, ref_feats)


@torch.no_grad()
def diversity(images: torch.Tensor, targets: Sequence[str] | torch.Tensor) -> float:
    """Mean pairwise RMS pixel distance within each prompt/class, averaged over classes.

    Pixels in [0, 1] on the 16×16 grayscale image; a class with fewer than two images is skipped.
    Real test digits score ≈ 0.21; mode collapse drives it to 0.
    """
    x = to_gray16(images.float().cpu()).flatten(1)
    labels = _labels(targets)
    per_class = []
    for c in labels.unique():
        xc = x[labels == c]
        if len(xc) < 2:
            continue
        d = torch.cdist(xc, xc) / x.shape[1] ** 0.5
        n = len(xc)
        per_class.append(d.sum() / (n * (n - 1)))
    if not per_class:
        raise ValueError("diversity needs at least two images of some class")
    return torch.stack(per_class).mean().item()


def evaluate_images(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """All three held-out metrics at once: ``heldout_accuracy``, ``frechet_distance``, ``diversity``."""
    return {
        "heldout_accuracy": heldout_accuracy(images, prompts),
        "frechet_distance": frechet_distance(images),
        "diversity": diversity(images, prompts),
    }
