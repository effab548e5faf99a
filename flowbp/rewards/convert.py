"""Checkpoint conversions: open_clip (HPSv2.1) → transformers ``CLIPModel``; ImageReward → BLIP classes.

Both are pure key renames (plus the fused-attention split and projection transposes for open_clip);
the architecture sizes are read from tensor shapes, except the numbers of attention heads, which a
state dict does not record (ViT-H-14: 16 + 16; BLIP ViT-L: 16; ImageReward's BERT: 12, from its
``med_config.json``).
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# --------------------------------------------------------------------------------------- open_clip


def _layer_count(sd: Mapping[str, Any], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    if not found:
        raise KeyError(f"{prefix}0.*")
    return max(found) + 1


def _need(sd: Mapping[str, Any], key: str) -> torch.Tensor:
    if key not in sd:
        raise KeyError(key)
    return sd[key]


def openclip_clip_config(
    sd: Mapping[str, torch.Tensor],
    vision_heads: int = 16,
    text_heads: int = 16,
    hidden_act: str = "gelu",
    bos_token_id: int = 49406,
    eos_token_id: int = 49407,
) -> dict[str, Any]:
    """A transformers ``CLIPConfig`` dict for an open_clip ``CLIP`` state dict (sizes read from shapes).

    Defaults are ViT-H-14's (HPSv2): exact GELU, 16 heads in both towers, LayerNorm eps 1e-5.
    """
    conv = _need(sd, "visual.conv1.weight")
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((_need(sd, "visual.positional_embedding").shape[0] - 1) ** 0.5)
    proj = _need(sd, "visual.proj")
    tok = _need(sd, "token_embedding.weight")
    text_proj = _need(sd, "text_projection")
    if proj.shape[1] != text_proj.shape[1]:
        raise ValueError(f"image projection dim {proj.shape[1]} differs from text projection dim {text_proj.shape[1]}")
    vision = {
        "hidden_size": width,
        "intermediate_size": _need(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0],
        "num_hidden_layers": _layer_count(sd, "visual.transformer.resblocks."),
        "num_attention_heads": vision_heads,
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "projection_dim": proj.shape[1],
    }
    text = {
        "vocab_size": tok.shape[0],
        "hidden_size": tok.shape[1],
        "intermediate_size": _need(sd, "transformer.resblocks.0.mlp.c_fc.weight").shape[0],
        "num_hidden_layers": _layer_count(sd, "transformer.resblocks."),
        "num_attention_heads": text_heads,
        "max_position_embeddings": _need(sd, "positional_embedding").shape[0],
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "projection_dim": text_proj.shape[1],
        "bos_token_id": bos_token_id,
        # pooling at the first eos id = open_clip's text.argmax(-1) (EOT is the largest id; see tests)
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
    }
    return {"vision_config": vision, "text_config": text, "projection_dim": proj.shape[1]}


def _blocks(sd: Mapping[str, torch.Tensor], src: str, dst: str, n: int) -> dict[str, torch.Tensor]:
    """Pre-LN residual blocks: open_clip ``resblocks.i`` → transformers ``layers.i`` (q, k, v split)."""
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        s, d = f"{src}{i}.", f"{dst}{i}."
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[d + b + ".weight"] = _need(sd, s + a + ".weight")
            out[d + b + ".bias"] = _need(sd, s + a + ".bias")
        # nn.MultiheadAttention stacks [W_q; W_k; W_v] along dim 0
        for kind in ("weight", "bias"):
            q, k, v = _need(sd, f"{s}attn.in_proj_{kind}").chunk(3, dim=0)
            out[f"{d}self_attn.q_proj.{kind}"] = q
            out[f"{d}self_attn.k_proj.{kind}"] = k
            out[f"{d}self_attn.v_proj.{kind}"] = v
    return out


def openclip_to_transformers(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename an open_clip ``CLIP`` state dict to transformers ``CLIPModel`` keys (KeyError on a missing key)."""
    v, t = "vision_model.", "text_model."
    out = {
        v + "embeddings.patch_embedding.weight": _need(sd, "visual.conv1.weight"),
        v + "embeddings.class_embedding": _need(sd, "visual.class_embedding"),
        v + "embeddings.position_embedding.weight": _need(sd, "visual.positional_embedding"),
        v + "pre_layrnorm.weight": _need(sd, "visual.ln_pre.weight"),
        v + "pre_layrnorm.bias": _need(sd, "visual.ln_pre.bias"),
        v + "post_layernorm.weight": _need(sd, "visual.ln_post.weight"),
        v + "post_layernorm.bias": _need(sd, "visual.ln_post.bias"),
        # open_clip multiplies x @ proj; nn.Linear computes x @ W.T, so W = proj.T (square text_projection
        # would load silently without the transpose: the conversion test catches it)
        "visual_projection.weight": _need(sd, "visual.proj").t(),
        t + "embeddings.token_embedding.weight": _need(sd, "token_embedding.weight"),
        t + "embeddings.position_embedding.weight": _need(sd, "positional_embedding"),
        t + "final_layer_norm.weight": _need(sd, "ln_final.weight"),
        t + "final_layer_norm.bias": _need(sd, "ln_final.bias"),
        "text_projection.weight": _need(sd, "text_projection").t(),
        "logit_scale": _need(sd, "logit_scale").reshape(()),
    }
    out.update(_blocks(sd, "visual.transformer.resblocks.", v + "encoder.layers.",
                       config["vision_config"]["num_hidden_layers"]))
    out.update(_blocks(sd, "transformer.resblocks.", t + "encoder.layers.", config["text_config"]["num_hidden_layers"]))
    return {k: x.contiguous() for k, x in out.items()}


