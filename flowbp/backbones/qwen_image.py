"""The ``qwen-image`` backbone: Qwen-Image through diffusers' ``QwenImagePipeline`` components.

What is Qwen-Image-specific, each mirroring ``diffusers.QwenImagePipeline.__call__`` so that the
rollout reproduces the pipeline (a test checks it to 1e-5):

- true CFG with a negative prompt (default ``" "``, the Qwen-Image model card's): two separate
  transformer calls (their text lengths differ), ``comb = v_n + g (v_c − v_n)``, then rescaled per
  token to the conditional prediction's norm, ``v = comb · ‖v_c‖ / ‖comb‖`` (norms over the channel
  axis); g ≤ 1 runs the conditional call only, as the pipeline does without ``true_cfg_scale > 1``;
- prompt embeddings: the Qwen2.5-VL last hidden state of the system-templated prompt with the
  34 template tokens dropped (the pipeline's ``encode_prompt``), variable length: each prompt is
  cached without padding and a batch is zero-padded with ``encoder_hidden_states_mask`` (no mask
  when nothing is padded, like the pipeline);
- latents are packed 2×2 patches ``(B, (H/16)(W/16), 64)`` — the pipeline's ``latents=`` layout —
  drawn as ``(B, 1, 16, H/8, W/8)`` and packed, as ``prepare_latents`` does;
- decoding un-packs to ``(B, 16, 1, H/8, W/8)``, undoes the per-channel normalisation
  ``z · std + mean`` of the Qwen-Image VAE and decodes frame 0;
- the grid: dynamic exponential shift with μ = ``calculate_shift(image tokens)`` (Qwen-Image's
  config: 0.5 → 0.9 over 256 … 8192 tokens), then the scheduler's ``shift_terminal`` stretch (0.02),
  handled by :meth:`DiffusersBackbone.sigmas`;
- the transformer receives σ (t/1000) and ``img_shapes`` ``[(1, H/16, W/16)]`` per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flowbp.backbones.base import VelocityFn, expand_batch
from flowbp.backbones.diffusers_base import DiffusersBackbone, PromptCondition
from flowbp.backbones.flux1 import PackedLatentsMixin

#: The pipeline's default ``true_cfg_scale``.
QWEN_IMAGE_GUIDANCE = 4.0
#: The negative prompt of the Qwen-Image model card's example (true CFG needs one).
QWEN_IMAGE_NEGATIVE = " "

#: diffusers' Qwen-Image LoRA recipe (examples/dreambooth/train_dreambooth_lora_qwen_image.py):
#: ``to_k, to_q, to_v, to_out.0`` — the image-stream projections of the joint attention (the text
#: stream's ``add_*_proj`` / ``to_add_out`` do not match these suffixes).
QWEN_IMAGE_LORA_TARGETS: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")


class QwenImageBackbone(PackedLatentsMixin, DiffusersBackbone):
    name = "qwen-image"
    pipeline_class_name = "QwenImagePipeline"
    transformer_class_name = "QwenImageTransformer2DModel"
    required_components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
    default_lora_targets = QWEN_IMAGE_LORA_TARGETS
    default_guidance_scale = QWEN_IMAGE_GUIDANCE
    negative_prompt = QWEN_IMAGE_NEGATIVE

    def __init__(self, pipe: Any, *args: Any, **kwargs: Any) -> None:
        if pipe.transformer.config.get("guidance_embeds", False):
            raise ValueError(
                "backbone_path: this Qwen-Image transformer has a guidance embedding (guidance_embeds true); the "
                "qwen-image backbone drives the true-CFG checkpoints such as Qwen/Qwen-Image"
            )
        msl = kwargs.get("max_sequence_length")
        if msl is not None and not 1 <= int(msl) <= 1024:
            raise ValueError(f"max_sequence_length: the Qwen-Image pipeline takes 1 to 1024 tokens, got {msl}")
        super().__init__(pipe, *args, **kwargs)

    # ------------------------------------------------------------------ latents
    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.image_seq_len(), 4 * self.latent_channels)

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_0 ~ N(0, I), packed; drawn as (B, 1, C, H/8, W/8) like ``QwenImagePipeline.prepare_latents``."""
        from diffusers import QwenImagePipeline

        rows, cols = self.token_grid
        c = self.latent_channels
        gen_device = generator.device if generator is not None else self.device
        noise = torch.randn((batch_size, 1, c, 2 * rows, 2 * cols), generator=generator, device=gen_device)
        packed = QwenImagePipeline._pack_latents(noise, batch_size, c, 2 * rows, 2 * cols)
        return packed.to(self.device, torch.float32)

    def latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed tokens -> (B, C, 1, H/8, W/8), then ``z / (1/std) + mean`` (the pipeline's arithmetic)."""
        from diffusers import QwenImagePipeline

        z = QwenImagePipeline._unpack_latents(latents, self.resolution, self.resolution, self.vae_scale_factor)
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(z.device, z.dtype)
        return z / inv_std + mean

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The Qwen-Image VAE is causal 3-D: decode the single frame, then map to [0, 1]."""
        if self.vae is None:
            raise ValueError(f"the {self.name} backbone was built without a VAE")
        z = self.latents_to_vae(latents)
        vae_dtype = next(self.vae.parameters()).dtype
        image = self.vae.decode(z.to(vae_dtype), return_dict=False)[0][:, :, 0]
        return (image.float() * 0.5 + 0.5).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ sigmas
    def dynamic_mu(self, num_steps: int) -> float:
        """The pipeline's ``calculate_shift`` on the image sequence length (independent of N)."""
        return self.sequence_length_mu()

    # ------------------------------------------------------------------ prompts
    def _encode_batch(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Qwen2.5-VL embeddings via the pipeline's ``encode_prompt``, with the valid-token mask."""
        kwargs: dict[str, Any] = {}
        if self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.max_sequence_length
        embeds, mask = self.pipe.encode_prompt(prompt=prompts, device=device, **kwargs)
        if mask is None:  # the pipeline drops an all-valid mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def _gather(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each prompt's valid tokens, zero-padded to the longest (the pipeline's own batching)."""
        rows = []
        for p in prompts:
            cached = self._cache[p]
            length = int(cached["encoder_hidden_states_mask"][0].sum())
            rows.append(cached["encoder_hidden_states"][0, :length])
        longest = max(r.shape[0] for r in rows)
        embeds = torch.stack([torch.cat([r, r.new_zeros(longest - r.shape[0], r.shape[1])]) for r in rows])
        out = {"encoder_hidden_states": embeds.to(self.device, self._model_dtype)}
        if any(r.shape[0] < longest for r in rows):
            lengths = torch.tensor([r.shape[0] for r in rows])
            mask = (torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)).long()
            out["encoder_hidden_states_mask"] = mask.to(self.device)
        return out

    def encode_prompts(self, prompts: Sequence[str]) -> PromptCondition:
        """As the base, but the negative keeps its own (unpadded) length: it runs as its own call."""
        cond = super().encode_prompts(prompts)
        if cond.negative is not None:
            cond.negative = self._gather([self.negative_prompt])
        return cond

    # ------------------------------------------------------------------ velocity
    def velocity_fn(
        self, condition: PromptCondition, guidance_scale: float | None = None, detach_uncond: bool = False
    ) -> VelocityFn:
        """``velocity(x, σ)`` with Qwen-Image's true CFG and per-token norm rescale.

        The conditional and negative branches are separate calls, as in the pipeline; with
        ``detach_uncond`` (the paper's trainers) the negative one runs under ``no_grad`` so its
        activations are never saved. The rescale keeps its gradient through both norms.
        """
        g = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        cfg = g > 1.0 and condition.negative is not None
        rows, cols = self.token_grid

        def call(x: torch.Tensor, sigma: float, cond: dict[str, torch.Tensor]) -> torch.Tensor:
            batch = x.shape[0]
            hidden = self.model_input(x)
            t = torch.tensor(float(sigma), dtype=torch.float32, device=x.device) * 1000
            kwargs = {k: expand_batch(v, batch) for k, v in cond.items()}
            return self.transformer(
                hidden_states=hidden,
                timestep=t.expand(batch).to(hidden.dtype) / 1000,
                guidance=None,
                img_shapes=[[(1, rows, cols)]] * batch,
                return_dict=False,
                **kwargs,
            )[0]

        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
            v_c = call(x, sigma, condition.tensors)
            if not cfg:
                return v_c.to(x.dtype)
            if detach_uncond:
                with torch.no_grad():
                    v_n = call(x.detach(), sigma, condition.negative)
            else:
                v_n = call(x, sigma, condition.negative)
            comb = v_n + g * (v_c - v_n)
            v = comb * (torch.norm(v_c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
            return v.to(x.dtype)

        return velocity
