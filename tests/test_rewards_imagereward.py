"""ImageReward: conversion of a tiny random checkpoint in BLIP's layout against a reference forward written
from BLIP's ViT (fused qkv) and med.py's BERT with cross-attention, then the reward end to end."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from rewards_tiny import IMAGE, PATCH, assert_pixel_gradient_matches_finite_differences, smooth_images

from flowbp.cli import main as cli_main
from flowbp.rewards import load_reward
from flowbp.rewards.convert import IMAGEREWARD_MEAN, IMAGEREWARD_STD, imagereward_config, imagereward_to_flowbp
from flowbp.rewards.imagereward import build_model
from flowbp.rewards.preprocess import TORCHVISION_CLIP
from flowbp.rewards.weights import RewardWeightsError

V_WIDTH, V_DEPTH, V_HEADS, V_MLP = 32, 2, 16, 64  # 16 heads: BLIP ViT-L's count, fixed by the converter
T_WIDTH, T_LAYERS, T_HEADS, T_FFN, MAX_POS = 24, 2, 4, 48, 40  # heads come from med_config.json
MLP_SIZES = [T_WIDTH, 20, 12, 8, 4, 1]  # stand-in for 768 → 1024 → 128 → 64 → 16 → 1
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cube", "on", "table", "two", "cats", "photo", "of"]
VOCAB = len(WORDS) + 2  # + [DEC], [ENC] as BLIP's init_tokenizer adds them
PROMPTS = ["a red cube on a table", "a photo of two cats"]


def blip_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def lin(p, out, inp):
        return {f"{p}.weight": r(out, inp), f"{p}.bias": r(out, scale=0.05)}

    def ln(p, w):
        return {f"{p}.weight": 1 + r(w, scale=0.1), f"{p}.bias": r(w, scale=0.1)}

    ve, te = "blip.visual_encoder", "blip.text_encoder"
    grid = IMAGE // PATCH
    sd = {f"{ve}.cls_token": r(1, 1, V_WIDTH), f"{ve}.pos_embed": r(1, grid * grid + 1, V_WIDTH),
          f"{ve}.patch_embed.proj.weight": r(V_WIDTH, 3, PATCH, PATCH, scale=0.05),
          f"{ve}.patch_embed.proj.bias": r(V_WIDTH, scale=0.05)}
    sd |= ln(f"{ve}.norm", V_WIDTH)
    for i in range(V_DEPTH):
        p = f"{ve}.blocks.{i}"
        sd |= ln(f"{p}.norm1", V_WIDTH) | ln(f"{p}.norm2", V_WIDTH) | lin(f"{p}.attn.qkv", 3 * V_WIDTH, V_WIDTH)
        sd |= lin(f"{p}.attn.proj", V_WIDTH, V_WIDTH) | lin(f"{p}.mlp.fc1", V_MLP, V_WIDTH)
        sd |= lin(f"{p}.mlp.fc2", V_WIDTH, V_MLP)
    sd |= {f"{te}.embeddings.word_embeddings.weight": r(VOCAB, T_WIDTH),
           f"{te}.embeddings.position_embeddings.weight": r(MAX_POS, T_WIDTH),
           f"{te}.embeddings.position_ids": torch.arange(MAX_POS)[None]}  # stored by older checkpoints: ignored
    sd |= ln(f"{te}.embeddings.LayerNorm", T_WIDTH)
    for i in range(T_LAYERS):
        p = f"{te}.encoder.layer.{i}"
        for att, kv_in in (("attention", T_WIDTH), ("crossattention", V_WIDTH)):
            sd |= lin(f"{p}.{att}.self.query", T_WIDTH, T_WIDTH) | lin(f"{p}.{att}.self.key", T_WIDTH, kv_in)
            sd |= lin(f"{p}.{att}.self.value", T_WIDTH, kv_in) | lin(f"{p}.{att}.output.dense", T_WIDTH, T_WIDTH)
            sd |= ln(f"{p}.{att}.output.LayerNorm", T_WIDTH)
        sd |= lin(f"{p}.intermediate.dense", T_FFN, T_WIDTH) | lin(f"{p}.output.dense", T_WIDTH, T_FFN)
        sd |= ln(f"{p}.output.LayerNorm", T_WIDTH)
    for idx, (a, b) in zip((0, 2, 4, 6, 7), itertools.pairwise(MLP_SIZES), strict=True):
        sd |= lin(f"mlp.layers.{idx}", b, a)
    sd |= {"blip.vision_proj.weight": r(8, V_WIDTH), "blip.text_proj.weight": r(8, T_WIDTH)}  # unused by the score
    return sd


# ------------------------------------------------------------------------ reference forward (BLIP's layout)


def ref_vit(sd, x):
    """BLIP's VisionTransformer: patch conv (bias), [cls] + pos_embed, pre-LN blocks with fused qkv, final norm."""
    ve = "blip.visual_encoder"
    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)  # noqa: E731
    x = F.conv2d(x, sd[f"{ve}.patch_embed.proj.weight"], sd[f"{ve}.patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    b = x.shape[0]
    x = torch.cat([sd[f"{ve}.cls_token"].expand(b, -1, -1), x], dim=1) + sd[f"{ve}.pos_embed"]
    for i in range(V_DEPTH):
        p = f"{ve}.blocks.{i}"
        h = ln(x, f"{p}.norm1")
        n, c = h.shape[1], h.shape[2]
        qkv = (h @ sd[f"{p}.attn.qkv.weight"].T + sd[f"{p}.attn.qkv.bias"]).reshape(b, n, 3, V_HEADS, c // V_HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (c // V_HEADS) ** -0.5).softmax(-1)
        h = (att @ v).transpose(1, 2).reshape(b, n, c)
        x = x + h @ sd[f"{p}.attn.proj.weight"].T + sd[f"{p}.attn.proj.bias"]
        h = F.gelu(ln(x, f"{p}.norm2") @ sd[f"{p}.mlp.fc1.weight"].T + sd[f"{p}.mlp.fc1.bias"])
        x = x + h @ sd[f"{p}.mlp.fc2.weight"].T + sd[f"{p}.mlp.fc2.bias"]
    return ln(x, f"{ve}.norm")


def ref_bert(sd, ids, mask, image_embeds):
    """med.py's BertModel in 'multimodal' mode: post-LN BERT layers, cross-attention to every image token."""
    te = "blip.text_encoder"
    lin = lambda t, p: t @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]  # noqa: E731
    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-12)  # noqa: E731

    def attend(p, h, memory, ext_mask):
        b, n, d = h.shape[0], h.shape[1], T_WIDTH // T_HEADS
        split = lambda t: t.reshape(b, t.shape[1], T_HEADS, d).transpose(1, 2)  # noqa: E731
        q = split(lin(h, f"{p}.self.query"))
        k, v = split(lin(memory, f"{p}.self.key")), split(lin(memory, f"{p}.self.value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        if ext_mask is not None:
            scores = scores + ext_mask
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, T_WIDTH)
        return ln(lin(ctx, f"{p}.output.dense") + h, f"{p}.output.LayerNorm")

    x = sd[f"{te}.embeddings.word_embeddings.weight"][ids] + sd[f"{te}.embeddings.position_embeddings.weight"][
        : ids.shape[1]]
    x = ln(x, f"{te}.embeddings.LayerNorm")
    ext = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(T_LAYERS):
        p = f"{te}.encoder.layer.{i}"
        x = attend(f"{p}.attention", x, x, ext)
        x = attend(f"{p}.crossattention", x, image_embeds, None)  # encoder_attention_mask all ones
        x = ln(lin(F.gelu(lin(x, f"{p}.intermediate.dense")), f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    return x


def ref_raw_score(sd, pixels, ids, mask):
    h = ref_bert(sd, ids, mask, ref_vit(sd, pixels))[:, 0]
    for idx in (0, 2, 4, 6, 7):  # dropouts between, no activations
        h = h @ sd[f"mlp.layers.{idx}.weight"].T + sd[f"mlp.layers.{idx}.bias"]
    return h.squeeze(-1)


@pytest.fixture
def ir_dir(tmp_path):
    folder = tmp_path / "imagereward"
    folder.mkdir()
    torch.save(blip_state_dict(), folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps({"num_attention_heads": T_HEADS, "hidden_size": T_WIDTH,
                                                         "layer_norm_eps": 1e-12, "add_cross_attention": True}))
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return folder


def test_imagereward_conversion_and_reward_match_blip_reference(ir_dir, tmp_path):
    sd = blip_state_dict()
    reward = load_reward("imagereward", path=ir_dir)
    tokens = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (2, 35) and tokens["input_ids"][0, 0] == WORDS.index("[CLS]")
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(WORDS), len(WORDS) + 1]
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        ours = reward.model.raw_score(pixels, tokens["input_ids"], tokens["attention_mask"])
        ref = ref_raw_score(sd, pixels, tokens["input_ids"], tokens["attention_mask"])
    assert (ours - ref).abs().max() <= 1e-5, (ours, ref)

    images = smooth_images(2, 200, 260, seed=4).requires_grad_(True)
    scores = reward(images, PROMPTS)
    with torch.no_grad():
        expected = (ref_raw_score(sd, TORCHVISION_CLIP(images), tokens["input_ids"], tokens["attention_mask"])
                    - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
    assert (scores.detach() - expected).abs().max() <= 1e-5
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert torch.equal(reward(images, PROMPTS), reward(images, PROMPTS))

    out = tmp_path / "ir-converted"
    assert cli_main(["convert-reward", "imagereward", "--src", str(ir_dir / "ImageReward.pt"), "--out", str(out)]) == 0
    with torch.no_grad():
        assert torch.allclose(load_reward("imagereward", path=out)(images, PROMPTS), scores.detach(), atol=1e-6)


def test_imagereward_missing_key_is_one_line(ir_dir):
    sd = blip_state_dict()
    del sd["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    torch.save(sd, ir_dir / "ImageReward.pt")
    with pytest.raises(RewardWeightsError) as err:
        load_reward("imagereward", path=ir_dir)
    msg = str(err.value)
    assert "\n" not in msg and "ImageReward.pt" in msg and "THUDM/ImageReward" in msg


def test_imagereward_v1_shapes_convert_to_the_blip_architecture():
    """At full size (meta tensors): ImageReward v1.0's key layout fills every parameter of the BLIP model."""
    e = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    ve, te = "blip.visual_encoder", "blip.text_encoder"
    sd = {f"{ve}.cls_token": e(1, 1, 1024), f"{ve}.pos_embed": e(1, 197, 1024),
          f"{ve}.patch_embed.proj.weight": e(1024, 3, 16, 16), f"{ve}.patch_embed.proj.bias": e(1024),
          f"{ve}.norm.weight": e(1024), f"{ve}.norm.bias": e(1024),
          f"{te}.embeddings.word_embeddings.weight": e(30524, 768), f"{te}.embeddings.position_embeddings.weight":
          e(512, 768), f"{te}.embeddings.LayerNorm.weight": e(768), f"{te}.embeddings.LayerNorm.bias": e(768)}
    for i in range(24):
        p = f"{ve}.blocks.{i}"
        for name, shape in (("norm1", (1024,)), ("norm2", (1024,)), ("attn.qkv", (3072, 1024)),
                            ("attn.proj", (1024, 1024)), ("mlp.fc1", (4096, 1024)), ("mlp.fc2", (1024, 4096))):
            sd |= {f"{p}.{name}.weight": e(*shape), f"{p}.{name}.bias": e(shape[0])}
    for i in range(12):
        p = f"{te}.encoder.layer.{i}"
        for att, kv in (("attention", 768), ("crossattention", 1024)):
            for name, shape in (("self.query", (768, 768)), ("self.key", (768, kv)), ("self.value", (768, kv)),
                                ("output.dense", (768, 768)), ("output.LayerNorm", (768,))):
                sd |= {f"{p}.{att}.{name}.weight": e(*shape), f"{p}.{att}.{name}.bias": e(shape[0])}
        for name, shape in (("intermediate.dense", (3072, 768)), ("output.dense", (768, 3072)),
                            ("output.LayerNorm", (768,))):
            sd |= {f"{p}.{name}.weight": e(*shape), f"{p}.{name}.bias": e(shape[0])}
    for idx, (a, b) in zip((0, 2, 4, 6, 7), itertools.pairwise([768, 1024, 128, 64, 16, 1]), strict=True):
        sd |= {f"mlp.layers.{idx}.weight": e(b, a), f"mlp.layers.{idx}.bias": e(b)}
    config = imagereward_config(sd)
    model = build_model(imagereward_to_flowbp(sd, config), config, torch.float32)  # strict: every key used
    assert config["vision"] | {"num_attention_heads": 16} == config["vision"]
    assert (config["vision"]["image_size"], config["vision"]["patch_size"], config["vision"]["layer_norm_eps"]) == (
        224, 16, 1e-6)
    assert (config["text"]["encoder_hidden_size"], config["text"]["num_attention_heads"]) == (1024, 12)
    assert config["mlp_sizes"] == [768, 1024, 128, 64, 16, 1]
    # ImageReward.pt holds ≈ 446.6 M fp32 parameters (1.79 GB), of which the unused BLIP projections
    # vision_proj (1024→256) and text_proj (768→256) are 459,264: the rest is exactly what the model needs
    n = sum(p.numel() for p in model.parameters())
    assert 446.0e6 < n + 459_264 < 447.0e6


def test_imagereward_pixel_gradient_matches_finite_differences(ir_dir):
    reward = load_reward("imagereward", path=ir_dir).double()
    assert_pixel_gradient_matches_finite_differences(reward, smooth_images(1, 240, 180, seed=8), PROMPTS[:1], 1)
