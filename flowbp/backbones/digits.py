"""The embedded ``digits`` backbone: a tiny class-conditional SD3-style flow model on 16×16 digits.

Everything here mirrors the real SD3 adapter on purpose, so that code exercised on digits is the
code that runs on SD3:

- the velocity network is diffusers' :class:`~diffusers.SD3Transformer2DModel` (small config),
  called with ``timestep = σ·1000`` exactly like ``StableDiffusion3Pipeline``;
- the sigma grid is the paper's training grid (``shift`` from the config, 1.0 for the shipped model):
  what diffusers' :class:`~diffusers.FlowMatchEulerDiscreteScheduler` yields for ``sigmas=linspace(1, 1/N, N)``;
- classifier-free guidance is real CFG, ``v = v_u + g (v_c − v_u)``, one batched call over
  cond + uncond;
- LoRA goes through peft (``transformer.add_adapter``) and is saved in the diffusers
  ``load_lora_weights`` format (keys prefixed ``transformer.``).

What is different: the "text encoder" is a learned embedding table over 11 prompts
(``"digit 0"`` … ``"digit 9"`` and the null prompt ``""`` used as the negative branch of CFG),
and the "VAE" is the identity: pixels in [-1, 1] are the latents (1 channel, 16×16).

Flow-matching convention: x_σ = (1 − σ)·x_data + σ·noise, velocity target = noise − x_data,
sampling runs σ = 1 → 0 with x_{i+1} = x_i + (σ_{i+1} − σ_i)·v_i.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from flowbp.backbones.base import VelocityFn, expand_batch
from flowbp.trajectory import training_sigmas

#: Directory of the weights shipped inside the package.
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
FLOW_WEIGHTS = "digits_flow.safetensors"
FLOW_CONFIG = "digits_flow.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

NUM_CLASSES = 10
#: Index of the null prompt "" in the embedding table (the unconditional / negative branch).
NULL_ID = NUM_CLASSES
PROMPTS: tuple[str, ...] = tuple(f"digit {d}" for d in range(NUM_CLASSES))
NULL_PROMPT = ""
_PROMPT_RE = re.compile(r"digit ([0-9])")

#: The attention projections of both joint-attention streams (image and text), the same modules
#: the SD3 LoRA recipes target.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)

#: The small SD3 config of the shipped model (~0.43 M parameters). 16×16 with patch 2 is an 8×8
#: token grid, hence pos_embed_max_size = 8; caption_projection_dim must equal the inner width
#: (heads × head_dim) because the context stream runs through the same joint blocks.
DEFAULT_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 3,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "caption_projection_dim": 64,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 8,
}


def default_config() -> dict[str, Any]:
    """The full backbone config (what ``digits_flow.json`` stores besides training metadata)."""
    return {
        "transformer": dict(DEFAULT_TRANSFORMER_CONFIG),
        # Length of the learned "token" sequence each prompt maps to.
        "text_seq_len": 4,
        # Scheduler shift. 1.0: a 16×16 image has so little content that SD3's shift 3.0 (which
        # spends steps at high noise, for 1024² images) only wastes steps here.
        "shift": 1.0,
        "default_guidance_scale": 2.0,
        "image_size": 16,
        "num_classes": NUM_CLASSES,
    }


def parse_prompt(prompt: str) -> int:
    """``"digit 7"`` -> 7, ``""`` -> :data:`NULL_ID`; anything else is a clear error."""
    if not isinstance(prompt, str):
        raise ValueError(f"digits prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
    text = prompt.strip()
    if text == NULL_PROMPT:
        return NULL_ID
    match = _PROMPT_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"unknown prompt {prompt!r} for the digits backbone; allowed prompts are "
            f"'digit 0' … 'digit 9' and the null prompt ''"
        )
    return int(match.group(1))


def prompt_labels(prompts: Sequence[str]) -> torch.Tensor:
    """Class index of each prompt (int64); the null prompt is rejected since it has no class."""
    ids = [parse_prompt(p) for p in prompts]
    if NULL_ID in ids:
        raise ValueError("the null prompt '' has no digit class; use 'digit 0' … 'digit 9'")
    return torch.tensor(ids, dtype=torch.long)


class DigitsTextEncoder(nn.Module):
    """Learned embeddings standing in for SD3's text encoders: prompt id -> (sequence, pooled)."""

    def __init__(self, seq_len: int, joint_dim: int, pooled_dim: int, num_prompts: int = NUM_CLASSES + 1):
        super().__init__()
        self.seq_len, self.joint_dim = seq_len, joint_dim
        self.tokens = nn.Embedding(num_prompts, seq_len * joint_dim)
        self.pooled = nn.Embedding(num_prompts, pooled_dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens(ids).view(-1, self.seq_len, self.joint_dim), self.pooled(ids)


@dataclass
class DigitsCondition:
    """Encoded prompts: the positive branch and the null (negative) branch, batch-aligned."""

    prompts: list[str]
    labels: torch.Tensor  # prompt ids (NULL_ID for "")
    encoder_hidden_states: torch.Tensor  # B×seq×joint_dim
    pooled_projections: torch.Tensor  # B×pooled_dim
    negative_encoder_hidden_states: torch.Tensor
    negative_pooled_projections: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)


