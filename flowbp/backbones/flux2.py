"""The ``flux2`` backbone: FLUX.2-dev through diffusers' ``Flux2Pipeline`` components.

FLUX.2-dev shares FLUX.2-Klein's transformer class, latent layout, VAE normalisation and empirical
μ (:class:`~flowbp.backbones.flux2_klein.Flux2KleinBackbone`); what differs, mirroring
``diffusers.Flux2Pipeline.__call__`` (a test checks the rollout to 1e-5):

- guidance-distilled: the guidance scale is an *input* of the transformer (its guidance embedding),
  one forward per step, no negative branch (default 4.0, the pipeline's);
- prompt embeddings: the Mistral-Small-3.1 (``Mistral3ForConditionalGeneration``) hidden states of
  layers (10, 20, 30), stacked per token, from the pipeline's system-message chat template padded
  to 512 tokens (``Flux2Pipeline.encode_prompt``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flowbp.backbones.base import VelocityFn, expand_batch
from flowbp.backbones.diffusers_base import PromptCondition
from flowbp.backbones.flux2_klein import Flux2KleinBackbone

#: ``Flux2Pipeline.__call__``'s default guidance (its example uses 2.5).
FLUX2_GUIDANCE = 4.0
#: Mistral3 hidden-state indices the pipeline stacks (index 0 is the token embeddings).
FLUX2_TEXT_ENCODER_OUT_LAYERS: tuple[int, ...] = (10, 20, 30)


class Flux2Backbone(Flux2KleinBackbone):
    name = "flux2"
    pipeline_class_name = "Flux2Pipeline"
    default_guidance_scale = FLUX2_GUIDANCE
    negative_prompt = None  # guidance-distilled: no negative branch

    def __init__(
        self, pipe: Any, *args: Any, text_encoder_out_layers: Sequence[int] = FLUX2_TEXT_ENCODER_OUT_LAYERS,
        **kwargs: Any,
    ) -> None:
        if not pipe.transformer.config.get("guidance_embeds", False):
            raise ValueError(
                "backbone_path: this FLUX.2 transformer has no guidance embedding (guidance_embeds false, e.g. "
                "FLUX.2-Klein); the flux2 backbone drives the guidance-distilled FLUX.2-dev"
            )
        super().__init__(pipe, *args, text_encoder_out_layers=text_encoder_out_layers, **kwargs)

    def dynamic_mu(self, num_steps: int) -> float:
        """``Flux2Pipeline``'s ``compute_empirical_mu`` (sequence length and N)."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return float(compute_empirical_mu(image_seq_len=self.image_seq_len(), num_steps=num_steps))

    def velocity_fn(
        self, condition: PromptCondition, guidance_scale: float | None = None, detach_uncond: bool = False
    ) -> VelocityFn:
        """``velocity(x, σ)``: one call with the guidance scale fed to the guidance embedding.

        There is no negative branch, so ``detach_uncond`` has nothing to act on. x is packed to
        tokens (B, HW, C) for the transformer and the output unpacked back; the timestep is σ taken
        through the scheduler's float32 σ·1000, the guidance a float32 tensor of length B.
        """
        from diffusers import Flux2Pipeline

        g = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        rows, cols = self.token_grid
        img_ids = Flux2Pipeline._prepare_latent_ids(torch.empty(1, 1, rows, cols)).to(self.device)  # int64

        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
            batch = x.shape[0]
            tokens = Flux2Pipeline._pack_latents(self.model_input(x))  # (B, HW, C)
            cond = {k: expand_batch(v, batch) for k, v in condition.tensors.items()}
            t = torch.tensor(float(sigma), dtype=torch.float32, device=x.device) * 1000
            v = self.transformer(
                hidden_states=tokens,
                timestep=t.expand(batch).to(tokens.dtype) / 1000,
                guidance=torch.full((batch,), g, dtype=torch.float32, device=x.device),
                img_ids=img_ids,
                return_dict=False,
                **cond,
            )[0]
            return v.transpose(1, 2).reshape(x.shape).to(x.dtype)

        return velocity
