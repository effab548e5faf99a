"""A judge run locally with transformers: ``LlavaOnevisionForConditionalGeneration`` (UnifiedReward v1.x) or
``Qwen2_5_VLForConditionalGeneration`` (the Qwen2.5-VL based UnifiedReward models), from a local folder.

The folder is in transformers' layout (``config.json`` with ``model_type`` ``llava_onevision`` or
``qwen2_5_vl``, safetensors weights, tokenizer and processor files). UnifiedReward-7b-v1.5 is published in
LLaVA-NeXT's own layout (``llava_qwen``); convert it once with transformers' LLaVA-OneVision conversion
script (docs/unifiedreward.md), or serve it with sglang, which reads that layout directly.

Generation is batched and greedy (``do_sample=False``) with left padding; the LLaVA prompt is the served
route's conversation (:func:`flowbp.rewards.unifiedreward.chat_prompt`: sglang's ``chatml-llava`` =
LLaVA's ``qwen_1_5``, one image placeholder), so both backends ask the same question the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from flowbp.rewards.unifiedreward import FAMILY, URL_ENV, JudgeError, chat_prompt
from flowbp.rewards.weights import ENV_VAR, RewardWeightsError, locate

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
SUPPORTED = ("llava_onevision", "qwen2_5_vl")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # Qwen2.5-VL's placeholder of one image
EXPECTED = (
    "a transformers LLaVA-OneVision or Qwen2.5-VL folder (config.json, model.safetensors[.index.json], "
    "tokenizer files, preprocessor_config.json)"
)


def _is_judge_folder(folder: Path) -> bool:
    return (
        folder.is_dir()
        and (folder / "config.json").is_file()
        and any((folder / w).is_file() for w in WEIGHTS)
        and any((folder / t).is_file() for t in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    )


def locate_judge(name: str, path: str | Path | None, allow_download: bool = False) -> Path:
    """``path``, else ``$FLOWBP_REWARD_DIR/unifiedreward``; the error names the files expected and the served way."""
    try:
        return locate(FAMILY, path, accept=_is_judge_folder, expected=EXPECTED, allow_download=allow_download)
    except RewardWeightsError as exc:
        if path is not None:  # a folder was named: what is wrong with it
            raise RewardWeightsError(f"{name}: {str(exc).removeprefix(FAMILY + ': ')}") from None
    env = os.environ.get(ENV_VAR)
    where = f"${ENV_VAR}/{FAMILY} ({Path(env) / FAMILY})" if env else f"${ENV_VAR}/{FAMILY} (unset)"
    raise RewardWeightsError(
        f"{name}: no judge: pass url=http://HOST:PORT/v1 of a served judge (--judge-url, ${URL_ENV}) or a local "
        f"folder (path=, reward_paths.{FAMILY}, {where}) with config.json, model.safetensors, tokenizer files"
    )


def _image_only(processor_class: type, **parts: Any) -> Any:
    """``processor_class`` without its video half: transformers' video processors need torchvision, which is
    not a flowbp dependency, and a judge only ever sees images."""

    class ImageOnly(processor_class):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return ["image_processor", "tokenizer"]

    return ImageOnly(**parts)


def build_processor(folder: Path, config: Any) -> Any:
    """The image + text processor of a judge folder (left padding: batched generation continues each row)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.padding_side = "left"
    if config.model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
        return _image_only(Qwen2_5_VLProcessor, image_processor=image_processor, tokenizer=tokenizer)
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    settings: dict[str, Any] = {}
    if (folder / "processor_config.json").is_file():
        settings = json.loads((folder / "processor_config.json").read_text())
    vision = config.vision_config
    return _image_only(
        LlavaOnevisionProcessor,
        image_processor=LlavaOnevisionImageProcessorPil.from_pretrained(str(folder), local_files_only=True),
        tokenizer=tokenizer,
        num_image_tokens=settings.get("num_image_tokens") or (vision.image_size // vision.patch_size) ** 2,
        vision_feature_select_strategy=settings.get("vision_feature_select_strategy")
        or config.vision_feature_select_strategy,
        vision_aspect_ratio=settings.get("vision_aspect_ratio", "anyres_max_9"),
    )


class LocalJudge:
    """``answer(images, questions) -> texts`` by batched greedy generation of a local VLM."""

    OPTIONS: ClassVar[tuple[str, ...]] = ("batch_size", "max_new_tokens", "device", "dtype")

    def __init__(
        self,
        folder: Path,
        name: str = "judge",
        batch_size: int = 8,
        max_new_tokens: int = 256,  # the release's local backend
        device: str | torch.device | None = None,
        dtype: Any = None,
    ) -> None:
        from transformers import AutoConfig

        self.name, self.folder = name, Path(folder)
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        try:
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raw = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
            kind = raw.get("model_type", "?")
            hint = " (LLaVA-NeXT's layout: convert it, see docs/unifiedreward.md)" if "llava" in kind else ""
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            raise RewardWeightsError(
                f"{name}: {folder} holds a {kind!r} model{hint}; expected {EXPECTED} ({reason})"
            ) from None
        self.kind = config.model_type
        if self.kind not in SUPPORTED:
            raise RewardWeightsError(f"{name}: {folder} holds a {self.kind!r} model; expected {EXPECTED}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype is None:  # the release runs the judge in fp16; bf16 is the safer half type on current GPUs
            dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        if self.kind == "llava_onevision":
            from transformers import LlavaOnevisionForConditionalGeneration as Model
        else:
            from transformers import Qwen2_5_VLForConditionalGeneration as Model
        self.processor = build_processor(self.folder, config)
        try:
            self.model = Model.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
        except Exception as exc:
            raise RewardWeightsError(f"{name}: cannot load {folder} ({str(exc).splitlines()[0][:200]})") from None
        self.model.to(self.device).eval().requires_grad_(False)
        self.description = f"local {self.kind} from {self.folder}"

    def prompt(self, text: str) -> str:
        if self.kind == "llava_onevision":
            return chat_prompt(text)
        return chat_prompt(text, QWEN_IMAGE)

    @torch.no_grad()
    def answer(self, images: Sequence[Any], questions: Sequence[str]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch_images = list(images[start : start + self.batch_size])
            texts = [self.prompt(q) for q in questions[start : start + self.batch_size]]
            inputs = self.processor(images=batch_images, text=texts, return_tensors="pt", padding=True)
            inputs = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            generated = self.model.generate(
                **inputs, do_sample=False, max_new_tokens=self.max_new_tokens, pad_token_id=self._pad_id()
            )
            new = generated[:, inputs["input_ids"].shape[1] :]
            out.extend(self.processor.tokenizer.batch_decode(new, skip_special_tokens=True))
        if len(out) != len(images):  # pragma: no cover - generate returns one row per prompt
            raise JudgeError(f"{self.name}: {len(out)} answers for {len(images)} images")
        return out

    def _pad_id(self) -> int | None:
        tok = self.processor.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
