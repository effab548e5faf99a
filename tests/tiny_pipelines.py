"""Tiny random-weight diffusers pipelines built offline, for the real-backbone tests.

No hub access: every component is built in code from a small config, tokenizers from in-memory
vocabularies (shared/reference/offline_diffusers.md), then the pipeline is saved with
``save_pretrained`` so tests load it back through the same path a user's folder takes. Builders are
deterministic (seeded) and every module is put in ``eval()`` mode (a fresh T5 has dropout on).

Use through the session-scoped fixtures in ``conftest.py`` (each pipeline is built once per run).
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowbp.dryrun import sd3_inputs
from flowbp.rewards.convert import bytes_to_unicode

TINY_RESOLUTION = 32


def _byte_chars() -> list[str]:
    """GPT-2's 256 printable stand-ins for the bytes (the alphabet of a byte-level BPE), in id order."""
    return list(bytes_to_unicode().values())


def tiny_clip_tokenizer():
    """A byte-level CLIP tokenizer with no merges: 514 ids, model_max_length 77."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = 77  # the default (1e30) overflows SD3/FLUX prompt encoding
    return tok


def tiny_t5_tokenizer(max_length: int = 512):
    """A unigram T5 tokenizer over single characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,'-"]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = max_length
    return tok


def _clip_text_model(seed: int, projection: bool = True):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=514,
        projection_dim=32, hidden_act="gelu", max_position_embeddings=77,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _t5_model(seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def _autoencoder_kl(seed: int, scaling_factor: float = 1.5305, shift_factor: float = 0.0609):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1, latent_channels=4, norm_num_groups=1,
        use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    ).eval()


def build_tiny_sd3(directory: str | Path, seed: int = 0, dual_attention_layers: tuple[int, ...] = (0,)):
    """A tiny StableDiffusion3Pipeline (VAE factor 2, patch 2: resolution multiple of 4), saved to ``directory``.

    Returns the in-memory pipeline (float32, eval mode). The transformer has dual-attention and
    qk-norm layers like SD3.5-M so the LoRA targets and the dual-attention path are exercised;
    ``dual_attention_layers=()`` gives SD3.5-Large's layout (qk-norm, no dual attention).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16,
        dual_attention_layers=dual_attention_layers, qk_norm="rms_norm",
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_autoencoder_kl(seed + 1),
        text_encoder=_clip_text_model(seed + 2),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=_clip_text_model(seed + 3),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=_t5_model(seed + 4),
        tokenizer_3=tiny_t5_tokenizer(),
    )
    pipe.save_pretrained(str(directory))
    return pipe


#: the tiny SD3's prompt length: its CLIP pads to 77 tokens, its T5 to the pipeline's default 256
TINY_SD3_TEXT_LEN = 77 + 256


#: the tiny SD3 transformer's forward inputs as empty tensors (an ``Architecture.make_inputs``)
tiny_sd3_inputs = sd3_inputs(latent_channels=4, vae_factor=2, text_dim=32, pooled_dim=64)


def tiny_sd3_architecture():
    """flowbp.dryrun's SD3 architecture with the tiny pipeline's shapes, for the estimators and the planner."""
    import dataclasses

    from flowbp.dryrun import ARCHITECTURES

    return dataclasses.replace(ARCHITECTURES["sd3"], make_inputs=tiny_sd3_inputs, vae_latent_channels=4,
                               vae_factor=2, text_len=TINY_SD3_TEXT_LEN)


def meta_config(module: torch.nn.Module) -> dict:
    """A diffusers model's constructor arguments (its config without the private keys)."""
    return {k: v for k, v in dict(module.config).items() if not k.startswith("_")}


def meta_twins(backbone) -> dict:
    """Meta-device copies of a tiny SD3 backbone's transformer and VAE (the estimators' ``transformer=`` / ``vae=``)."""
    from flowbp.dryrun import build_meta

    return {"transformer": build_meta("SD3Transformer2DModel", meta_config(backbone.transformer), torch.float32),
            "vae": build_meta("AutoencoderKL", meta_config(backbone.vae), torch.float32)}


def _flux_scheduler():
    """FLUX.1-dev's scheduler config: exponential dynamic shifting between 0.5 and 1.15."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_tiny_flux1(directory: str | Path, seed: int = 0):
    """A tiny FluxPipeline (VAE factor 2, 2×2 packing: resolution multiple of 4), saved to ``directory``.

    Guidance-embedded transformer (FLUX.1-dev style), plain ``CLIPTextModel`` (the pipeline reads its
    ``pooler_output``) + T5, a 4-channel VAE with FLUX.1's scaling 0.3611 / shift 0.1159.
    """
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    ).eval()
    pipe = FluxPipeline(
        scheduler=_flux_scheduler(), vae=_autoencoder_kl(seed + 1, scaling_factor=0.3611, shift_factor=0.1159),
        transformer=transformer,
        text_encoder=_clip_text_model(seed + 2, projection=False), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=_t5_model(seed + 3), tokenizer_2=tiny_t5_tokenizer(),
    )
    pipe.save_pretrained(str(directory))
    return pipe


def tiny_qwen_tokenizer():
    """A byte-level Qwen2 tokenizer with no merges, the chat special tokens and a minimal chat template."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_chars())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def build_tiny_flux2_klein(directory: str | Path, seed: int = 0):
    """A tiny Flux2KleinPipeline (VAE factor 2, 2×2 patchify: resolution multiple of 4), saved to ``directory``.

    The Qwen3 text encoder has 28 layers (hidden size 8) so the pipeline's default output layers
    (9, 18, 27) exist, and joint_attention_dim = 3 × 8; the VAE's BatchNorm running statistics are
    set to non-trivial values so that the latent (de)normalisation is exercised.
    """
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hidden = 8
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * hidden, timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False,
    ).eval()
    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=16, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=512,
    )).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.3)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    pipe = Flux2KleinPipeline(
        scheduler=_flux_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
    )
    pipe.save_pretrained(str(directory))
    return pipe


