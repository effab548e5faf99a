"""CLIP-based rewards: ``pickscore``, ``clipscore``, ``hpsv2`` (HPS v2.1) and ``aesthetic`` (LAION v2).

All four encode the image with a transformers CLIP vision tower after a torch re-implementation of
their official preprocessing (:mod:`flowbp.rewards.preprocess`), so the score is differentiable
with respect to the pixels. Usual scales (see the README's Rewards section):

- ``pickscore``: exp(logit_scale)·cos(image, text), logit_scale of PickScore_v1 ≈ ln 100; typical
  values 18–24 (FlowBP reports 22.3–23.8 on HPDv2 prompts). Not divided by 26.
- ``clipscore``: 100·max(cos, 0) per image, default openai/clip-vit-large-patch14; typical 20–35.
  The CLIPScore paper's 2.5·max(cos, 0) is it ÷ 40. It is torchmetrics' ``CLIPScore`` formula with two
  exact differences: (1) prompts over 77 tokens: flowbp lets the tokenizer truncate
  (``truncation=True, max_length=77``), which keeps the end token, so the text is pooled at the end
  token after 75 prompt tokens as CLIP was trained; torchmetrics tokenizes untruncated and slices
  ``input_ids[..., :77]``, dropping the end token, so its pooled token is whatever sits at the pooling
  position (with openai/clip-vit-large-patch14's legacy ``eos_token_id == 2`` config: the largest
  token id among the first 77, a word token) and its score for such prompts is not CLIP's text
  embedding. Prompts of ≤ 77 tokens (with start/end) get identical ids. (2) the clamp at 0 is applied
  per image here; torchmetrics clamps the batch/dataset mean (``max(mean(100·cos), 0)``). The two agree
  whenever no cosine is negative.
- ``hpsv2``: cos(image, text) of HPS v2.1, no logit scale; ≈ 0.25–0.30 for base models, ≈ 0.4 after
  reward fine-tuning (HPSv2's benchmark tables print it ×100).
- ``aesthetic``: LAION's MLP on the L2-normalised CLIP ViT-L/14 image embedding, 0–10 (≈ 5–6.5).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from flowbp.rewards.digits import _FrozenReward
from flowbp.rewards.preprocess import HF_CLIP, HPS_PAD, TORCHVISION_CLIP, ImageTransform
from flowbp.rewards.tokenizers import LAION_H14, clip_tokenizer, open_clip_clean
from flowbp.rewards.weights import HubSource, RewardWeightsError, first_file, hub_snapshot, load_state_dict, locate

WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)
# Only v2.1 is looked up by name: HPS_v2_compressed.pt (and the HF Space's HPS_v2_1.pt, despite its name) are
# v2.0, and open_clip_pytorch_model.bin is the un-tuned base CLIP. Another file can still be given as path=.
HPS_FILES = ("HPS_v2.1_compressed.pt",)
AESTHETIC_FILES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic-model.pth", "aesthetic_mlp.safetensors")
_HF_FILES = ("*.json", "*.txt", "*.safetensors")

PICKSCORE_HUB = HubSource("yuvalkirstain/PickScore_v1", (*_HF_FILES, "pytorch_model.bin"))
CLIP_L14_HUB = HubSource("openai/clip-vit-large-patch14", (*_HF_FILES, "pytorch_model.bin"))
HPS_HUB = HubSource("xswu/HPSv2", ("HPS_v2.1_compressed.pt",))
AESTHETIC_HUB = HubSource("trl-lib/ddpo-aesthetic-predictor", ("aesthetic-model.pth",))


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision features to float32 for the score arithmetic; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def is_clip_folder(folder: Path) -> bool:
    """A transformers CLIP folder: config.json + weights."""
    return folder.is_dir() and (folder / "config.json").is_file() and first_file(folder, WEIGHT_FILES) is not None


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype: expected one of {', '.join(names)}, got {dtype!r}")
    return names[dtype]


def load_clip_folder(folder: Path, reward: str, dtype: torch.dtype, vision_only: bool = False) -> nn.Module:
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    cls = CLIPVisionModelWithProjection if vision_only else CLIPModel
    try:
        model = cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RewardWeightsError(f"{reward}: cannot load a transformers CLIP model from {folder} ({first})") from exc
    return model.eval().requires_grad_(False)


class ClipReward(_FrozenReward):
    """Image-text similarity of a transformers ``CLIPModel``: ``scale(cos(image, text))``.

    ``score``: ``"logit"`` exp(logit_scale)·cos (PickScore), ``"cos"`` (HPSv2), ``"clipscore"`` 100·max(cos, 0).
    ``attention_mask``: pass the tokenizer's mask (transformers-style callers) or not (open_clip, which
    pads with zeros and relies on the causal mask: the pooled EOT token never sees the padding).
    ``clean``: applied to each prompt before tokenising (``open_clip_clean`` for open_clip models).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, transform: ImageTransform,
                 score: Literal["logit", "cos", "clipscore"], attention_mask: bool = True,
                 clean: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self.clean = clean  # text cleaning before the tokenizer (open_clip's, for HPSv2)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.transform = transform
        self.score = score
        self.use_attention_mask = attention_mask

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings (differentiable)."""
        dtype = self.model.visual_projection.weight.dtype
        pooled = self.model.vision_model(pixel_values=self.transform(images).to(dtype)).pooler_output
        return F.normalize(upcast(self.model.visual_projection(pooled)), dim=-1)

    def text_features(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        texts = [self.clean(p) for p in prompts] if self.clean is not None else list(prompts)
        tokens = self.tokenizer(texts, padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        mask = tokens["attention_mask"].to(device) if self.use_attention_mask else None
        pooled = self.model.text_model(input_ids=tokens["input_ids"].to(device), attention_mask=mask).pooler_output
        return F.normalize(upcast(self.model.text_projection(pooled)), dim=-1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"prompts: got {len(prompts)} prompts for {images.shape[0]} images")
        cos = (self.image_features(images) * self.text_features(prompts, images.device)).sum(-1)
        if self.score == "logit":
            out = upcast(self.model.logit_scale).exp() * cos
        elif self.score == "clipscore":
            out = 100.0 * cos.clamp(min=0)
        else:
            out = cos
        return out.to(images.dtype)


# ----------------------------------------------------------------------------------------- loaders


def load_pickscore(path: str | Path | None = None, allow_download: bool = False, dtype: Any = None,
                   **_: Any) -> ClipReward:
    """``pickscore``: PickScore_v1 (a CLIPModel folder); exp(logit_scale)·cos, as PickScore's README."""
    folder = locate("pickscore", path, accept=is_clip_folder, hub=[PICKSCORE_HUB], allow_download=allow_download,
                    expected="a transformers CLIPModel folder (config.json + model.safetensors or pytorch_model.bin)")
    model = load_clip_folder(folder, "pickscore", _dtype(dtype))
    tokenizer = clip_tokenizer(folder, "pickscore", LAION_H14, allow_download)
    return ClipReward(model, tokenizer, HF_CLIP, "logit")


