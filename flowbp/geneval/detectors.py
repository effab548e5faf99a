"""Instance detectors for GenEval: transformers' Mask2Former (pure pip) or the official mmdet checkpoint.

Both return, per image, ``{GenEval class name: [Detection, ...]}`` with every instance the model
proposes (the rules in :mod:`flowbp.geneval.rules` threshold and sort them), boxes in original-image
pixels and boolean masks at the original image size.

``Mask2FormerDetector`` (transformers ``Mask2FormerForUniversalSegmentation``, e.g.
``facebook/mask2former-swin-small-coco-instance``): transformers' own
``post_process_instance_segmentation`` fixes masks at 384×384, drops instances under its own 0.5
threshold and returns no boxes, so the instance post-processing is done here the way mmdet's
``Mask2Former`` does it (mmdet ``MaskFormerFusionHead.instance_postprocess``, the path GenEval's
numbers come from): softmax class scores without the no-object column; the top ``num_queries``
(query, class) pairs; mask logits upsampled bilinearly to the padded input, cropped to the valid
region, resized bilinearly to the original image; mask = logit > 0; score = class probability × mean
sigmoid inside the mask; box = the mask's extent ``[x_min, y_min, x_max + 1, y_max + 1]`` (mmdet's
``mask2bbox``). Pairs whose class probability is at most ``min_score`` are skipped before the
upsampling (exact: the mask factor is ≤ 1, so their score cannot pass GenEval's > 0.3). Class ids
are mapped to GenEval's names by name (``config.id2label``), never by position.

``MMDetDetector`` (mmdet 2.x, GenEval's own route; optional, untested here): the official config and
``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth``; the checkpoint is read with
``torch.load(weights_only=True)``. Images go in as **BGR** uint8 arrays, as ``mmcv.imread`` of the
official PNG files gives them (the config's ``to_rgb=True`` turns them back to RGB).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flowbp.geneval.prompts import object_names
from flowbp.geneval.rules import THRESHOLD, Detection
from flowbp.rewards.weights import RewardWeightsError

#: COCO's 80 instance classes in detector order (mmdet ``CocoDataset.CLASSES``); GenEval renames three.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip
#: other spellings of COCO names found in label maps (Pascal-style, panoptic "-merged"/"-other" suffixes)
ALIASES = {
    "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "tvmonitor": "tv", "tv monitor": "tv",
    "television": "tv", "pottedplant": "potted plant", "diningtable": "dining table", "hair dryer": "hair drier",
    "cellphone": "cell phone", "computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard",
    "doughnut": "donut", "ball": "sports ball", "racket": "tennis racket", "fridge": "refrigerator",
}  # fmt: skip


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def geneval_name_map(id2label: Mapping[int, str]) -> dict[int, str]:
    """Detector class id -> GenEval class name, by name; ids of non-COCO-instance classes are left out.

    Fails (one line) when any of GenEval's 80 classes has no detector id: scores would silently drop it.
    """
    coco_to_geneval = dict(zip(COCO_CLASSES, object_names(), strict=True))
    known = {_norm(c): c for c in COCO_CLASSES}
    mapping: dict[int, str] = {}
    for idx, label in id2label.items():
        n = _norm(str(label))
        coco = known.get(n) or ALIASES.get(n)
        if coco is not None:
            mapping[int(idx)] = coco_to_geneval[coco]
    missing = sorted(set(object_names()) - set(mapping.values()))
    if missing:
        raise RewardWeightsError(
            f"geneval-detector: its labels (config.id2label) lack GenEval class(es) {missing[:8]}"
            f"{' …' if len(missing) > 8 else ''}; expected a COCO instance-segmentation model"
        )
    return mapping


def mask2bbox(masks: torch.Tensor) -> torch.Tensor:
    """mmdet's ``mask2bbox``: N×H×W bool -> N×4 ``[x_min, y_min, x_max + 1, y_max + 1]`` (zeros for empty masks)."""
    boxes = torch.zeros(masks.shape[0], 4, dtype=torch.float32)
    x_any, y_any = masks.any(dim=1), masks.any(dim=2)
    for i in range(masks.shape[0]):
        xs, ys = torch.where(x_any[i])[0], torch.where(y_any[i])[0]
        if len(xs) and len(ys):
            boxes[i] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    return boxes


def instance_postprocess(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    valid_hw: tuple[int, int],
    padded_hw: tuple[int, int],
    image_hw: tuple[int, int],
    max_per_image: int | None = None,
    min_score: float = 0.0,
) -> list[tuple[int, float, torch.Tensor, torch.Tensor]]:
    """mmdet-style Mask2Former instances of one image: ``[(class id, score, box 4, mask H×W bool)]``.

    ``class_logits`` Q×(C+1), ``mask_logits`` Q×h×w at 1/4 of the padded input ``padded_hw``, of which
    ``valid_hw`` is the resized image; ``image_hw`` the original image size.
    """
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    scores = class_logits.float().softmax(dim=-1)[:, :-1]
    k = min(max_per_image or num_queries, num_queries * num_classes)
    top_scores, top_index = scores.flatten().topk(k, sorted=True)
    keep = top_scores > min_score
    top_scores, top_index = top_scores[keep], top_index[keep]
    if top_index.numel() == 0:
        return []
    labels = top_index % num_classes
    queries = torch.div(top_index, num_classes, rounding_mode="floor")
    masks = mask_logits[queries].float()[None]
    masks = F.interpolate(masks, size=padded_hw, mode="bilinear", align_corners=False)
    masks = masks[..., : valid_hw[0], : valid_hw[1]]
    masks = F.interpolate(masks, size=image_hw, mode="bilinear", align_corners=False)[0]
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    det_scores = top_scores * mask_scores
    boxes = mask2bbox(binary.cpu())
    return [
        (int(labels[i]), float(det_scores[i]), boxes[i], binary[i].cpu()) for i in range(len(det_scores))
    ]


