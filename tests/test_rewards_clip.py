"""PickScore, CLIPScore and LAION aesthetic on tiny random CLIP models: formulas, gradients, preprocessing parity."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from rewards_tiny import assert_pixel_gradient_matches_finite_differences, clip_folder, smooth_images
from transformers import CLIPModel, CLIPVisionModelWithProjection
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from flowbp.rewards import load_reward
from flowbp.rewards.preprocess import HF_CLIP, OPENAI_STD, TORCHVISION_CLIP, center_crop

PROMPTS = ["a red cube on a table", "two cats"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return clip_folder(tmp_path_factory.mktemp("clip"))


def _official_logits(model: CLIPModel, tok, pixel_values: torch.Tensor, prompts) -> torch.Tensor:
    """exp(logit_scale)·cos through transformers' own CLIPModel.forward (PickScore's README computation)."""
    t = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=pixel_values)
    return out.logits_per_image.diagonal()


def test_pickscore_score_gradients_determinism(clip_dir):
    reward = load_reward("pickscore", path=clip_dir)
    assert not any(p.requires_grad for p in reward.parameters())
    reward.train()
    assert not reward.training and not reward.model.training  # frozen: never dropout
    images = smooth_images(2, 96, 160).requires_grad_(True)
    scores = reward(images, PROMPTS)
    assert scores.shape == (2,)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        expected = _official_logits(model, reward.tokenizer, HF_CLIP(images), PROMPTS)
    assert torch.allclose(scores.detach(), expected, atol=1e-5), (scores, expected)
    scores.sum().backward()
    grad = images.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.equal(reward(images, PROMPTS), reward(images, PROMPTS))


def test_clipscore_is_100_times_clamped_cosine(clip_dir):
    reward = load_reward("clipscore", path=clip_dir)
    images = smooth_images(2, 224, 224, seed=3)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        cos = _official_logits(model, reward.tokenizer, HF_CLIP(images), PROMPTS) / model.logit_scale.exp()
        got = reward(images, PROMPTS)
    assert torch.allclose(got, 100 * cos.clamp(min=0), atol=1e-4)


# Measured on this machine (max / mean |Δ| in 1/255 units after undoing the normalisation): smooth images
# downsampled 512×384 → 1.14 / 0.29, 1024² → 1.00 / 0.27; upsampled 160×96 → 2.63 / 0.31, 64² → 3.0 / 0.32.
# Why not 0: PIL resamples in uint8, rounding after the horizontal and after the vertical pass (±0.5/255 each,
# the first amplified by the vertical kernel's L1 norm ≈ 1.2) and clipping the intermediate overshoot; torch
# keeps floats. Upsampling rounds twice per output pixel of a slowly varying signal, hence the larger max.
@pytest.mark.parametrize(("h", "w", "max_tol"), [(512, 384, 1.5), (1024, 1024, 1.5), (160, 96, 3.5), (97, 333, 3.5)])
def test_clip_preprocessing_matches_clipimageprocessor(clip_dir, h, w, max_tol):
    images = (smooth_images(1, h, w, seed=h) * 255).round() / 255  # exactly representable as uint8
    pil = Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    official = CLIPImageProcessorPil()(images=pil, return_tensors="pt")["pixel_values"]
    ours = HF_CLIP(images)
    assert ours.shape == official.shape == (1, 3, 224, 224)
    diff = (ours - official).abs() * torch.tensor(OPENAI_STD).view(1, 3, 1, 1) * 255
    assert diff.max() <= max_tol, diff.max()
    assert diff.mean() <= 0.35, diff.mean()
    # The scores agree: the rounding-sized pixel differences move the score by a small fraction of its
    # spread over 8 different 224² images (the model's input size, so the yardstick does not depend on h × w).
    # Measured 0.35 %–2.0 % for this random model (transformers 5.24 and 5.5, whose random inits differ),
    # whose patch-32 embedding makes it more pixel-sensitive than a real CLIP; 3 % is the bound.
    model = CLIPModel.from_pretrained(clip_dir).eval()
    reward = load_reward("pickscore", path=clip_dir)
    with torch.no_grad():
        ours_score = reward(images, PROMPTS[:1])
        official_score = _official_logits(model, reward.tokenizer, official, PROMPTS[:1])
        spread = reward(smooth_images(8, 224, 224, seed=1), PROMPTS[:1] * 8).std()
    assert (ours_score - official_score).abs() <= 0.03 * spread, (ours_score, official_score, spread)


def test_crop_offsets_follow_each_library():
    x = torch.arange(227.0).view(1, 1, 227, 1).expand(1, 1, 227, 227)
    # excess 3: transformers' (227 − 224) // 2 = 1; torchvision's round(1.5) = 2
    assert center_crop(x, 224, "floor")[0, 0, 0, 0] == 1
    assert center_crop(x, 224, "round")[0, 0, 0, 0] == 2
    img = torch.rand(1, 3, 300, 301)
    assert TORCHVISION_CLIP(img).shape == HF_CLIP(img).shape == (1, 3, 224, 224)


def test_aesthetic_is_mlp_of_normalised_embedding(tmp_path):
    folder = clip_folder(tmp_path / "aesthetic")
    torch.manual_seed(1)
    sizes = [16, 24, 12, 8, 4, 1]  # tiny stand-in for 768 → 1024 → 128 → 64 → 16 → 1
    layers = [torch.nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
    sd = OrderedDict()
    for idx, layer in zip((0, 2, 4, 6, 7), layers, strict=True):
        sd[f"layers.{idx}.weight"], sd[f"layers.{idx}.bias"] = layer.weight.detach(), layer.bias.detach()
    torch.save(sd, folder / "sac+logos+ava1-l14-linearMSE.pth")
    reward = load_reward("aesthetic", path=folder)
    images = smooth_images(2, 256, 192, seed=5).requires_grad_(True)
    scores = reward(images, ["ignored", "ignored"])
    vision = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    with torch.no_grad():
        x = F.normalize(vision(pixel_values=TORCHVISION_CLIP(images)).image_embeds, dim=-1)
        for layer in layers:  # no activations between the layers (dropouts only), as the LAION code
            x = layer(x)
    assert torch.allclose(scores.detach(), x.squeeze(-1), atol=1e-5)
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_weighted_sum_of_real_rewards(clip_dir):
    paths = {"pickscore": clip_dir, "clipscore": clip_dir}
    images = smooth_images(2, 128, 128, seed=7)
    with torch.no_grad():
        pick = load_reward("pickscore", paths=paths)(images, PROMPTS)
        clip = load_reward("clipscore", paths=paths)(images, PROMPTS)
        combo = load_reward("pickscore-0.5*clipscore", paths=paths)
        assert torch.allclose(combo(images, PROMPTS), pick - 0.5 * clip, atol=1e-5)
        parts = combo.parts(images, PROMPTS)
    assert torch.allclose(parts["clipscore"], clip, atol=1e-6)
    mixed = load_reward({"pickscore": 2.0, "digit-ink": 1.0}, paths=paths)
    with torch.no_grad():
        assert torch.allclose(mixed(images, PROMPTS), 2 * pick + load_reward("digit-ink")(images, PROMPTS), atol=1e-5)


def test_pixel_gradient_matches_finite_differences(clip_dir):
    """The gradient is the derivative of the score, through resize, crop, clamp and the model (float64)."""
    reward = load_reward("pickscore", path=clip_dir).double()
    assert_pixel_gradient_matches_finite_differences(reward, smooth_images(1, 120, 200, seed=9), PROMPTS[:1], 0)


def test_half_precision_weights_score_close_to_float32(clip_dir):
    images = smooth_images(2, 96, 96, seed=11).requires_grad_(True)
    full = load_reward("pickscore", path=clip_dir)(images, PROMPTS)
    half = load_reward("pickscore", path=clip_dir, dtype="bf16")
    assert half.model.text_projection.weight.dtype == torch.bfloat16
    scores = half(images, PROMPTS)
    assert scores.dtype == torch.float32 and torch.allclose(scores, full, atol=0.05 * full.abs().max().item())
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="dtype: expected one of"):
        load_reward("pickscore", path=clip_dir, dtype="int8")


def test_clipscore_keeps_the_end_token_on_long_prompts_unlike_torchmetrics(clip_dir):
    """> 77 tokens: flowbp truncates with the tokenizer (end token kept); torchmetrics slices ids[:77] (dropped).

    torchmetrics' ``_get_features`` (written from its code): ``processor(text, padding=True)`` without
    truncation, then ``input_ids[..., :max_position_embeddings]``. Short prompts give identical ids.
    """
    reward = load_reward("clipscore", path=clip_dir)
    tok = reward.tokenizer
    long_prompt = "a red cube " * 40  # 120 words ≫ 75 tokens
    ours = tok([long_prompt], padding="max_length", truncation=True, max_length=77)["input_ids"][0]
    sliced = tok([long_prompt], padding=True)["input_ids"][0][:77]
    assert len(ours) == len(sliced) == 77
    assert ours[0] == sliced[0] == tok.bos_token_id
    assert ours[:76] == sliced[:76]  # same 75 prompt tokens after the start token
    assert ours[76] == tok.eos_token_id and sliced[76] != tok.eos_token_id  # the one difference
    short = "two cats"
    assert tok([short], padding=True, truncation=True, max_length=77)["input_ids"] == tok([short], padding=True)[
        "input_ids"
    ]