def load_clipscore(path: str | Path | None = None, allow_download: bool = False, dtype: Any = None,
                   **_: Any) -> ClipReward:
    """``clipscore``: 100·max(cos, 0) with any CLIP folder (default openai/clip-vit-large-patch14)."""
    folder = locate("clipscore", path, accept=is_clip_folder, hub=[CLIP_L14_HUB], allow_download=allow_download,
                    expected="a transformers CLIP folder (config.json + model.safetensors or pytorch_model.bin)")
    model = load_clip_folder(folder, "clipscore", _dtype(dtype))
    return ClipReward(model, clip_tokenizer(folder, "clipscore", None), HF_CLIP, "clipscore")


def _hps_accept(p: Path) -> bool:
    return is_clip_folder(p) or first_file(p, HPS_FILES) is not None


def open_clip_heads(folder: Path) -> dict[str, Any]:
    """Heads/activation from an ``open_clip_config.json`` (open_clip's model config) next to the weights.

    Without one, ViT-H-14's: 16 vision heads (width 1280 / head_width 80), 16 text heads, exact GELU.
    """
    file = folder / "open_clip_config.json"
    if not file.is_file():
        return {"vision_heads": 16, "text_heads": 16, "hidden_act": "gelu"}
    cfg = json.loads(file.read_text())
    cfg = cfg.get("model_cfg", cfg)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    return {
        "vision_heads": vision["width"] // vision.get("head_width", 64),
        "text_heads": text.get("heads", 8),
        "hidden_act": "quick_gelu" if cfg.get("quick_gelu", False) else "gelu",
    }


