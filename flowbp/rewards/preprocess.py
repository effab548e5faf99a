"""Differentiable image preprocessing for reward models, in torch on B×3×H×W tensors in [0, 1].

A PIL or image-processor round trip would cut the gradient, so every reward re-implements its
official preprocessing here. The resampling is ``F.interpolate(mode="bicubic", antialias=True)``:
torch's antialiased bicubic uses PIL's kernel (a = −0.5, support widened by the scale factor when
downsampling), and it is what torchvision's ``resize`` does on float tensors.

The official scorers resize in one of two ways, and each transform below follows its own:

- PIL images (transformers' ``CLIPImageProcessor`` for PickScore/CLIPScore, openai/CLIP's and BLIP's
  torchvision ``Resize`` on PIL for the LAION aesthetic predictor and ImageReward): PIL stores uint8,
  rounding after each separable pass and clipping the bicubic overshoot to [0, 255]. The transforms
  reproduce the clipping by clamping to [0, 1] after the resize (``clamp=True``); the rounding is what
  is left (tests/test_rewards_clip.py measures it).
- float tensors (HPSv2's ``image_transform``: ``ToTensor`` *before* ``ResizeMaxSize``, so torchvision
  resizes the float tensor): the overshoot is kept, nothing is clamped (``clamp=False``). Clamping
  here would differ from the official transform by up to ~10/255 at sharp edges and zero the reward
  gradient at every clipped pixel.

Two layouts exist among the supported rewards:

- ``crop``: resize the shorter side to ``size`` (longer side ``int(size * long / short)``, as both
  torchvision's ``Resize(int)`` and transformers' ``CLIPImageProcessor`` compute it), then a centre
  crop. The crop offset differs by one pixel between the two libraries when the excess is odd:
  transformers uses ``(h - size) // 2``, torchvision ``round((h - size) / 2)`` (Python's
  round-half-to-even), so each reward names the library it follows.
- ``pad`` (HPSv2's ``ResizeMaxSize``): resize the longer side to ``size`` (shorter side
  ``round(short * size / long)``) and pad to a square with zeros *before* normalisation, left/top
  getting ``pad // 2``. No crop: nothing of the image is lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

#: OpenAI CLIP's normalisation, used by every supported reward (CLIP, open_clip, BLIP, LAION).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def resize(images: torch.Tensor, height: int, width: int, clamp: bool = True) -> torch.Tensor:
    """Antialiased bicubic resize; ``clamp=True`` clips to [0, 1] like a PIL uint8 resize, ``False``: torchvision.

    Bicubic overshoots at edges. A scorer that resizes PIL images gets the overshoot clipped by uint8
    storage, so clamping matches it (a clipped pixel then has zero gradient, as in the official path);
    a scorer that resizes float tensors (HPSv2) keeps it, so must not clamp.
    """
    if images.shape[-2:] == (height, width):
        return images
    out = F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0.0, 1.0) if clamp else out


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) of a resize of the shorter side to ``size`` (truncating the longer side)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_crop(images: torch.Tensor, size: int, rounding: Literal["floor", "round"] = "floor") -> torch.Tensor:
    """Centre crop to size×size; ``floor``: transformers' offsets, ``round``: torchvision's."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"center_crop: image {h}×{w} is smaller than the crop {size}")
    if rounding == "floor":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return images[..., top : top + size, left : left + size]


def resize_longest_and_pad(images: torch.Tensor, size: int, fill: float = 0.0, clamp: bool = False) -> torch.Tensor:
    """HPSv2's ``ResizeMaxSize``: longer side to ``size`` (shorter ``round(dim * scale)``), zero-pad to square.

    The official transform resizes a float tensor (``ToTensor`` comes first), so by default nothing is
    clamped. Unlike the official transform (which skips padding when the longer side already equals
    ``size``, leaving a non-square image the model cannot take), this always pads to a square.
    """
    h, w = images.shape[-2:]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    out = resize(images, new_h, new_w, clamp=clamp)
    pad_h, pad_w = size - new_h, size - new_w
    # torch's pad order is (left, right, top, bottom); torchvision's [left, top, right, bottom] with the
    # same split: left/top get pad // 2, right/bottom the rest.
    return F.pad(out, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


@dataclass(frozen=True)
class ImageTransform:
    """[0, 1] images → normalised pixel values of one reward model, differentiably."""

    size: int = 224
    layout: Literal["crop", "pad"] = "crop"
    crop_rounding: Literal["floor", "round"] = "floor"
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    #: clip the resize's overshoot to [0, 1]: True for scorers that resize PIL (uint8) images, False for tensors
    clamp: bool = True

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected B×3×H×W in [0, 1], got shape {tuple(images.shape)}")
        images = images.float() if not images.is_floating_point() else images
        if self.layout == "pad":
            out = resize_longest_and_pad(images, self.size, clamp=self.clamp)
        else:
            h, w = images.shape[-2:]
            resized = resize(images, *shortest_edge_size(h, w, self.size), clamp=self.clamp)
            out = center_crop(resized, self.size, self.crop_rounding)
        return normalize(out, self.mean, self.std)


#: transformers' CLIPImageProcessor (PickScore's and CLIPScore's official path).
HF_CLIP = ImageTransform(layout="crop", crop_rounding="floor")
#: openai/CLIP's ``_transform`` / torchvision Resize + CenterCrop (LAION aesthetic, ImageReward).
TORCHVISION_CLIP = ImageTransform(layout="crop", crop_rounding="round")
#: open_clip's ``image_transform(resize_longest_max=True)`` (HPSv2): ToTensor, then the float resize, no clamp.
HPS_PAD = ImageTransform(layout="pad", clamp=False)
