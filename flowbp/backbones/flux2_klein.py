"""The ``flux2-klein`` backbone: FLUX.2-Klein (base) through diffusers' ``Flux2KleinPipeline`` components.

What is FLUX.2-Klein-specific, each mirroring ``diffusers.Flux2KleinPipeline.__call__`` so that the
rollout reproduces the pipeline (a test checks it to 1e-5):

- real classifier-free guidance ``v = v_u + g (v_c − v_u)`` with the empty prompt ``""`` as the
  negative (default g = 4.0, the paper's): one batched call over cond + uncond, or, with the
  unconditional branch detached (the paper's trainers), a separate no-grad call for it so that
  a grad forward holds the activations of one branch only; a distilled checkpoint
  (``is_distilled`` in ``model_index.json``) runs no CFG, like the pipeline;
- prompt embeddings are the Qwen3 hidden states at ``text_encoder_out_layers`` (default 9, 18, 27)
  stacked per token, from the chat-templated prompt padded to 512 tokens;
- latents are *patchified, unpacked* ``(B, 128, H/16, W/16)`` — the layout the pipeline's ``latents=``
  argument takes — and packed to ``(B, HW, 128)`` tokens (int position ids ``(0, row, col, 0)``)
  only around the transformer call;
- decoding undoes the FLUX.2 VAE's BatchNorm normalisation (running mean / std), un-patchifies and
  decodes;
- the shift is FLUX.2's empirical μ (``compute_empirical_mu``: a function of the image sequence
  length *and* the number of steps N).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flowbp.backbones.base import VelocityFn, expand_batch
from flowbp.backbones.diffusers_base import DiffusersBackbone, PromptCondition
from flowbp.backbones.flux1 import PackedLatentsMixin

#: The paper's Klein-base training / evaluation CFG scale (also the pipeline's default).
KLEIN_GUIDANCE = 4.0
#: Qwen3 hidden-state indices stacked into the prompt embedding (index 0 is the token embeddings).
TEXT_ENCODER_OUT_LAYERS: tuple[int, ...] = (9, 18, 27)

#: One regex, because a list of suffixes cannot say it: FLUX.2's single-stream blocks have a fused
#: ``attn.to_qkv_mlp_proj`` and a plain Linear ``attn.to_out``, while in the double-stream blocks
#: ``attn.to_out`` is a ModuleList (peft raises on it) whose Linear is ``to_out.0``.
KLEIN_LORA_TARGETS = (
    r".*(single_transformer_blocks\.\d+\.attn\.to_out"
    r"|\.(to_q|to_k|to_v|to_out\.0|to_qkv_mlp_proj|add_q_proj|add_k_proj|add_v_proj|to_add_out))$"
)


class Flux2KleinBackbone(PackedLatentsMixin, DiffusersBackbone):
    name = "flux2-klein"
    pipeline_class_name = "Flux2KleinPipeline"
    transformer_class_name = "Flux2Transformer2DModel"
    required_components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
    default_lora_targets = KLEIN_LORA_TARGETS
    default_guidance_scale = KLEIN_GUIDANCE
    negative_prompt = ""  # the pipeline's (and the paper's) fixed negative

    def __init__(
        self, pipe: Any, *args: Any, text_encoder_out_layers: Sequence[int] = TEXT_ENCODER_OUT_LAYERS, **kwargs: Any
    ) -> None:
        self.text_encoder_out_layers = tuple(int(i) for i in text_encoder_out_layers)
        encoder = getattr(pipe, "text_encoder", None)
        if encoder is not None:  # (a VL encoder such as FLUX.2-dev's Mistral3 keeps its text model's config apart)
            text_config = getattr(encoder.config, "text_config", None) or encoder.config
            _check_out_layers(text_config, self.text_encoder_out_layers, pipe.transformer.config)
        super().__init__(pipe, *args, **kwargs)
        #: A step-distilled checkpoint (``is_distilled`` in model_index.json) runs without CFG, as in the pipeline.
        self.is_distilled = bool(pipe.config.get("is_distilled", False))

    # ------------------------------------------------------------------ latents
    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """Patchified, unpacked: (B, 4·VAE channels, H/16, W/16) — the pipeline's ``latents=`` layout."""
        rows, cols = self.token_grid
        return (batch_size, int(self.transformer.config.in_channels), rows, cols)

    def latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the VAE BatchNorm normalisation (running statistics), then un-patchify 2×2."""
        from diffusers import Flux2KleinPipeline

        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        std = std.to(latents.device, latents.dtype)
        return Flux2KleinPipeline._unpatchify_latents(latents * std + mean)

    # ------------------------------------------------------------------ sigmas
    def dynamic_mu(self, num_steps: int) -> float:
        """FLUX.2's empirical μ (``compute_empirical_mu``): depends on the sequence length *and* on N."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        return float(compute_empirical_mu(image_seq_len=self.image_seq_len(), num_steps=num_steps))

    # ------------------------------------------------------------------ prompts
    def _encode_batch(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Stacked Qwen3 hidden states of the chat-templated prompts, via the pipeline's ``encode_prompt``."""
        kwargs: dict[str, Any] = {}
        if self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.max_sequence_length
        embeds, text_ids = self.pipe.encode_prompt(
            prompt=prompts, device=device, text_encoder_out_layers=self.text_encoder_out_layers, **kwargs
        )
        return {"encoder_hidden_states": embeds, "txt_ids": text_ids}

    # ------------------------------------------------------------------ velocity
    def velocity_fn(
        self, condition: PromptCondition, guidance_scale: float | None = None, detach_uncond: bool = False
    ) -> VelocityFn:
        """``velocity(x, σ)`` with real CFG ``v_u + g (v_c − v_u)`` on the patchified layout.

        x is packed to tokens (B, HW, C) for the transformer and the output unpacked back. ``g = 1``
        (or a distilled model) skips the negative branch, like the pipeline. With CFG:

        - ``detach_uncond=False``: cond and uncond run as one batched call, both with gradient;
        - ``detach_uncond=True`` (the paper's trainers): the negative branch runs as its own call under
          ``no_grad``, so a grad forward keeps the activations of the conditional half only (half the
          memory of a batched call whose uncond output is merely detached). The rollout uses the same
          two calls, so cached and re-forwarded velocities agree bit for bit.
        """
        from diffusers import Flux2KleinPipeline

        g = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        cfg = g > 1.0 and not self.is_distilled and condition.negative is not None
        rows, cols = self.token_grid
        img_ids = Flux2KleinPipeline._prepare_latent_ids(torch.empty(1, 1, rows, cols)).to(self.device)  # int64

        def call(tokens: torch.Tensor, sigma: float, cond: dict[str, torch.Tensor]) -> torch.Tensor:
            t = torch.tensor(float(sigma), dtype=torch.float32, device=tokens.device) * 1000
            return self.transformer(
                hidden_states=tokens,
                timestep=t.expand(tokens.shape[0]).to(tokens.dtype) / 1000,
                guidance=None,
                img_ids=img_ids,
                return_dict=False,
                **cond,
            )[0]

        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
            batch = x.shape[0]
            tokens = Flux2KleinPipeline._pack_latents(self.model_input(x))  # (B, HW, C)
            pos = {k: expand_batch(v, batch) for k, v in condition.tensors.items()}
            if not cfg:
                v = call(tokens, sigma, pos)
            else:
                neg = {k: expand_batch(v, batch) for k, v in condition.negative.items()}
                if detach_uncond:
                    v_c = call(tokens, sigma, pos)
                    with torch.no_grad():
                        v_u = call(tokens.detach(), sigma, neg)
                else:
                    both = {k: torch.cat([pos[k], neg[k]]) for k in pos}
                    v_c, v_u = call(torch.cat([tokens, tokens]), sigma, both).chunk(2)
                v = v_u + g * (v_c - v_u)
            return v.transpose(1, 2).reshape(x.shape).to(x.dtype)

        return velocity


def _check_out_layers(text_config: Any, layers: tuple[int, ...], transformer_config: Any) -> None:
    """The stacked hidden states must exist and match the transformer's ``joint_attention_dim``."""
    available = int(text_config.num_hidden_layers) + 1  # hidden_states[0] is the embedding output
    bad = [i for i in layers if not 0 <= i < available]
    if not layers or bad:
        raise ValueError(
            f"text_encoder_out_layers: {list(layers)} must be indices in [0, {available - 1}] of this text encoder's "
            f"{available} hidden states ({text_config.num_hidden_layers} layers)"
        )
    width = len(layers) * int(text_config.hidden_size)
    if width != int(transformer_config.joint_attention_dim):
        raise ValueError(
            f"text_encoder_out_layers: {len(layers)} layers × hidden size {text_config.hidden_size} = {width}, but the "
            f"transformer's joint_attention_dim is {transformer_config.joint_attention_dim}"
        )
