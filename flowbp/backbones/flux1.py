"""The ``flux1`` backbone: FLUX.1 (dev) through diffusers' ``FluxPipeline`` components.

Only what is FLUX.1-specific lives here (loading, caching, decoding, LoRA are the shared
:class:`~flowbp.backbones.diffusers_base.DiffusersBackbone`); each piece mirrors
``diffusers.FluxPipeline.__call__`` so that the rollout reproduces the pipeline (a test checks it to 1e-5):

- guidance-distilled: the guidance scale is an *input* of the transformer (its guidance embedding),
  one forward per step, no negative branch (default 4.0, the paper's; the pipeline's is 3.5);
- latents are packed 2×2 patches, ``(B, (H/16)(W/16), 64)`` for the 16-channel VAE — the layout the
  pipeline's ``latents=`` argument takes — with float position ids ``(0, row, col)``;
- dynamic shift: μ = ``calculate_shift(image sequence length)`` from the scheduler config, applied to
  the paper's grid ``linspace(1, 1/N, N)`` as S = e^μ;
- the transformer receives σ (t/1000) and multiplies by 1000 inside;
- decoding un-packs and applies the VAE's ``z / scaling_factor + shift_factor`` (0.3611 / 0.1159).
"""

from __future__ import annotations

from typing import Any

import torch

from flowbp.backbones.base import VelocityFn, expand_batch
from flowbp.backbones.diffusers_base import DiffusersBackbone, PromptCondition

#: The paper's FLUX.1-dev training and evaluation guidance (the pipeline's own default is 3.5).
FLUX1_GUIDANCE = 4.0

#: diffusers' FLUX.1 LoRA recipe (examples/dreambooth/train_dreambooth_lora_flux.py default): the
#: attention projections of both streams (double-stream image ``to_q/k/v``, ``to_out.0``, text
#: ``add_*_proj``, ``to_add_out``; single-stream ``to_q/k/v``) and the double-stream feed-forwards.
FLUX1_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)


class PackedLatentsMixin:
    """Geometry shared by the FLUX families: a 2×2 patch on top of the VAE factor."""

    def spatial_multiple(self) -> int:
        return 2 * self.vae_scale_factor

    @property
    def token_grid(self) -> tuple[int, int]:
        """(rows, cols) of the image token grid: H/(2·vae factor) × W/(2·vae factor)."""
        side = self.resolution // self.spatial_multiple()
        return side, side

    def image_seq_len(self) -> int:
        rows, cols = self.token_grid
        return rows * cols


class Flux1Backbone(PackedLatentsMixin, DiffusersBackbone):
    name = "flux1"
    pipeline_class_name = "FluxPipeline"
    transformer_class_name = "FluxTransformer2DModel"
    required_components = (
        "transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
    )
    default_lora_targets = FLUX1_LORA_TARGETS
    default_guidance_scale = FLUX1_GUIDANCE
    negative_prompt = None  # guidance-distilled: no negative branch

    def __init__(self, pipe: Any, *args: Any, **kwargs: Any) -> None:
        if not pipe.transformer.config.get("guidance_embeds", False):
            raise ValueError(
                "backbone_path: this FLUX.1 transformer has no guidance embedding (guidance_embeds false, e.g. "
                "FLUX.1-schnell); the flux1 backbone drives guidance-distilled checkpoints such as FLUX.1-dev"
            )
        super().__init__(pipe, *args, **kwargs)

    # ------------------------------------------------------------------ latents
    @property
    def latent_channels(self) -> int:
        """VAE latent channels (the transformer sees 4× as many after packing)."""
        return int(self.transformer.config.in_channels) // 4

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.image_seq_len(), 4 * self.latent_channels)

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_0 ~ N(0, I), packed: B × (H/16)(W/16) × 64, float32.

        Drawn unpacked (B, 16, H/8, W/8) and then packed, as ``FluxPipeline.prepare_latents`` does, so
        one generator seed gives the pipeline's own initial latents.
        """
        from diffusers import FluxPipeline

        rows, cols = self.token_grid
        c = self.latent_channels
        gen_device = generator.device if generator is not None else self.device
        noise = torch.randn((batch_size, c, 2 * rows, 2 * cols), generator=generator, device=gen_device)
        return FluxPipeline._pack_latents(noise, batch_size, c, 2 * rows, 2 * cols).to(self.device, torch.float32)

    def latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed tokens -> VAE latents (``_unpack_latents``), then ``z / scaling_factor + shift_factor``."""
        from diffusers import FluxPipeline

        unpacked = FluxPipeline._unpack_latents(latents, self.resolution, self.resolution, self.vae_scale_factor)
        return super().latents_to_vae(unpacked)

    # ------------------------------------------------------------------ sigmas
    def dynamic_mu(self, num_steps: int) -> float:
        """The pipeline's ``calculate_shift`` on this resolution's image sequence length (independent of N)."""
        return self.sequence_length_mu()

    # ------------------------------------------------------------------ prompts
    def _encode_batch(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """T5 sequence embeddings and CLIP pooled embedding, via the pipeline's own ``encode_prompt``."""
        kwargs: dict[str, Any] = {}
        if self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.max_sequence_length
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, **kwargs)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    # ------------------------------------------------------------------ velocity
    def velocity_fn(
        self, condition: PromptCondition, guidance_scale: float | None = None, detach_uncond: bool = False
    ) -> VelocityFn:
        """``velocity(x, σ)``: one transformer call with the guidance scale fed to the guidance embedding.

        There is no unconditional branch, so ``detach_uncond`` has nothing to act on. The timestep is σ
        (the transformer multiplies by 1000), taken through the scheduler's float32 ``σ·1000`` and the
        model dtype exactly as the pipeline does; the guidance is a float32 tensor of length B.
        """
        g = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        from diffusers import FluxPipeline

        rows, cols = self.token_grid
        # float position ids (0, row, col); float32 keeps them exact at any resolution
        img_ids = FluxPipeline._prepare_latent_image_ids(1, rows, cols, self.device, torch.float32)

        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
            batch = x.shape[0]
            cond = {k: expand_batch(v, batch) for k, v in condition.tensors.items()}
            hidden = self.model_input(x)
            t = torch.tensor(float(sigma), dtype=torch.float32, device=x.device) * 1000
            txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=x.device)
            out = self.transformer(
                hidden_states=hidden,
                timestep=t.expand(batch).to(hidden.dtype) / 1000,
                guidance=torch.full((batch,), g, dtype=torch.float32, device=x.device),
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
                **cond,
            )[0]
            return out.to(x.dtype)

        return velocity
