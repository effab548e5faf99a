"""``hpsv3``: HPSv3 (Ma et al., 2025), Qwen2-VL-7B-Instruct with a reward head, differentiable in the pixels.

Written from the official package (PyPI ``hpsv3`` 1.0.0: ``inference.py``, ``train.py``
``create_model_and_processor``, ``model/qwen2vl_trainer.py`` ``Qwen2VLRewardModelBT``,
``dataset/utils.py`` ``fetch_image``, ``dataset/data_collator_qwen.py``) and checked against it
(tests/test_rewards_hpsv3.py runs the package itself on a tiny model in the official layout). Its
``reward()`` runs under ``inference_mode`` and changed argument order between versions, so the model
is called directly here:

- image: resized to ``smart_resize(h, w, 28, min_pixels=max_pixels=256·28·28)`` (448×448 for square
  images) by PIL bicubic in the official inferencer; here antialiased bicubic on the float tensor,
  clamped to [0, 1] as PIL's uint8 output is (:mod:`flowbp.rewards.preprocess`); then Qwen2-VL's image
  processor: OpenAI CLIP mean/std, each image repeated over the 2 temporal patch slots, 14-px patches
  ordered in 2×2 merge groups;
- text: one user message (the image, then ``INSTRUCTION`` with the prompt + ``"\\nPlease provide the
  overall ratings of this image: <|Reward|>\\n\\nEND\\n"``) through the base model's chat template with
  the generation prompt; ``<|image_pad|>`` expanded to one token per merged patch; right padding;
- model: image features scattered into the token embeddings; the language model with **sequential**
  positions 0…L−1 on all three M-RoPE axes (the official forward calls the decoder without
  ``position_ids``, so Qwen2-VL's multimodal rope indices are never used); the ``rm_head``
  (Linear(h,1024)→ReLU→Dropout→Linear(1024,16)→ReLU→Linear(16,2)) in float32 on the hidden state at
  ``<|Reward|>``; the score is μ, output 0 of (μ, σ).

Scale: μ of a (μ, σ) head trained with an uncertainty-aware ranking loss, unbounded; the instruction
asks for a 0–10 rating. HPSv3's README benchmark (PyPI 1.0.0) reports per-model averages from −0.24
(SD2) and 5.31 (SD3 Medium) to 10.43 (FLUX.1-dev) and 10.55 (Kolors); not measured here (no real
weights on this machine).

Weights: ``HPSv3.safetensors`` (hf.co/MizzenAI/HPSv3, the full state dict in transformers 4.4x key
names) and the base model's config and tokenizer (hf.co/Qwen/Qwen2-VL-7B-Instruct: ``config.json``,
tokenizer files, ``chat_template.json``, ``preprocessor_config.json``; its weights are not needed, the
checkpoint holds them all). Put both in one folder (or the base files in its ``base/`` sub-folder); a
``.pt``/``.pth`` checkpoint is converted once with ``flowbp convert-reward hpsv3``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowbp.rewards.digits import _FrozenReward
from flowbp.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, normalize, resize
from flowbp.rewards.weights import HubSource, RewardWeightsError, hub_snapshot, locate

CHECKPOINT_FILES = ("HPSv3.safetensors", "model.safetensors")
HPSV3_HUB = HubSource("MizzenAI/HPSv3", ("HPSv3.safetensors",))
BASE_HUB = HubSource("Qwen/Qwen2-VL-7B-Instruct", ("*.json", "*.txt", "*.jinja"))
REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD = "<|image_pad|>"
#: min_pixels = max_pixels of the official prepare_batch: every image becomes ≈ 256 merged tokens
PIXELS = 256 * 28 * 28

# hpsv3/dataset/data_collator_qwen.py, verbatim
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: E501, W291
PROMPT_WITH_SPECIAL_TOKEN = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = PIXELS,
                 max_pixels: int = PIXELS) -> tuple[int, int]:
    """hpsv3's ``smart_resize``: sides divisible by ``factor``, pixel count within [min, max], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"hpsv3: aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(images: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """Qwen2-VL's image processor layout: B×3×H×W normalised -> (B·gh·gw)×(3·temporal·patch²) rows.

    Each image fills both temporal slots; rows run over 2×2 merge groups, within a group row-major.
    """
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images[:, None].expand(b, temporal, c, h, w)
    x = x.reshape(b, 1, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # the official (0, 3, 6, 4, 7, 2, 1, 5, 8) after a batch axis
    return x.reshape(b * gh * gw, c * temporal * patch * patch)


def rm_head(hidden: int, output_dim: int = 2) -> nn.Sequential:
    """The ``ranknet`` head without ``rm_head_kwargs`` (HPSv3_7B.yaml): keys rm_head.{0,3,5}."""
    return nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, output_dim))


class HPSv3Reward(_FrozenReward):
    """μ of HPSv3 for (image, prompt) pairs, differentiable with respect to the images."""

    def __init__(self, model: nn.Module, head: nn.Module, tokenizer: Any, chat_template: str,
                 image_mean: Sequence[float] = OPENAI_MEAN, image_std: Sequence[float] = OPENAI_STD,
                 patch: int = 14, merge: int = 2, temporal: int = 2) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)  # transformers Qwen2VLModel: .visual + .language_model
        self.head = head.float().eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.mean, self.std = tuple(image_mean), tuple(image_std)
        self.patch, self.merge, self.temporal = patch, merge, temporal
        self.reward_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_id = model.config.image_token_id

    def text(self, prompt: str) -> str:
        """The chat-formatted text of one prompt, before the image tokens are expanded."""
        content = [{"type": "image"}, {"type": "text", "text": INSTRUCTION.format(text_prompt=prompt)
                                       + PROMPT_WITH_SPECIAL_TOKEN}]
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True, chat_template=self.chat_template)

    def tokens(self, prompts: Sequence[str], image_tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
        texts = [self.text(p).replace(IMAGE_PAD, IMAGE_PAD * image_tokens, 1) for p in prompts]
        enc = self.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}

    def pixel_values(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Official preprocessing, differentiably: (patch rows, grid_thw)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected B×3×H×W in [0, 1], got shape {tuple(images.shape)}")
        h, w = smart_resize(*images.shape[-2:])
        images = images if images.is_floating_point() else images.float()
        x = normalize(resize(images, h, w, clamp=True), self.mean, self.std)
        grid = torch.tensor([[1, h // self.patch, w // self.patch]] * images.shape[0], device=images.device)
        return patchify(x, self.patch, self.merge, self.temporal), grid

    def outputs(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """B×2 (μ, σ) as the official ``Qwen2VLRewardModelBT`` returns them."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"prompts: got {len(prompts)} prompts for {images.shape[0]} images")
        pixels, grid = self.pixel_values(images)
        visual, lm = self.model.visual, self.model.language_model
        image_embeds = visual(pixels.to(next(visual.parameters()).dtype), grid_thw=grid).pooler_output
        per_image = int(grid[0].prod()) // self.merge**2
        tok = self.tokens(prompts, per_image, images.device)
        ids = tok["input_ids"]
        embeds = lm.embed_tokens(ids)
        image_mask = (ids == self.image_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
        # sequential positions on all three rope axes, as the official forward leaves position_ids unset
        positions = torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1).expand(3, ids.shape[0], -1)
        hidden = lm(inputs_embeds=embeds, attention_mask=tok["attention_mask"], position_ids=positions,
                    use_cache=False).last_hidden_state
        logits = self.head(hidden.to(next(self.head.parameters()).dtype))  # float32 head, as the official
        reward_mask = ids == self.reward_id
        if not bool((reward_mask.sum(1) == 1).all()):
            raise RuntimeError("hpsv3: every text must hold exactly one <|Reward|> token")
        return logits[reward_mask].view(ids.shape[0], -1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.outputs(images, prompts)[:, 0].to(images.dtype)


# ------------------------------------------------------------------------------------------ loading


def _base_files(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (
        (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
    )


def _accept(p: Path) -> bool:
    return p.is_file() or (p.is_dir() and any((p / f).is_file() for f in CHECKPOINT_FILES))


def rename_key(key: str) -> str | None:
    """A checkpoint key (transformers 4.4x names, or 5.x) -> this module's name; None for the unused lm_head."""
    if key.startswith("rm_head."):
        return "head." + key.removeprefix("rm_head.")
    if key.startswith("lm_head."):
        return None
    for old, new in (("model.language_model.", "model.language_model."), ("model.visual.", "model.visual."),
                     ("visual.", "model.visual."), ("model.", "model.language_model.")):
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


def chat_template_of(folder: Path, tokenizer: Any) -> str:
    """The processor's template (chat_template.json / .jinja), else the tokenizer's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text())["chat_template"]
    template = getattr(tokenizer, "chat_template", None)
    if not template or IMAGE_PAD not in template:
        raise RewardWeightsError(f"hpsv3: {folder} has no Qwen2-VL chat template (chat_template.json); expected the "
                                 f"files of hf.co/{BASE_HUB.repo_id}")
    return template


def load_hpsv3(path: str | Path | None = None, allow_download: bool = False, dtype: Any = None,
               base: str | Path | None = None, **_: Any) -> HPSv3Reward:
    """``hpsv3``: ``HPSv3.safetensors`` + the Qwen2-VL-7B-Instruct config/tokenizer (same folder, ``base/``, or hub)."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLModel

    from flowbp.rewards.clip import _dtype

    expected = "HPSv3.safetensors (hf.co/MizzenAI/HPSv3) or a folder holding it (`flowbp convert-reward hpsv3` for .pt)"
    target = locate("hpsv3", path, accept=_accept, hub=[HPSV3_HUB], allow_download=allow_download, expected=expected)
    file = target if target.is_file() else next(target / f for f in CHECKPOINT_FILES if (target / f).is_file())
    if file.suffix != ".safetensors":
        raise RewardWeightsError(f"hpsv3: {file} is not a .safetensors file; convert it once with "
                                 f"`flowbp convert-reward hpsv3 --src {file} --out DIR`")
    candidates = [Path(base)] if base is not None else [file.parent, file.parent / "base"]
    base_dir = next((c for c in candidates if _base_files(c)), None)
    if base_dir is None and base is None:
        cached = hub_snapshot(BASE_HUB, allow_download)
        base_dir = cached if cached is not None and _base_files(cached) else None
    if base_dir is None:
        raise RewardWeightsError(
            f"hpsv3: no Qwen2-VL base files (config.json + tokenizer) in {' or '.join(map(str, candidates))} nor in "
            f"the hub cache of hf.co/{BASE_HUB.repo_id}; expected its config.json, tokenizer files and "
            "chat_template.json (its weights are not needed)"
        )
    try:
        with safe_open(str(file), "pt") as f:
            keys = list(f.keys())
            embed_key = next(k for k in keys if k.endswith("embed_tokens.weight"))
            vocab, hidden = f.get_slice(embed_key).get_shape()
            stored = f.get_slice(embed_key).get_dtype()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RewardWeightsError(f"hpsv3: cannot read {file} ({first}); expected {expected}") from exc
    weight_dtype = _dtype(dtype) if dtype is not None else {"BF16": torch.bfloat16, "F16": torch.float16}.get(
        stored, torch.float32)
    config = Qwen2VLConfig.from_pretrained(str(base_dir))
    text_config = getattr(config, "text_config", config)
    text_config.vocab_size = vocab  # resized for <|Reward|> by HPSv3's training
    if text_config.hidden_size != hidden:
        raise RewardWeightsError(f"hpsv3: {file} has hidden size {hidden}, the base config {base_dir} "
                                 f"{text_config.hidden_size}: checkpoint and base model do not match")
    config._attn_implementation = "sdpa"  # HPSv3_7B.yaml: disable_flash_attn2
    with init_empty_weights(include_buffers=False):  # no 7B random init; rotary buffers are computed
        model = Qwen2VLModel(config)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    head = rm_head(hidden, 2)
    sd = load_file(str(file))
    state: dict[str, dict[str, torch.Tensor]] = {"model": {}, "head": {}}
    for key, value in sd.items():
        name = rename_key(key)
        if name is None:
            continue
        owner, _, rest = name.partition(".")
        if owner not in state:
            raise RewardWeightsError(f"hpsv3: unexpected key {key!r} in {file}; expected {expected}")
        state[owner][rest] = value.to(weight_dtype if owner == "model" else torch.float32)
    try:
        model.load_state_dict(state["model"], strict=True, assign=True)
        head.load_state_dict(state["head"], strict=True)
    except RuntimeError as exc:
        first = re.sub(r"\s+", " ", str(exc))[:300]
        raise RewardWeightsError(f"hpsv3: {file} does not fit Qwen2-VL + the HPSv3 head ({first})") from exc
    reward_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    if reward_id != vocab - 1:
        raise RewardWeightsError(f"hpsv3: <|Reward|> got id {reward_id} from the tokenizer of {base_dir}, but the "
                                 f"checkpoint's embeddings end at {vocab - 1}: tokenizer and checkpoint do not match")
    pre = json.loads((base_dir / "preprocessor_config.json").read_text()) if (
        base_dir / "preprocessor_config.json").is_file() else {}
    return HPSv3Reward(
        model, head, tokenizer, chat_template_of(base_dir, tokenizer),
        image_mean=pre.get("image_mean", OPENAI_MEAN), image_std=pre.get("image_std", OPENAI_STD),
        patch=pre.get("patch_size", 14), merge=pre.get("merge_size", 2), temporal=pre.get("temporal_patch_size", 2),
    )


def convert_checkpoint(src: Path, out: Path, dtype: torch.dtype | None = None) -> Mapping[str, torch.Tensor]:
    """A ``.pt``/``.pth`` HPSv3 checkpoint (``{"model": sd}`` or a plain sd) -> ``out/HPSv3.safetensors``.

    ``dtype`` casts the Qwen2-VL weights; the ``rm_head`` stays float32 as the official model keeps it.
    """
    from safetensors.torch import save_file

    from flowbp.rewards.weights import load_state_dict

    sd = load_state_dict(src, "hpsv3", "an HPSv3 checkpoint (.pt/.pth state dict)")
    if isinstance(sd.get("model"), dict):
        sd = sd["model"]
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() and not k.startswith("rm_head.") else v)
        .contiguous()
        for k, v in sd.items()
        if isinstance(v, torch.Tensor)
    }
    if not any(k.startswith("rm_head.") for k in tensors):
        raise RewardWeightsError(f"hpsv3: {src} has no rm_head.* tensors; expected an HPSv3 checkpoint")
    save_file(tensors, str(out / "HPSv3.safetensors"), metadata={"format": "pt"})
    return tensors
