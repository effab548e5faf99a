"""Tiny random reward models for the reward tests (no hub): CLIP folders, open_clip and BLIP state dicts."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from flowbp.rewards.convert import bytes_to_unicode

IMAGE, PATCH = 224, 32  # real input size, coarse patches: 7×7 + 1 tokens keeps every forward cheap


def byte_vocab() -> dict[str, int]:
    """Byte-level CLIP vocabulary: 256 byte characters, the same with </w>, then <|startoftext|>, <|endoftext|>."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def clip_tokenizer() -> CLIPTokenizer:
    tok = CLIPTokenizer(vocab=byte_vocab(), merges=[])
    tok.model_max_length = 77
    return tok


def clip_folder(folder: Path, seed: int = 0, logit_scale: float = 4.0, projection: int = 16) -> Path:
    """A saved random transformers CLIPModel (+ tokenizer) small enough to run in milliseconds."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": 514, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": 512,
                     "eos_token_id": 513, "pad_token_id": 513, "projection_dim": projection},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": IMAGE, "patch_size": PATCH, "projection_dim": projection},
        projection_dim=projection, logit_scale_init_value=logit_scale,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    return folder


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Photo-like test images in [0, 1]: low-frequency colour fields plus mild noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, h // 8 + 2, w // 8 + 2, generator=g)
    img = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    return (img + 0.03 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 1)


def assert_pixel_gradient_matches_finite_differences(
    reward: torch.nn.Module, images: torch.Tensor, prompts: list[str], direction_seed: int
) -> None:
    """Autograd's directional derivative of the summed score equals a central difference (float64)."""
    images = images.double().clamp(0.05, 0.95).requires_grad_(True)
    direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(direction_seed), dtype=torch.float64)
    reward(images, prompts).sum().backward()
    analytic = (images.grad * direction).sum()
    eps = 1e-5
    with torch.no_grad():
        forward, backward = reward(images + eps * direction, prompts), reward(images - eps * direction, prompts)
        numeric = (forward - backward).sum() / (2 * eps)
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-8), (analytic, numeric)
