"""A tiny random HPSv3 in the official layout, built offline (no hub).

What a user has: the base Qwen2-VL-7B-Instruct folder (``config.json`` in transformers 4.4x's flat format,
``model.safetensors`` with 4.4x key names ``model.*`` / ``visual.*`` / ``lm_head.*``, a Qwen2 BPE tokenizer
with the chat specials, ``preprocessor_config.json``, ``chat_template.json``) and ``HPSv3.safetensors``: the
full ``Qwen2VLRewardModelBT`` state dict (same key names plus ``rm_head.*``, embeddings resized for the added
``<|Reward|>`` token). This module writes exactly that, with small sizes, from the main environment; the
official package (transformers 4.45) reads the same files in tests/hpsv3_official.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from flowbp.rewards.convert import bytes_to_unicode

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-7B-Instruct's chat_template.json (the processor's template, with the default system prompt)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
BPE_VOCAB = 700  # byte alphabet + merges learnt from HPSv3's instruction: ~740 tokens a text instead of ~2900 bytes
HIDDEN, BASE_VOCAB = 64, 800  # the base config's vocab is larger than the tokenizer, as Qwen2-VL's (152064)


def legacy_config() -> dict:
    n = BPE_VOCAB + len(SPECIALS)
    ids = {t: BPE_VOCAB + i for i, t in enumerate(SPECIALS)}
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"], "hidden_act": "silu", "hidden_size": HIDDEN,
        "initializer_range": 0.02, "intermediate_size": 96, "max_position_embeddings": 4096, "max_window_layers": 2,
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "float32",
        "use_cache": True, "use_sliding_window": False, "vocab_size": BASE_VOCAB,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # head_dim 16 -> 8 rotary pairs
        "vision_config": {"depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3,
                          "hidden_size": HIDDEN, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2},
        "_tokenizer_size": n,
    }


def write_tokenizer(folder: Path) -> None:
    """A byte-level Qwen2 BPE with Qwen2-VL's special tokens, as vocab.json + merges.txt (both versions read them).

    The merges are learnt on HPSv3's own text so the tiny model's sequences stay short.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from flowbp.rewards.hpsv3 import INSTRUCTION, PROMPT_WITH_SPECIAL_TOKEN

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = sorted(bytes_to_unicode().values())
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator([INSTRUCTION + PROMPT_WITH_SPECIAL_TOKEN + "You are a helpful assistant."] * 3, trainer)
    model = json.loads(bpe.to_str())["model"]
    assert len(model["vocab"]) == BPE_VOCAB
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {str(BPE_VOCAB + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True} for i, t in enumerate(SPECIALS)}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
        "model_max_length": 32768, "split_special_tokens": False, "clean_up_tokenization_spaces": False,
        "additional_special_tokens": SPECIALS[1:], "chat_template": CHAT_TEMPLATE,
    }, indent=1))


def to_legacy(key: str) -> str | None:
    """transformers 5 Qwen2VLForConditionalGeneration key -> the 4.4x name the official files use."""
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    if key.startswith("model.visual."):
        return "visual." + key.removeprefix("model.visual.")
    return key


def build_tiny_hpsv3(folder: Path, seed: int = 0) -> Path:
    """``folder/base`` (the Qwen2-VL folder) and ``folder/HPSv3.safetensors``; returns ``folder``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    base = folder / "base"
    base.mkdir(parents=True)
    cfg = legacy_config()
    n_tokens = cfg.pop("_tokenizer_size")
    (base / "config.json").write_text(json.dumps(cfg, indent=1))
    write_tokenizer(base)
    (base / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (base / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    }, indent=1))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(base)).eval()
    for p in model.parameters():  # larger than the 0.02-std init, so the tiny reward varies visibly with the image
        p.data.normal_(0, 0.2) if p.ndim > 1 else None
    sd = {to_legacy(k): v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    # HPSv3: <|Reward|> appended (id = tokenizer size), embeddings resized to it, the ranknet head (2 outputs)
    g = torch.Generator().manual_seed(seed + 1)
    full = dict(sd)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        full[key] = torch.cat([sd[key][:n_tokens], 0.2 * torch.randn(1, HIDDEN, generator=g)]).contiguous()
    shapes = {"rm_head.0": (1024, HIDDEN), "rm_head.3": (16, 1024), "rm_head.5": (2, 16)}
    for name, (out_f, in_f) in shapes.items():
        full[f"{name}.weight"] = torch.randn(out_f, in_f, generator=g) / in_f**0.5
        full[f"{name}.bias"] = 0.1 * torch.randn(out_f, generator=g)
    save_file(full, str(folder / "HPSv3.safetensors"), metadata={"format": "pt"})
    return folder
