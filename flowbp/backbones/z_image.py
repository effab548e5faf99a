"""The ``z-image`` backbone: Z-Image through diffusers' ``ZImagePipeline`` components.

What is Z-Image-specific, each mirroring ``diffusers.ZImagePipeline.__call__`` so that the rollout
reproduces the pipeline (a test checks it to 1e-5):

- a flipped time axis: the transformer receives ``(1000 − t)/1000 = 1 − σ`` and predicts the
  velocity towards the *image*, so the flow velocity is the negated output;
- CFG in the pipeline's form ``pred = pos + s (pos − neg)`` with the empty negative prompt. flowbp's
  ``guidance_scale`` g keeps the meaning it has for every backbone, ``v_n + g (v_c − v_n)``, so
  ``s = g − 1``: the pipeline's ``guidance_scale=5.0`` is flowbp's 6.0, and g = 1 (the pipeline's
  0) runs the conditional branch only. ``cfg_normalization`` / ``cfg_truncation`` are not
  reproduced (the pipeline's defaults leave them off);
- prompt embeddings: Qwen3 ``hidden_states[-2]`` of the chat-templated prompt, only the valid tokens
  (the pipeline's ``encode_prompt`` returns a *list* of variable-length tensors): each prompt is
  cached unpadded and the transformer gets the list back;
- latents ``(B, 16, H/8, W/8)`` — the pipeline's ``latents=`` layout — go to the transformer as a
  list of ``(16, 1, H/8, W/8)`` frames; the 2×2 patchify happens inside the transformer;
- the grid: the scheduler's static shift (Z-Image-Turbo: 3.0); μ from ``calculate_shift`` is passed
  by the pipeline but only used by a dynamic-shifting config;
- decoding ``z / scaling_factor + shift_factor`` (the FLUX VAE values 0.3611 / 0.1159).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flowbp.backbones.base import VelocityFn, expand_batch
from flowbp.backbones.diffusers_base import DiffusersBackbone, PromptCondition

#: flowbp's g for the pipeline's default ``guidance_scale=5.0`` (pos + 5 (pos − neg) = neg + 6 (pos − neg)).
Z_IMAGE_GUIDANCE = 6.0

#: diffusers' Z-Image LoRA recipe (examples/dreambooth/train_dreambooth_lora_z_image.py): the
#: attention projections of every block (refiners and main layers).
Z_IMAGE_LORA_TARGETS: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")


class ZImageBackbone(DiffusersBackbone):
    name = "z-image"
    pipeline_class_name = "ZImagePipeline"
    transformer_class_name = "ZImageTransformer2DModel"
    required_components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
    default_lora_targets = Z_IMAGE_LORA_TARGETS
    default_guidance_scale = Z_IMAGE_GUIDANCE
    negative_prompt = ""  # the pipeline's default negative

    # ------------------------------------------------------------------ geometry / latents
    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.all_patch_size[0])

    def spatial_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        side = self.resolution // self.vae_scale_factor
        return (batch_size, int(self.transformer.config.in_channels), side, side)

    def image_seq_len(self) -> int:
        side = self.resolution // self.spatial_multiple()
        return side * side

    # ------------------------------------------------------------------ sigmas
    def dynamic_mu(self, num_steps: int) -> float:
        """The pipeline's ``calculate_shift`` on (h/2)(w/2) latent tokens (used only by a dynamic config)."""
        return self.sequence_length_mu()

    # ------------------------------------------------------------------ prompts
    def _encode_batch(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline's ``encode_prompt`` (a list of (L_i, D)), zero-padded with the lengths alongside."""
        kwargs: dict[str, Any] = {}
        if self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.max_sequence_length
        feats, _ = self.pipe.encode_prompt(prompt=list(prompts), device=device, do_classifier_free_guidance=False,
                                           **kwargs)
        return _pad(feats)

    def _gather(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = [c["cap_feats"][0, : int(c["cap_lens"][0])] for c in (self._cache[p] for p in prompts)]
        padded = _pad(rows)
        return {"cap_feats": padded["cap_feats"].to(self.device, self._model_dtype), "cap_lens": padded["cap_lens"]}

    # ------------------------------------------------------------------ velocity
    def velocity_fn(
        self, condition: PromptCondition, guidance_scale: float | None = None, detach_uncond: bool = False
    ) -> VelocityFn:
        """``velocity(x, σ) = −pred``, ``pred = pos + (g − 1)(pos − neg)`` on the flipped time 1 − σ.

        Without ``detach_uncond`` positive and negative run as one batched call [pos; neg] (the
        pipeline's order); with it the negative runs as its own no-grad call, so a gradient forward
        keeps the activations of the positive branch only.
        """
        g = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        s = g - 1.0
        cfg = s > 0 and condition.negative is not None

        def call(x: torch.Tensor, sigma: float, cond: dict[str, torch.Tensor]) -> torch.Tensor:
            batch = x.shape[0]
            feats, lens = expand_batch(cond["cap_feats"], batch), expand_batch(cond["cap_lens"], batch)
            t = torch.tensor(float(sigma), dtype=torch.float32, device=x.device) * 1000
            timestep = (1000 - t.expand(batch)) / 1000
            frames = list(self.model_input(x).unsqueeze(2).unbind(dim=0))
            out = self.transformer(
                frames, timestep, [feats[i, : int(lens[i])] for i in range(batch)], return_dict=False
            )[0]
            return torch.stack([o.float() for o in out], dim=0).squeeze(2)

        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
            if not cfg:
                return (-call(x, sigma, condition.tensors)).to(x.dtype)
            if detach_uncond:
                pos = call(x, sigma, condition.tensors)
                with torch.no_grad():
                    neg = call(x.detach(), sigma, condition.negative)
            else:
                batch = x.shape[0]
                both = _pad_cat(
                    {k: expand_batch(v, batch) for k, v in condition.tensors.items()},
                    {k: expand_batch(v, batch) for k, v in condition.negative.items()},
                )
                pos, neg = call(torch.cat([x, x]), sigma, both).chunk(2)
            return (-(pos + s * (pos - neg))).to(x.dtype)

        return velocity


def _pad(rows: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Variable-length (L_i, D) rows -> zero-padded (B, L, D) and their lengths (B,) int64 (CPU)."""
    longest = max(r.shape[0] for r in rows)
    feats = torch.stack([torch.cat([r, r.new_zeros(longest - r.shape[0], r.shape[1])]) for r in rows])
    return {"cap_feats": feats, "cap_lens": torch.tensor([r.shape[0] for r in rows], dtype=torch.long)}


def _pad_cat(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate two padded caption batches along the batch axis (re-padding to the longer)."""
    longest = max(a["cap_feats"].shape[1], b["cap_feats"].shape[1])

    def grow(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(t.shape[0], longest - t.shape[1], t.shape[2])], dim=1)

    return {
        "cap_feats": torch.cat([grow(a["cap_feats"]), grow(b["cap_feats"])]),
        "cap_lens": torch.cat([a["cap_lens"], b["cap_lens"]]),
    }
