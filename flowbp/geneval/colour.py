"""GenEval's colour check: CLIP zero-shot classification of the masked object crop.

Official (``evaluate_images.py``: ``ImageCrops``, ``color_classification``; clip_benchmark's
``zero_shot_classifier`` / ``run_classification``), with open_clip ``ViT-L-14`` ``pretrained="openai"``,
i.e. OpenAI's CLIP ViT-L/14, which transformers holds as ``openai/clip-vit-large-patch14``:

- crop: the object's mask composited over a grey ``#999`` canvas (``Image.composite``), then cropped
  to its box (PIL rounds float box coordinates);
- image transform (open_clip's eval transform for OpenAI weights): PIL bicubic resize of the shorter
  side to 224 (longer ``int(224·long/short)``), centre crop 224 (torchvision's ``round`` offsets),
  RGB, [0, 1], OpenAI mean/std; done here in PIL/numpy exactly so;
- classifier: for each colour the three templates ``a photo of a {c} {class}``, ``a photo of a
  {c}-colored {class}``, ``a photo of a {c} object``; text embeddings L2-normalised, averaged,
  re-normalised; prediction = argmax over colours of the cosine with the normalised image embedding.

The official code runs both under CUDA fp16 autocast; this runs in the model's dtype (float32 by
default), so near-ties can flip (not measured: no real weights here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flowbp.geneval.rules import COLORS, Detection
from flowbp.rewards.preprocess import OPENAI_MEAN, OPENAI_STD

TEMPLATES = ("a photo of a {{c}} {cls}", "a photo of a {{c}}-colored {cls}", "a photo of a {{c}} object")
BACKGROUND = "#999"
SIZE = 224


def crop_object(image: Image.Image, detection: Detection, background: str = BACKGROUND) -> Image.Image:
    """The official ``ImageCrops.__getitem__``: mask over grey, then the box crop."""
    image = image.convert("RGB")
    if detection.mask is not None:
        mask = np.asarray(detection.mask, dtype=bool)
        if tuple(image.size[::-1]) != mask.shape:
            raise ValueError(f"GenEval: mask {mask.shape} does not match image {image.size[::-1]}")
        image = Image.composite(image, Image.new("RGB", image.size, color=background), Image.fromarray(mask))
    return image.crop(tuple(detection.box))


def clip_pixels(crop: Image.Image) -> torch.Tensor:
    """open_clip's eval transform for OpenAI CLIP on one PIL image -> 3×224×224 normalised tensor."""
    w, h = crop.size
    if min(w, h) <= 0:
        raise ValueError(f"GenEval: empty crop {w}×{h}")
    if w <= h:
        new_w, new_h = SIZE, int(SIZE * h / w)
    else:
        new_w, new_h = int(SIZE * w / h), SIZE
    resized = crop.convert("RGB").resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = round((new_h - SIZE) / 2.0), round((new_w - SIZE) / 2.0)
    cropped = resized.crop((left, top, left + SIZE, top + SIZE))
    x = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)


class ColourClassifier:
    """Zero-shot colour of object crops with a transformers ``CLIPModel`` (callable as the rules expect)."""

    def __init__(self, model: Any, tokenizer: Any, device: str | torch.device = "cpu") -> None:
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self._weights: dict[str, torch.Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual_projection.weight.dtype

    @torch.no_grad()
    def class_weights(self, classname: str) -> torch.Tensor:
        """D×10 zero-shot weights of ``classname`` (clip_benchmark's ``zero_shot_classifier``), cached."""
        if classname not in self._weights:
            columns = []
            for colour in COLORS:
                texts = [t.format(cls=classname).format(c=colour) for t in TEMPLATES]
                tokens = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
                emb = _features(self.model.get_text_features(**tokens)).float()
                mean = F.normalize(emb, dim=-1).mean(dim=0)
                columns.append(mean / mean.norm())
            self._weights[classname] = torch.stack(columns, dim=1)
        return self._weights[classname]

    @torch.no_grad()
    def __call__(self, image: Image.Image, detections: Sequence[Detection], classname: str) -> list[str]:
        if not detections:
            return []
        pixels = torch.stack([clip_pixels(crop_object(image, d)) for d in detections])
        feats = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))).float()
        logits = 100.0 * F.normalize(feats, dim=-1) @ self.class_weights(classname)
        return [COLORS[i] for i in logits.argmax(dim=1).tolist()]


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns a model output from get_*_features; 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_colour_classifier(folder: str | Path, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32) -> ColourClassifier:
    from transformers import CLIPModel, CLIPTokenizer

    from flowbp.rewards.weights import RewardWeightsError

    try:
        model = CLIPModel.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RewardWeightsError(f"geneval-clip: cannot load a transformers CLIP model from {folder} ({first})") \
            from exc
    return ColourClassifier(model, tokenizer, device)
