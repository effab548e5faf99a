"""``imagereward``: ImageReward v1.0 on transformers' BLIP classes, differentiable in the pixels.

score = (MLP(BERT_xattn(tokens, ViT(image))[CLS]) − 0.16717) / 1.03334, as THUDM/ImageReward's
``ImageReward.score``: BLIP ViT-L/16 image tokens (all 197, final LayerNorm) are the cross-attention
memory of a BERT-base text encoder (bidirectional self-attention, cross-attention in every layer);
the [CLS] state goes through a 5-layer MLP without activations. Tokenizer: bert-base-uncased
(+ [DEC], [ENC]), max length 35, padded to it. Preprocessing: Resize(224, bicubic) + CenterCrop(224)
(torchvision offsets) + OpenAI normalisation. Scale ≈ standard normal (FlowBP reports 0.95–1.66).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowbp.rewards.clip import AestheticMLP, _dtype
from flowbp.rewards.digits import _FrozenReward
from flowbp.rewards.preprocess import TORCHVISION_CLIP, ImageTransform
from flowbp.rewards.tokenizers import bert_tokenizer
from flowbp.rewards.weights import HubSource, RewardWeightsError, first_file, load_state_dict, locate

SOURCE = "ImageReward.pt (+ med_config.json) from hf.co/THUDM/ImageReward"
CHECKPOINT_FILES = ("ImageReward.pt",)
CONFIG_FILE = "imagereward_config.json"  # written by `flowbp convert-reward imagereward`
HUB = HubSource("THUDM/ImageReward", ("ImageReward.pt", "med_config.json"))


class ImageRewardModel(nn.Module):
    """BLIP vision tower + BERT text encoder with cross-attention + MLP head (ImageReward's layout)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        from transformers import BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.config = dict(config)
        self.vision_model = BlipVisionModel(BlipVisionConfig(**config["vision"]))
        self.text_encoder = BlipTextModel(BlipTextConfig(**config["text"]), add_pooling_layer=False)
        self.mlp = AestheticMLP(config["mlp_sizes"])  # the same five Linear layers, no activations

    def raw_score(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """MLP output before standardisation, B scores."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        # Every image token is attended (ImageReward passes an all-ones encoder mask); is_decoder=False
        # keeps the text self-attention bidirectional, as BLIP's 'multimodal' mode.
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                   encoder_hidden_states=image_embeds, is_decoder=False).last_hidden_state
        return self.mlp(hidden[:, 0].to(next(self.mlp.parameters()).dtype)).squeeze(-1)


def build_model(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], dtype: torch.dtype) -> ImageRewardModel:
    """An :class:`ImageRewardModel` holding ``sd`` (flowbp keys), without random init of the big tensors."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = ImageRewardModel(config)
    model.load_state_dict({k: v.to(dtype) if not k.startswith("mlp.") else v.float() for k, v in sd.items()},
                          strict=True, assign=True)
    return model.eval().requires_grad_(False)


def convert_checkpoint(file: Path, dtype: torch.dtype | None = None) -> ImageRewardModel:
    """An :class:`ImageRewardModel` from THUDM's ``ImageReward.pt`` (``med_config.json`` beside it, if any)."""
    from flowbp.rewards.convert import imagereward_config, imagereward_to_flowbp

    sd = load_state_dict(file, "imagereward", SOURCE)
    if not isinstance(sd, dict):
        raise RewardWeightsError(f"imagereward: {file} holds no state dict; expected {SOURCE}")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    med_file = file.parent / "med_config.json"
    med = json.loads(med_file.read_text()) if med_file.is_file() else None
    try:
        config = imagereward_config(sd, med_config=med)
        converted = imagereward_to_flowbp(sd, config)
        return build_model(converted, config, dtype or torch.float32)
    except (KeyError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RewardWeightsError(f"imagereward: {file} is not an ImageReward checkpoint ({first}); expected {SOURCE}") \
            from exc


def load_converted(folder: Path, dtype: torch.dtype) -> ImageRewardModel:
    config = json.loads((folder / CONFIG_FILE).read_text())
    weights = folder / "model.safetensors"
    try:
        return build_model(load_state_dict(weights, "imagereward", SOURCE), config, dtype)
    except (KeyError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RewardWeightsError(f"imagereward: {weights} does not match {CONFIG_FILE} ({first})") from exc


class ImageReward(_FrozenReward):
    """``imagereward``: standardised ImageReward v1.0 score of (image, prompt) pairs."""

    def __init__(self, model: ImageRewardModel, tokenizer: Any, transform: ImageTransform = TORCHVISION_CLIP) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.transform = transform
        self.mean = float(model.config.get("mean", 0.0))
        self.std = float(model.config.get("std", 1.0))
        self.max_length = int(model.config.get("max_length", 35))

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"prompts: got {len(prompts)} prompts for {images.shape[0]} images")
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        dtype = self.model.vision_model.embeddings.patch_embedding.weight.dtype
        raw = self.model.raw_score(self.transform(images).to(dtype), tokens["input_ids"].to(images.device),
                                   tokens["attention_mask"].to(images.device))
        return ((raw - self.mean) / self.std).to(images.dtype)


def _accept(p: Path) -> bool:
    return (p.is_dir() and (p / CONFIG_FILE).is_file()) or first_file(p, CHECKPOINT_FILES) is not None


def load_imagereward(path: str | Path | None = None, allow_download: bool = False, dtype: Any = None,
                     **_: Any) -> ImageReward:
    """From a folder of `flowbp convert-reward imagereward` or THUDM's ``ImageReward.pt`` (converted at load)."""
    target = locate("imagereward", path, accept=_accept, hub=[HUB], allow_download=allow_download,
                    expected=f"{SOURCE}, or a folder from `flowbp convert-reward imagereward`")
    if target.is_dir() and (target / CONFIG_FILE).is_file():
        folder, model = target, load_converted(target, _dtype(dtype))
    else:
        file = first_file(target, CHECKPOINT_FILES)
        assert file is not None
        folder, model = file.parent, convert_checkpoint(file, _dtype(dtype))
    return ImageReward(model, bert_tokenizer(folder, "imagereward", allow_download))
