"""Score images with GenEval: detector + colour classifier + the official rules, in official output format.

Weights (nothing is downloaded unless ``allow_download=True``):

- detector (``geneval-detector``): a transformers Mask2Former COCO-instance folder
  (hf.co/facebook/mask2former-swin-small-coco-instance) or a folder with GenEval's mmdet checkpoint
  ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth`` (needs mmdet 2.x);
- colour CLIP (``geneval-clip``): a transformers CLIP folder of OpenAI's ViT-L/14
  (hf.co/openai/clip-vit-large-patch14, the weights of open_clip's ``ViT-L-14``/``openai``).

Each is looked up as ``path`` if given, else ``$FLOWBP_REWARD_DIR/geneval-detector`` (``…/geneval-clip``),
else the hub cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flowbp.geneval.rules import evaluate, result_record, select_detections
from flowbp.rewards.weights import HubSource, first_file, locate

DETECTOR_HUB = HubSource("facebook/mask2former-swin-small-coco-instance", ("*.json", "*.safetensors"))
CLIP_HUB = HubSource("openai/clip-vit-large-patch14", ("*.json", "*.txt", "*.safetensors"))


def _is_detector(p: Path) -> bool:
    from flowbp.geneval.detectors import MMDET_CHECKPOINT

    if not p.is_dir():
        return False
    hf = (p / "config.json").is_file() and first_file(p, ("model.safetensors", "pytorch_model.bin")) is not None
    return hf or (p / MMDET_CHECKPOINT).is_file()


def _is_clip(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and first_file(p, ("model.safetensors",)) is not None


def locate_weights(detector: str | Path | None = None, clip: str | Path | None = None,
                   allow_download: bool = False) -> tuple[Path, Path]:
    """The detector and CLIP folders (one-line :class:`RewardWeightsError` naming the expected files)."""
    det = locate("geneval-detector", detector, accept=_is_detector, hub=[DETECTOR_HUB], allow_download=allow_download,
                 expected="a transformers Mask2Former COCO-instance folder (config.json, model.safetensors, "
                 "preprocessor_config.json) or mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth (with mmdet)")
    cl = locate("geneval-clip", clip, accept=_is_clip, hub=[CLIP_HUB], allow_download=allow_download,
                expected="a transformers CLIP ViT-L/14 folder (config.json, model.safetensors, tokenizer files)")
    return det, cl


def to_pil(image: torch.Tensor | np.ndarray | Image.Image) -> Image.Image:
    """3×H×W uint8 tensor (RGB, what ``flowbp eval`` holds and a PNG stores) -> PIL RGB image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"GenEval: expected a 3×H×W uint8 image, got {image.dtype} {tuple(image.shape)}")
        image = image.permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(image), mode="RGB")


class GenEvalScorer:
    """``detector`` (PIL images -> per-class detections) + ``colours`` (the CLIP classifier) + the rules."""

    def __init__(self, detector: Callable[[Sequence[Image.Image]], list[dict[str, Any]]],
                 colours: Callable[..., list[str]], batch_size: int = 4) -> None:
        self.detector = detector
        self.colours = colours
        self.batch_size = batch_size

    def score(self, images: Sequence[Any], metadata: Sequence[Mapping[str, Any]], filenames: Sequence[str],
              progress: bool = False) -> list[dict[str, Any]]:
        """One official result record per image (``correct``, ``reason``, ``details``, …), in order."""
        from tqdm.auto import tqdm

        if not (len(images) == len(metadata) == len(filenames)):
            raise ValueError("GenEval: images, metadata and filenames differ in length")
        records = []
        bar = tqdm(total=len(images), desc="geneval", unit="image", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(images), self.batch_size):
            pil = [to_pil(im) for im in images[start : start + self.batch_size]]
            for k, (image, found) in enumerate(zip(pil, self.detector(pil), strict=True)):
                meta = metadata[start + k]
                objects = select_detections(found, meta["tag"])
                correct, reason = evaluate(image, objects, meta, self.colours)
                records.append(result_record(filenames[start + k], meta, correct, reason, objects))
            bar.update(len(pil))
        bar.close()
        return records


def load_scorer(detector: str | Path | None = None, clip: str | Path | None = None,
                device: str | torch.device = "cpu", allow_download: bool = False) -> GenEvalScorer:
    from flowbp.geneval.colour import load_colour_classifier
    from flowbp.geneval.detectors import load_detector

    det, cl = locate_weights(detector, clip, allow_download)
    return GenEvalScorer(load_detector(det, device), load_colour_classifier(cl, device))