def convert_hpsv2(file: Path, dtype: torch.dtype | None = None, heads: dict[str, Any] | None = None,
                  eos_token_id: int = 49407, bos_token_id: int = 49406) -> nn.Module:
    """A transformers CLIPModel from an open_clip-format HPS checkpoint (``{'state_dict': ...}`` or plain)."""
    from flowbp.rewards.convert import build_clip_model, openclip_clip_config

    source = "the HPS v2.1 checkpoint HPS_v2.1_compressed.pt from hf.co/xswu/HPSv2"
    sd = load_state_dict(file, "hpsv2", source)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise RewardWeightsError(f"hpsv2: {file} holds no state dict; expected {source}")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    try:
        config = openclip_clip_config(sd, eos_token_id=eos_token_id, bos_token_id=bos_token_id,
                                      **(heads or open_clip_heads(file.parent)))
        model = build_clip_model(sd, config, dtype or next(iter(sd.values())).dtype)
    except (KeyError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RewardWeightsError(f"hpsv2: {file} is not an open_clip ViT checkpoint ({first}); expected {source}") \
            from exc
    return model


def load_hpsv2(path: str | Path | None = None, allow_download: bool = False, dtype: Any = None,
               **_: Any) -> ClipReward:
    """``hpsv2``: HPS v2.1, from a converted folder or the raw open_clip checkpoint (converted at load)."""
    target = locate("hpsv2", path, accept=_hps_accept, hub=[HPS_HUB], allow_download=allow_download,
                    expected="HPS_v2.1_compressed.pt or a folder from `flowbp convert-reward hpsv2`")
    if is_clip_folder(target):
        model, folder = load_clip_folder(target, "hpsv2", _dtype(dtype)), target
    else:
        file = first_file(target, HPS_FILES)
        assert file is not None  # accepted above
        folder = file.parent
        tokenizer = clip_tokenizer(folder, "hpsv2", LAION_H14, allow_download)
        model = convert_hpsv2(file, _dtype(dtype), eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=tokenizer.bos_token_id)
        return ClipReward(model, tokenizer, HPS_PAD, "cos", attention_mask=False, clean=open_clip_clean)
    return ClipReward(model, clip_tokenizer(folder, "hpsv2", LAION_H14, allow_download), HPS_PAD, "cos",
                      attention_mask=False, clean=open_clip_clean)


class AestheticMLP(nn.Module):
    """LAION's predictor head: Linear layers with dropouts between and no activations (keys layers.{0,2,4,6,7})."""

    def __init__(self, sizes: Sequence[int] = (768, 1024, 128, 64, 16, 1)) -> None:
        super().__init__()
        s = list(sizes)
        self.layers = nn.Sequential(
            nn.Linear(s[0], s[1]), nn.Dropout(0.2), nn.Linear(s[1], s[2]), nn.Dropout(0.2),
            nn.Linear(s[2], s[3]), nn.Dropout(0.1), nn.Linear(s[3], s[4]), nn.Linear(s[4], s[5]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_mlp(sd: dict[str, torch.Tensor], reward: str, file: Path, source: str) -> AestheticMLP:
    sd = {k.removeprefix("mlp."): v for k, v in sd.items()}
    try:
        sizes = [sd[f"layers.{i}.weight"].shape[1] for i in (0, 2, 4, 6, 7)] + [sd["layers.7.weight"].shape[0]]
        mlp = AestheticMLP(sizes)
        mlp.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except (KeyError, RuntimeError, AttributeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RewardWeightsError(f"{reward}: {file} is not the predictor MLP ({first}); expected {source}") from exc
    return mlp.eval().requires_grad_(False)


class AestheticReward(_FrozenReward):
    """``aesthetic``: MLP(normalise(CLIP ViT-L/14 image embedding)), prompt-independent, 0–10."""

    def __init__(self, vision: nn.Module, mlp: AestheticMLP, transform: ImageTransform = TORCHVISION_CLIP) -> None:
        super().__init__()
        self.vision = vision.eval().requires_grad_(False)
        self.mlp = mlp
        self.transform = transform

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        dtype = next(self.vision.parameters()).dtype
        embeds = upcast(self.vision(pixel_values=self.transform(images).to(dtype)).image_embeds)
        mlp_dtype = next(self.mlp.parameters()).dtype
        return self.mlp(F.normalize(embeds, dim=-1).to(mlp_dtype)).squeeze(-1).to(images.dtype)


def load_aesthetic(path: str | Path | None = None, allow_download: bool = False, dtype: Any = None,
                   **_: Any) -> AestheticReward:
    """``aesthetic``: a folder with the MLP file and, in it or its ``clip/`` sub-folder, CLIP ViT-L/14."""
    source = "sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/improved-aesthetic-predictor"
    target = locate("aesthetic", path, accept=lambda p: first_file(p, AESTHETIC_FILES) is not None,
                    hub=[AESTHETIC_HUB], allow_download=allow_download, expected=source)
    file = first_file(target, AESTHETIC_FILES)
    assert file is not None
    mlp = load_mlp(load_state_dict(file, "aesthetic", source), "aesthetic", file, source)
    clip_dir = next((d for d in (file.parent, file.parent / "clip") if is_clip_folder(d)), None)
    if clip_dir is None:
        cached = hub_snapshot(CLIP_L14_HUB, allow_download)
        clip_dir = cached if cached is not None and is_clip_folder(cached) else None
    if clip_dir is None:
        raise RewardWeightsError(
            f"aesthetic: no CLIP ViT-L/14 next to {file} (same folder or clip/) nor in the hub cache of "
            f"hf.co/{CLIP_L14_HUB.repo_id}; expected a transformers CLIP folder"
        )
    return AestheticReward(load_clip_folder(clip_dir, "aesthetic", _dtype(dtype), vision_only=True), mlp)