class DigitsBackbone:
    """The digits adapter; implements :class:`flowbp.backbones.base.Backbone`."""

    name = "digits"
    trains_on_default_prompts = True  # "digit 0" … "digit 9": the class labels are the whole prompt set

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """A randomly initialised backbone (use :meth:`from_pretrained` for the shipped weights)."""
        self.config = default_config() if config is None else config
        tcfg = self.config["transformer"]
        self.device, self.dtype = torch.device(device), dtype
        self.transformer: nn.Module = SD3Transformer2DModel(**tcfg).to(self.device)
        if dtype != torch.float32:  # (diffusers warns on any .to(dtype), even a no-op float32 one)
            self.transformer.to(dtype)
        self.text_encoder = DigitsTextEncoder(
            self.config["text_seq_len"], tcfg["joint_attention_dim"], tcfg["pooled_projection_dim"]
        ).to(self.device, dtype)
        self.text_encoder.requires_grad_(False)
        self.shift = float(self.config["shift"])
        self.default_guidance_scale = float(self.config["default_guidance_scale"])
        self.image_size = int(self.config["image_size"])

    # ------------------------------------------------------------------ construction / persistence
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> DigitsBackbone:
        """Load weights written by :meth:`save_pretrained`; ``path=None`` loads the shipped assets.

        ``path`` is a directory holding ``digits_flow.safetensors`` and ``digits_flow.json``
        (e.g. the ``--out`` of ``flowbp pretrain digits``).
        """
        directory = ASSETS_DIR if path is None else Path(path)
        config_file, weights_file = directory / FLOW_CONFIG, directory / FLOW_WEIGHTS
        if not weights_file.is_file() or not config_file.is_file():
            raise FileNotFoundError(
                f"no digits flow model in {directory} (expected {FLOW_WEIGHTS} and {FLOW_CONFIG}); "
                "create one with `flowbp pretrain digits --out DIR`"
            )
        config = json.loads(config_file.read_text())
        backbone = cls({k: v for k, v in config.items() if k != "training"}, device=device, dtype=dtype)
        state = load_file(str(weights_file))
        backbone.transformer.load_state_dict(_strip(state, "transformer."))
        backbone.text_encoder.load_state_dict(_strip(state, "text_encoder."))
        backbone.transformer.eval()
        return backbone

    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write the full model (transformer + prompt embeddings) and its JSON config to ``path``."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        state = {f"transformer.{k}": v for k, v in self.transformer.state_dict().items()}
        state.update({f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()})
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, str(directory / FLOW_WEIGHTS))
        config = dict(self.config)
        if extra:
            config["training"] = extra
        (directory / FLOW_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    # ------------------------------------------------------------------ the protocol
    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str = NULL_PROMPT) -> DigitsCondition:
        """Look up the prompt embeddings (and the null prompt's, for the CFG negative branch)."""
        if isinstance(prompts, str):  # a bare string would otherwise be iterated per character
            prompts = [prompts]
        ids = torch.tensor([parse_prompt(p) for p in prompts], dtype=torch.long, device=self.device)
        neg = torch.full_like(ids, parse_prompt(negative_prompt))
        with torch.no_grad():  # the embeddings are frozen: conditions are constants, cacheable
            ehs, pooled = self.text_encoder(ids)
            neg_ehs, neg_pooled = self.text_encoder(neg)
        return DigitsCondition(list(prompts), ids, ehs, pooled, neg_ehs, neg_pooled)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The paper's training grid σ_0 = 1 > … > σ_N = 0 with this config's shift, as float64.

        :func:`flowbp.trajectory.training_sigmas`: ``s = linspace(1, 1/N, N)`` shifted, then 0 (so
        σ_{N−1} = 1/N with shift 1). It is what this backbone's FlowMatchEulerDiscreteScheduler yields
        for ``set_timesteps(sigmas=linspace(1, 1/N, N))`` (a test checks it), as the SD3 pipeline
        does when called with ``sigmas=``.
        """
        return training_sigmas(num_steps, self.shift)

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_0 ~ N(0, I) of shape B×1×16×16 (drawn on the generator's device, then moved)."""
        gen_device = generator.device if generator is not None else self.device
        noise = torch.randn(
            (batch_size, 1, self.image_size, self.image_size), generator=generator, device=gen_device
        )
        return noise.to(self.device, self.dtype)

    def transformer_forward(
        self, x: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """One raw (unguided) transformer call; ``timestep`` is σ·1000 per sample.

        The timestep stays float32 whatever the model dtype (as in the SD3 pipeline): in bf16,
        σ·1000 would be rounded to steps of 4–8 and neighbouring Euler nodes would collide.
        """
        return self.transformer(
            hidden_states=x, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=timestep,
            return_dict=False,
        )[0]

    def velocity_fn(
        self, condition: DigitsCondition, guidance_scale: float | None = None, detach_uncond: bool = False
    ) -> VelocityFn:
        """Bind a condition into ``velocity(x, sigma)`` with real CFG ``v_u + g (v_c − v_u)``.

        ``guidance_scale=None`` uses the config default (2.0 for the shipped model); ``g = 1``
        skips the unconditional branch entirely. Otherwise cond and uncond run as one batched
        transformer call (as in the SD3 pipeline). ``detach_uncond`` stops the gradient through
        v_u (its activations are still computed in the same batch, so forward values are
        bit-identical with and without it).
        """
        g = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)

        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
            batch = x.shape[0]
            ehs = expand_batch(condition.encoder_hidden_states, batch)
            pooled = expand_batch(condition.pooled_projections, batch)
            if g == 1.0:
                t = torch.full((batch,), float(sigma) * 1000.0, device=x.device)
                return self.transformer_forward(x, t, ehs, pooled)
            neg_ehs = expand_batch(condition.negative_encoder_hidden_states, batch)
            neg_pooled = expand_batch(condition.negative_pooled_projections, batch)
            t = torch.full((2 * batch,), float(sigma) * 1000.0, device=x.device)
            out = self.transformer_forward(
                torch.cat([x, x]), t, torch.cat([ehs, neg_ehs]), torch.cat([pooled, neg_pooled])
            )
            v_c, v_u = out.chunk(2)
            if detach_uncond:
                v_u = v_u.detach()
            return v_u + g * (v_c - v_u)

        return velocity

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Identity VAE: latents in [-1, 1] -> images in [0, 1], repeated to B×3×H×W.

        Clamped like diffusers' image post-processing (``(x/2 + 0.5).clamp(0, 1)``), so the
        gradient is exact inside the range and zero for saturated pixels, as with a real VAE
        pipeline.
        """
        return (latents / 2 + 0.5).clamp(0.0, 1.0).expand(-1, 3, -1, -1)

    def default_prompts(self) -> list[str]:
        """The ten class prompts ``"digit 0"`` … ``"digit 9"`` (training / evaluation default)."""
        return list(PROMPTS)

    # ------------------------------------------------------------------ LoRA
    def add_lora(
        self, rank: int, alpha: float | None = None, target_modules: Sequence[str] | None = None
    ) -> None:
        """Freeze the transformer and attach a peft LoRA adapter named ``default`` (B = 0 init)."""
        from peft import LoraConfig

        self.transformer.requires_grad_(False)
        config = LoraConfig(
            r=rank,
            lora_alpha=float(rank if alpha is None else alpha),
            target_modules=list(DEFAULT_LORA_TARGETS if target_modules is None else target_modules),
            init_lora_weights=True,
        )
        self.transformer.add_adapter(config)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimiser should see (the LoRA adapter after :meth:`add_lora`)."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def save_lora(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Save the adapter to directory ``path`` as ``pytorch_lora_weights.safetensors``.

        Diffusers' pipeline format (keys ``transformer.…`` plus the peft config as metadata), so
        that ``load_lora_weights`` restores rank *and* alpha.
        """
        # The pipeline class would import its CLIP image processors (and their warnings); the mixin suffices.
        from diffusers.loaders import SD3LoraLoaderMixin
        from peft.utils import get_peft_model_state_dict

        SD3LoraLoaderMixin.save_lora_weights(
            str(path),
            transformer_lora_layers=get_peft_model_state_dict(self.transformer, state_dict=state_dict),
            transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict(),
            weight_name=LORA_WEIGHT_NAME,
        )

    def load_lora(self, path: str | Path) -> None:
        """Load an adapter saved by :meth:`save_lora` (directory or file), replacing any current one."""
        path = Path(path)
        directory, weight_name = (path.parent, path.name) if path.is_file() else (path, LORA_WEIGHT_NAME)
        if getattr(self.transformer, "peft_config", None) and "default" in self.transformer.peft_config:
            self.transformer.delete_adapters("default")
        self.transformer.load_lora_adapter(
            str(directory), weight_name=weight_name, prefix="transformer", adapter_name="default"
        )

    # ------------------------------------------------------------------ convenience
    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        num_steps: int = 25,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Plain Euler sampling without gradient; returns images B×3×16×16 in [0, 1].

        Reference sampler for metrics and tests; training uses the engine's cached rollout.
        """
        cond = self.encode_prompts(prompts)
        velocity = self.velocity_fn(cond, guidance_scale)
        x = self.initial_noise(len(cond), generator) if noise is None else noise.to(self.device, self.dtype)
        sig = self.sigmas(num_steps).tolist()
        for i in range(num_steps):
            x = x + (sig[i + 1] - sig[i]) * velocity(x, sig[i])
        return self.decode(x)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