def build_clip_model(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], dtype: torch.dtype = torch.float32):
    """A transformers ``CLIPModel`` holding converted open_clip weights (no random init of the big tensors)."""
    from accelerate import init_empty_weights
    from transformers import CLIPConfig, CLIPModel

    hf_config = CLIPConfig(text_config=dict(config["text_config"]), vision_config=dict(config["vision_config"]),
                           projection_dim=config["projection_dim"])
    with init_empty_weights():  # parameters on "meta"; buffers (position ids) real
        model = CLIPModel(hf_config)
    converted = {k: x.to(dtype) for k, x in openclip_to_transformers(sd, config).items()}
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte → printable character table (the first 512 entries of every CLIP vocabulary)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def clip_vocab_from_bpe(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of transformers' CLIPTokenizer from open_clip's ``bpe_simple_vocab_16e6.txt.gz``.

    The same construction as open_clip's ``SimpleTokenizer``: the 256 byte characters, the same with
    ``</w>``, one token per merge (first header line skipped; at most 48,894 merges), then
    ``<|startoftext|>`` and ``<|endoftext|>`` (open_clip's ids 49406 / 49407 for the real file).
    """
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [line for line in lines[1 : 49152 - 256 - 2 + 1] if line.strip()]
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


# ------------------------------------------------------------------------------------- ImageReward

#: ImageReward v1.0's standardisation of the MLP output (THUDM/ImageReward ``ImageReward.py``).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072

_BLIP_VISION_RENAMES = (
    ("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.", "self_attn.qkv."),
    ("attn.proj.", "self_attn.projection."), ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),
)
# Keys of the ImageReward checkpoint that the score does not use.
_IMAGEREWARD_UNUSED = re.compile(
    r"^(blip\.(vision_proj|text_proj|itm_head)\.|.*position_ids$|blip\.text_encoder\.pooler\.)"
)


def imagereward_config(
    sd: Mapping[str, torch.Tensor], vision_heads: int = 16, med_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Sizes of an ImageReward checkpoint: BLIP ViT (eps 1e-6), BERT with cross-attention (eps 1e-12), MLP."""
    med = dict(med_config or {})
    ve, te = "blip.visual_encoder.", "blip.text_encoder."
    patch_w = _need(sd, ve + "patch_embed.proj.weight")
    n_pos = _need(sd, ve + "pos_embed").shape[1]
    word = _need(sd, te + "embeddings.word_embeddings.weight")
    mlp_in = [_need(sd, f"mlp.layers.{i}.weight").shape for i in (0, 2, 4, 6, 7)]
    vision = {
        "hidden_size": patch_w.shape[0],
        "intermediate_size": _need(sd, ve + "blocks.0.mlp.fc1.weight").shape[0],
        "num_hidden_layers": _layer_count(sd, ve + "blocks."),
        "num_attention_heads": vision_heads,
        "image_size": round((n_pos - 1) ** 0.5) * patch_w.shape[-1],
        "patch_size": patch_w.shape[-1],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
    }
    text = {
        "vocab_size": word.shape[0],
        "hidden_size": word.shape[1],
        "encoder_hidden_size": _need(sd, te + "encoder.layer.0.crossattention.self.key.weight").shape[1],
        "intermediate_size": _need(sd, te + "encoder.layer.0.intermediate.dense.weight").shape[0],
        "num_hidden_layers": _layer_count(sd, te + "encoder.layer."),
        "num_attention_heads": int(med.get("num_attention_heads", 12)),
        "max_position_embeddings": _need(sd, te + "embeddings.position_embeddings.weight").shape[0],
        "hidden_act": str(med.get("hidden_act", "gelu")),
        "layer_norm_eps": float(med.get("layer_norm_eps", 1e-12)),
        "pad_token_id": int(med.get("pad_token_id", 0)),
        "is_decoder": True,  # transformers builds the cross-attention modules only for decoders
        "bos_token_id": None,  # unused by the encoder forward; BLIP's defaults (30522, 102) only fit the real vocab
        "sep_token_id": None,
    }
    return {
        "vision": vision,
        "text": text,
        "mlp_sizes": [int(s[1]) for s in mlp_in] + [int(mlp_in[-1][0])],
        "mean": IMAGEREWARD_MEAN,
        "std": IMAGEREWARD_STD,
        "max_length": 35,
    }


def imagereward_to_flowbp(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename ImageReward ``blip.*`` / ``mlp.*`` keys to :class:`~flowbp.rewards.imagereward.ImageRewardModel`'s."""
    out: dict[str, torch.Tensor] = {}
    ve = "blip.visual_encoder."
    out["vision_model.embeddings.class_embedding"] = _need(sd, ve + "cls_token")
    out["vision_model.embeddings.position_embedding"] = _need(sd, ve + "pos_embed")
    for kind in ("weight", "bias"):
        out[f"vision_model.embeddings.patch_embedding.{kind}"] = _need(sd, f"{ve}patch_embed.proj.{kind}")
        out[f"vision_model.post_layernorm.{kind}"] = _need(sd, f"{ve}norm.{kind}")
    for i in range(config["vision"]["num_hidden_layers"]):
        for a, b in _BLIP_VISION_RENAMES:
            for kind in ("weight", "bias"):
                out[f"vision_model.encoder.layers.{i}.{b}{kind}"] = _need(sd, f"{ve}blocks.{i}.{a}{kind}")
    for key, value in sd.items():
        if key.startswith("blip.text_encoder.") and not _IMAGEREWARD_UNUSED.match(key):
            out["text_encoder." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp.layers."):
            out[key] = value
    return {k: x.contiguous() for k, x in out.items()}
