"""The ``sd3`` backbone: Stable Diffusion 3 / 3.5 through diffusers' ``StableDiffusion3Pipeline`` components.

- Prompts: the pipeline's own ``encode_prompt`` (CLIP-L + CLIP-G penultimate states ⊕ T5, pooled
  CLIP embeddings); the negative prompt is "" as in the pipeline and the paper.
- Timestep: σ·1000 in float32 (the pipeline's scheduler timesteps); no internal scaling.
- Sigma grid: the paper's, ``linspace(1, 1/N, N)`` with the scheduler's static shift (3.0 for SD3.5-M).
- Guidance: real CFG ``v = v_u + g (v_c − v_u)`` as one batched call over [negative, positive], as
  the pipeline does; ``detach_uncond`` stops the gradient through v_u (the paper's default; its
  LeapAlign SD3.5 config turns it off): under autograd the negative branch then runs as its own
  no-grad call, so only the positive branch's activations are saved.
- Latents: (B, C, H/8, W/8), exactly what the pipeline's ``latents=`` takes; decode ``z / scaling + shift``.
"""

from __future__ import annotations

from typing import Any

import torch

from flowbp.backbones.base import VelocityFn, expand_batch
from flowbp.backbones.diffusers_base import DiffusersBackbone, PromptCondition

#: The SD3 LoRA recipe's targets (diffusers examples/dreambooth): both joint-attention streams.
SD3_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)


class SD3Backbone(DiffusersBackbone):
    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    transformer_class_name = "SD3Transformer2DModel"
    required_components = (
        "transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
        "text_encoder_3", "tokenizer_3",
    )
    default_lora_targets = SD3_LORA_TARGETS
    default_guidance_scale = 3.5  # the paper's training CFG for SD3.5-M
    negative_prompt = ""

    def check_resolution(self, resolution: int) -> None:
        super().check_resolution(resolution)
        # the learned positional table is cropped around the centre: it bounds the token grid
        tokens = resolution // self.spatial_multiple()
        max_size = getattr(self.transformer.config, "pos_embed_max_size", None)
        if max_size is not None and tokens > max_size:
            raise ValueError(
                f"resolution: {resolution} gives a {tokens}×{tokens} token grid, larger than this model's "
                f"pos_embed_max_size {max_size} (at most {max_size * self.spatial_multiple()} px)"
            )

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        side = self.resolution // self.vae_scale_factor
        return (batch_size, int(self.transformer.config.in_channels), side, side)

    def _encode_batch(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        kwargs: dict[str, Any] = {}
        if self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.max_sequence_length
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False, **kwargs
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def transformer_forward(self, x: torch.Tensor, sigma: float, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """One unguided call; the timestep σ·1000 stays float32 (bf16 would merge neighbouring steps)."""
        t = torch.full((x.shape[0],), float(sigma) * 1000.0, dtype=torch.float32, device=x.device)
        out = self.transformer(hidden_states=self.model_input(x), timestep=t, return_dict=False, **cond)[0]
        return out.to(x.dtype)

    def velocity_fn(
        self, condition: PromptCondition, guidance_scale: float | None = None, detach_uncond: bool = False
    ) -> VelocityFn:
        """``velocity(x, σ)`` with real CFG; ``g = 1`` skips the negative branch entirely."""
        g = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)

        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
            batch = x.shape[0]
            pos = {k: expand_batch(v, batch) for k, v in condition.tensors.items()}
            if g == 1.0 or condition.negative is None:
                return self.transformer_forward(x, sigma, pos)
            neg = {k: expand_batch(v, batch) for k, v in condition.negative.items()}
            if detach_uncond and torch.is_grad_enabled():
                # a gradient forward: the negative branch runs without autograd (as the paper's trainer
                # does), so its activations are never saved: half the memory of the batched call
                with torch.no_grad():
                    v_u = self.transformer_forward(x, sigma, neg)
                v_c = self.transformer_forward(x, sigma, pos)
            else:
                both = {k: torch.cat([neg[k], pos[k]]) for k in pos}  # the pipeline's order: [uncond, cond]
                v_u, v_c = self.transformer_forward(torch.cat([x, x]), sigma, both).chunk(2)
            return v_u + g * (v_c - v_u)

        return velocity