def _qwen_template_tokenizer():
    """The byte-level Qwen2 tokenizer with the extra special tokens the VL / Qwen3 templates use."""
    tok = tiny_qwen_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    return tok


def build_tiny_qwen_image(directory: str | Path, seed: int = 0):
    """A tiny QwenImagePipeline (VAE factor 4, 2×2 packing: resolution multiple of 8), saved to ``directory``.

    Qwen2.5-VL text encoder (hidden 16; the pipeline reads its last hidden state after dropping the
    34 template tokens), a 4-channel causal-3D Qwen-Image VAE whose ``latents_mean`` / ``latents_std``
    are non-trivial so that the latent normalisation is exercised, and Qwen-Image's scheduler config
    (exponential dynamic shift 0.5 → 0.9 over 256 … 8192 tokens, ``shift_terminal`` 0.02).
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hidden = 16
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=hidden, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()
    tokenizer = _qwen_template_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 2048,
            "bos_token_id": None, "eos_token_id": None,
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1000000.0},
        },
        vision_config={
            "depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": hidden,
            "patch_size": 2, "temporal_patch_size": 1, "spatial_merge_size": 1, "fullatt_block_indexes": [0],
        },
        image_token_id=len(tokenizer) - 1, video_token_id=len(tokenizer) - 1,
        vision_start_token_id=len(tokenizer) - 1, vision_end_token_id=len(tokenizer) - 1,
    )).eval()
    g = torch.Generator().manual_seed(seed + 2)
    torch.manual_seed(seed + 3)
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=(torch.randn(4, generator=g) * 0.3).tolist(),
        latents_std=(torch.rand(4, generator=g) + 0.5).tolist(),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
    )
    pipe.save_pretrained(str(directory))
    return pipe


def build_tiny_z_image(directory: str | Path, seed: int = 0):
    """A tiny ZImagePipeline (VAE factor 2, patch 2 inside the transformer: resolution multiple of 4).

    Qwen3 text encoder (hidden 16, 2 layers; the pipeline reads ``hidden_states[-2]``), a 4-channel
    AutoencoderKL with Z-Image's scaling 0.3611 / shift 0.1159 and Z-Image-Turbo's static shift 3.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    hidden = 16
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=hidden, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    ).eval()
    with torch.no_grad():  # the padding tokens start at zero: make them matter like trained ones
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    tokenizer = _qwen_template_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% if not enable_thinking %}<think>\n\n</think>\n\n"
        "{% endif %}{% endif %}"
    )
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
    )).eval()
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_autoencoder_kl(seed + 2, 0.3611, 0.1159),
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
    )
    pipe.save_pretrained(str(directory))
    return pipe


def build_tiny_flux2(directory: str | Path, seed: int = 0):
    """A tiny Flux2Pipeline (FLUX.2-dev: guidance embedding, Mistral3 text encoder), saved to ``directory``.

    The Mistral text model has 30 layers (hidden 8) so the pipeline's default output layers
    (10, 20, 30) exist, and joint_attention_dim = 3 × 8. The tokenizer is a byte-level tokenizer
    whose chat template takes FLUX.2's message format (content as a list of typed parts); the real
    checkpoint ships a Pixtral processor, whose ``apply_chat_template`` the pipeline calls the same way.
    """
    from diffusers import AutoencoderKLFlux2, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    hidden = 8
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * hidden, timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4], guidance_embeds=True,
    ).eval()
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{% for part in m['content'] %}{{ part['text'] }}{% endfor %}"
        "[/{{ m['role'] }}]{% endfor %}"
    )
    torch.manual_seed(seed + 1)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config={
            "model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 16,
            "num_hidden_layers": 30, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
            "max_position_embeddings": 1024, "sliding_window": None,
        },
        vision_config={
            "model_type": "pixtral", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "head_dim": 4, "patch_size": 2, "image_size": 8,
        },
        image_token_index=len(tokenizer) - 1, spatial_merge_size=1,
    )).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.3)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    pipe = Flux2Pipeline(
        scheduler=_flux2_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
    )
    pipe.save_pretrained(str(directory))
    return pipe


def _flux2_scheduler():
    """FLUX.2-dev's scheduler config: exponential dynamic shifting (μ from compute_empirical_mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