class Mask2FormerDetector:
    """transformers Mask2Former (COCO instance) -> GenEval detections; see the module docstring."""

    backend = "transformers"

    def __init__(self, model: Any, processor: Any, device: str | torch.device = "cpu",
                 min_score: float = THRESHOLD) -> None:
        self.model = model.eval().requires_grad_(False).to(device)
        self.processor = processor
        self.device = torch.device(device)
        self.min_score = min_score
        self.names = geneval_name_map(model.config.id2label)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> list[dict[str, list[Detection]]]:
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, next(self.model.parameters()).dtype)
        pixel_mask = inputs.get("pixel_mask")
        out = self.model(pixel_values=pixel_values,
                         pixel_mask=pixel_mask.to(self.device) if pixel_mask is not None else None)
        padded = tuple(pixel_values.shape[-2:])
        results = []
        for i, image in enumerate(images):
            if pixel_mask is not None:
                valid = (int(pixel_mask[i].any(dim=1).sum()), int(pixel_mask[i].any(dim=0).sum()))
            else:
                valid = padded
            found: dict[str, list[Detection]] = {}
            for label, score, box, mask in instance_postprocess(
                out.class_queries_logits[i], out.masks_queries_logits[i], valid, padded,
                (image.height, image.width), min_score=self.min_score,
            ):
                name = self.names.get(label)
                if name is not None:
                    found.setdefault(name, []).append(Detection(tuple(box.tolist()), score, mask.numpy()))
            results.append(found)
        return results


def load_mask2former(folder: str | Path, device: str | torch.device = "cpu") -> Mask2FormerDetector:
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former import Mask2FormerImageProcessorPil

    try:
        model = Mask2FormerForUniversalSegmentation.from_pretrained(str(folder), local_files_only=True)
        # the PIL processor: the torch one imports torchvision, which flowbp does not require
        processor = Mask2FormerImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RewardWeightsError(
            f"geneval-detector: cannot load a transformers Mask2Former from {folder} ({first}); expected "
            "config.json, model.safetensors and preprocessor_config.json "
            "(hf.co/facebook/mask2former-swin-small-coco-instance)"
        ) from exc
    return Mask2FormerDetector(model, processor, device)


# ------------------------------------------------------------------------------------------ mmdet

MMDET_CONFIG = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py"
MMDET_CHECKPOINT = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth"


def mmdet_available() -> bool:
    try:
        import mmdet  # noqa: F401
    except ImportError:
        return False
    return True


class MMDetDetector:
    """GenEval's official detector through mmdet 2.x (untested here: mmdet/mmcv do not install in this setup)."""

    backend = "mmdet"

    def __init__(self, folder: Path, device: str | torch.device = "cpu") -> None:
        import mmdet
        from mmdet.apis import init_detector

        config = folder / MMDET_CONFIG
        if not config.is_file():  # GenEval takes the config from mmdet's own tree
            config = Path(mmdet.__file__).parent.parent / "configs" / "mask2former" / MMDET_CONFIG
        checkpoint = folder / MMDET_CHECKPOINT
        if not checkpoint.is_file():
            raise RewardWeightsError(
                f"geneval-detector: {checkpoint} not found (GenEval's evaluation/download_models.sh)"
            )
        self.model = init_detector(str(config), None, device=str(device))
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
        self.model.load_state_dict(state.get("state_dict", state), strict=True)
        classes = state.get("meta", {}).get("CLASSES") or COCO_CLASSES
        self.names = geneval_name_map(dict(enumerate(classes)))

    def __call__(self, images: Sequence[Image.Image]) -> list[dict[str, list[Detection]]]:
        from mmdet.apis import inference_detector

        results = []
        for image in images:
            bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[..., ::-1])  # as mmcv.imread(png)
            result = inference_detector(self.model, bgr)
            bbox = result[0] if isinstance(result, tuple) else result
            segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
            found: dict[str, list[Detection]] = {}
            for index, rows in enumerate(bbox):
                name = self.names.get(index)
                if name is None:
                    continue
                for j, row in enumerate(rows):
                    mask = None if segm is None else np.asarray(segm[index][j], dtype=bool)
                    found.setdefault(name, []).append(Detection(tuple(float(v) for v in row[:4]), float(row[4]), mask))
            results.append(found)
        return results


def load_detector(folder: str | Path, device: str | torch.device = "cpu") -> Mask2FormerDetector | MMDetDetector:
    """The mmdet detector when the folder holds the official ``.pth`` (and mmdet imports), else transformers'."""
    folder = Path(folder)
    if (folder / MMDET_CHECKPOINT).is_file():
        if not mmdet_available():
            raise RewardWeightsError(
                f"geneval-detector: {folder / MMDET_CHECKPOINT} needs mmdet 2.x (pip install 'flowbp[geneval-mmdet]', "
                "see docs/hpsv3-geneval.md); or give a transformers Mask2Former folder"
            )
        return MMDetDetector(folder, device)
    return load_mask2former(folder, device)
