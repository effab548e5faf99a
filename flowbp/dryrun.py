"""Memory before money: estimate a real-backbone training step's peak memory without any weights.

``flowbp train ... --dry-run`` builds the full-size transformer (and VAE) of the configured backbone
from its published config on the ``meta`` device (shapes only: no weights, no memory, no download),
runs one gradient forward at the configured resolution, micro-batch and dtype under the saved-tensor
meter (:mod:`flowbp.memory`), and adds up

    peak ≈ weights + gradients + AdamW + EMA                       (trainable parameters in fp32)
         + grad forwards of the method × bytes saved by one forward
         + reward inputs × bytes saved by one differentiable VAE decode

Transformer gradient checkpointing is accounted for: the checkpointed blocks keep only their inputs,
and one block's activations are rebuilt at a time in backward. Not included: the reward model (its
weights and activations; HPSv2's ViT-H adds a few GB), the text encoders (they leave the accelerator
after encoding), the allocator's fragmentation and CUDA workspaces. Treat the figure as a floor.

Memory is per process: ``batch_size`` is the global batch of one optimizer step, split into
``processes × gradient_accumulation_steps`` micro-batches, and one process only ever holds the
activations of its micro-batch (``--processes P``, default 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# The LoRA targets are the adapters' own defaults, so the estimate trains exactly what training would.
from flowbp.backbones.flux1 import FLUX1_LORA_TARGETS
from flowbp.backbones.flux2_klein import KLEIN_LORA_TARGETS
from flowbp.backbones.qwen_image import QWEN_IMAGE_LORA_TARGETS
from flowbp.backbones.sd3 import SD3_LORA_TARGETS
from flowbp.backbones.z_image import Z_IMAGE_LORA_TARGETS
from flowbp.memory import saved_tensor_bytes, storage_key

GiB = 1024**3
#: the paper's launch: one node of 8 GPUs (the FSDP line of a one-process dry run shows this layout)
FSDP_REFERENCE_PROCESSES = 8
_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def _vae_kl_config(latent_channels: int, scaling: float, shift: float) -> dict[str, Any]:
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": latent_channels,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
        "use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": scaling, "shift_factor": shift,
    }


@dataclass(frozen=True)
class Architecture:
    """A full-size published architecture (shared/reference/backbone_configs.md §1–§2, §4, §6)."""

    backbone: str
    title: str
    transformer_class: str
    transformer_config: dict[str, Any]
    vae_class: str
    vae_config: dict[str, Any]
    vae_latent_channels: int
    text_len: int  # tokens at the paper's max_sequence_length (512)
    lora_targets: tuple[str, ...] | str
    #: (batch, resolution, text_len, dtype, device) -> transformer kwargs of one call
    make_inputs: Callable[[int, int, int, torch.dtype, torch.device], dict[str, Any]]
    #: real CFG with a negative branch; it carries activations only when not detached (a detached
    #: negative branch runs as its own no-grad call in the adapters, as in the paper's trainers)
    real_cfg: bool
    vae_factor: int = 8
    #: the VAE decodes video-shaped latents (B, C, 1, H, W) (Qwen-Image's causal 3-D VAE)
    vae_frames: bool = False


def sd3_inputs(
    latent_channels: int = 16, vae_factor: int = 8, text_dim: int = 4096, pooled_dim: int = 2048
) -> Callable[..., dict[str, Any]]:
    """An SD3-family transformer's forward inputs as empty tensors (an ``Architecture.make_inputs``); the
    defaults are SD3.5's, other widths serve smaller SD3 configs (the tests' tiny pipeline)."""

    def make_inputs(batch: int, res: int, text_len: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        side = res // vae_factor
        return {
            "hidden_states": torch.empty(batch, latent_channels, side, side, dtype=dtype, device=device),
            "encoder_hidden_states": torch.empty(batch, text_len, text_dim, dtype=dtype, device=device),
            "pooled_projections": torch.empty(batch, pooled_dim, dtype=dtype, device=device),
            "timestep": torch.empty(batch, dtype=torch.float32, device=device),
        }

    return make_inputs


def _flux1_inputs(batch: int, res: int, text_len: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    tokens = (res // 16) ** 2  # packed 2×2 latents: (B, (H/16)(W/16), 64)
    return {
        "hidden_states": torch.empty(batch, tokens, 64, dtype=dtype, device=device),
        "encoder_hidden_states": torch.empty(batch, text_len, 4096, dtype=dtype, device=device),
        "pooled_projections": torch.empty(batch, 768, dtype=dtype, device=device),
        "timestep": torch.empty(batch, dtype=dtype, device=device),
        "img_ids": torch.empty(tokens, 3, dtype=dtype, device=device),
        "txt_ids": torch.empty(text_len, 3, dtype=dtype, device=device),
        "guidance": torch.empty(batch, dtype=torch.float32, device=device),
    }


def _klein_inputs(batch: int, res: int, text_len: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    tokens = (res // 16) ** 2  # patchified latents (B, 128, H/16, W/16), packed by the pipeline to (B, L, 128)
    return {
        "hidden_states": torch.empty(batch, tokens, 128, dtype=dtype, device=device),
        "encoder_hidden_states": torch.empty(batch, text_len, 12288, dtype=dtype, device=device),
        "timestep": torch.empty(batch, dtype=dtype, device=device),
        "img_ids": torch.empty(batch, tokens, 4, dtype=torch.int64, device=device),
        "txt_ids": torch.empty(batch, text_len, 4, dtype=torch.int64, device=device),
    }


def _flux2_inputs(joint_dim: int, guidance: bool) -> Callable[..., dict[str, Any]]:
    """FLUX.2 inputs (Klein-4B: joint 7680, no guidance; FLUX.2-dev: joint 15360 and the guidance embedding)."""

    def make(batch: int, res: int, text_len: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        inputs = _klein_inputs(batch, res, text_len, dtype, device)
        inputs["encoder_hidden_states"] = torch.empty(batch, text_len, joint_dim, dtype=dtype, device=device)
        if guidance:
            inputs["guidance"] = torch.empty(batch, dtype=torch.float32, device=device)
        return inputs

    return make


def _qwen_image_inputs(batch: int, res: int, text_len: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    side = res // 16  # packed 2×2 latents: (B, (H/16)(W/16), 64)
    return {
        "hidden_states": torch.empty(batch, side * side, 64, dtype=dtype, device=device),
        "encoder_hidden_states": torch.empty(batch, text_len, 3584, dtype=dtype, device=device),
        "timestep": torch.empty(batch, dtype=dtype, device=device),
        "img_shapes": [[(1, side, side)]] * batch,
    }


def _z_image_inputs(batch: int, res: int, text_len: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    side = res // 8  # a list of (16, 1, H/8, W/8) latent frames and a list of (L, 2560) caption features
    return {
        "x": [torch.empty(16, 1, side, side, dtype=dtype, device=device) for _ in range(batch)],
        "t": torch.empty(batch, dtype=dtype, device=device),
        "cap_feats": [torch.empty(text_len, 2560, dtype=dtype, device=device) for _ in range(batch)],
    }


_KLEIN_COMMON = {
    "patch_size": 1, "in_channels": 128, "out_channels": None, "attention_head_dim": 128,
    "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000,
    "eps": 1e-6,
}

ARCHITECTURES: dict[str, Architecture] = {
    "sd3": Architecture(
        backbone="sd3",
        title="SD3.5-Medium",
        transformer_class="SD3Transformer2DModel",
        transformer_config={
            "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
            "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
            "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
        },
        vae_class="AutoencoderKL",
        vae_config=_vae_kl_config(16, 1.5305, 0.0609),
        vae_latent_channels=16,
        text_len=77 + 512,
        lora_targets=SD3_LORA_TARGETS,
        make_inputs=sd3_inputs(),
        real_cfg=True,
    ),
    "flux1": Architecture(
        backbone="flux1",
        title="FLUX.1-dev",
        transformer_class="FluxTransformer2DModel",
        transformer_config={
            "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
        },
        vae_class="AutoencoderKL",
        vae_config=_vae_kl_config(16, 0.3611, 0.1159),
        vae_latent_channels=16,
        text_len=512,
        lora_targets=FLUX1_LORA_TARGETS,
        make_inputs=_flux1_inputs,
        real_cfg=False,  # guidance-distilled: no negative branch
    ),
    "flux2-klein": Architecture(
        backbone="flux2-klein",
        title="FLUX.2-Klein-base-9B",
        transformer_class="Flux2Transformer2DModel",
        transformer_config={
            "patch_size": 1, "in_channels": 128, "out_channels": None, "num_layers": 8, "num_single_layers": 24,
            "attention_head_dim": 128, "num_attention_heads": 32, "joint_attention_dim": 12288,
            "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32),
            "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False,
        },
        vae_class="AutoencoderKLFlux2",
        vae_config={"latent_channels": 32},
        vae_latent_channels=32,
        text_len=512,
        lora_targets=KLEIN_LORA_TARGETS,
        make_inputs=_klein_inputs,
        real_cfg=True,
    ),
    # ------------------------------------------------ issue 17 (shared/reference/backbones_next.md §1–§2)
    "qwen-image": Architecture(
        backbone="qwen-image",
        title="Qwen-Image",
        transformer_class="QwenImageTransformer2DModel",
        transformer_config={
            "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
            "axes_dims_rope": (16, 56, 56),
        },
        vae_class="AutoencoderKLQwenImage",
        vae_config={},  # the class defaults are Qwen-Image's VAE (z_dim 16, base_dim 96, dims ×1 2 4 4)
        vae_latent_channels=16,
        text_len=512,  # an upper bound: prompts are not padded, max_sequence_length caps them
        lora_targets=QWEN_IMAGE_LORA_TARGETS,
        make_inputs=_qwen_image_inputs,
        real_cfg=True,
        vae_frames=True,
    ),
    "z-image": Architecture(
        backbone="z-image",
        title="Z-Image",
        transformer_class="ZImageTransformer2DModel",
        transformer_config={
            "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
            "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "qk_norm": True, "cap_feat_dim": 2560,
            "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
        },
        vae_class="AutoencoderKL",
        vae_config=_vae_kl_config(16, 0.3611, 0.1159),
        vae_latent_channels=16,
        text_len=512,  # an upper bound: prompts are not padded, max_sequence_length caps them
        lora_targets=Z_IMAGE_LORA_TARGETS,
        make_inputs=_z_image_inputs,
        real_cfg=True,
    ),
    "flux2": Architecture(
        backbone="flux2",
        title="FLUX.2-dev",
        transformer_class="Flux2Transformer2DModel",
        transformer_config={
            **_KLEIN_COMMON, "num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48,
            "joint_attention_dim": 15360, "guidance_embeds": True,
        },
        vae_class="AutoencoderKLFlux2",
        vae_config={"latent_channels": 32},
        vae_latent_channels=32,
        text_len=512,
        lora_targets=KLEIN_LORA_TARGETS,
        make_inputs=_flux2_inputs(15360, guidance=True),
        real_cfg=False,  # guidance-distilled: no negative branch
    ),
    # variants of the sd3 / flux2-klein backbones, chosen by backbone_path (VARIANTS below)
    "sd3-large": Architecture(
        backbone="sd3",
        title="SD3.5-Large",
        transformer_class="SD3Transformer2DModel",
        transformer_config={
            "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38, "attention_head_dim": 64,
            "num_attention_heads": 38, "joint_attention_dim": 4096, "caption_projection_dim": 2432,
            "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192, "qk_norm": "rms_norm",
        },
        vae_class="AutoencoderKL",
        vae_config=_vae_kl_config(16, 1.5305, 0.0609),
        vae_latent_channels=16,
        text_len=77 + 512,
        lora_targets=SD3_LORA_TARGETS,
        make_inputs=sd3_inputs(),
        real_cfg=True,
    ),
    "flux2-klein-4b": Architecture(
        backbone="flux2-klein",
        title="FLUX.2-Klein-base-4B",
        transformer_class="Flux2Transformer2DModel",
        transformer_config={
            **_KLEIN_COMMON, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
            "joint_attention_dim": 7680, "guidance_embeds": False,
        },
        vae_class="AutoencoderKLFlux2",
        vae_config={"latent_channels": 32},
        vae_latent_channels=32,
        text_len=512,
        lora_targets=KLEIN_LORA_TARGETS,
        make_inputs=_flux2_inputs(7680, guidance=False),
        real_cfg=True,
    ),
}
#: backbone_path -> architecture, for a backbone whose folders come in several sizes (default: the
#: architecture named like the backbone)
VARIANTS: dict[str, str] = {
    "stabilityai/stable-diffusion-3.5-large": "sd3-large",
    "black-forest-labs/FLUX.2-klein-base-4B": "flux2-klein-4b",
    "black-forest-labs/FLUX.2-klein-4B": "flux2-klein-4b",
}


class _FlashAttentionShapes(torch.autograd.Function):
    """Scaled-dot-product attention on meta tensors saving what the fused kernels save.

    On meta tensors PyTorch decomposes attention into the math path, which saves the B×H×L×L score
    matrix; the flash / memory-efficient kernels used on GPUs (and the CPU flash kernel) keep only
    q, k, v, the output and a float32 log-sum-exp per query.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def fused_attention_on_meta() -> Iterator[None]:
    """Route meta-tensor attention through :class:`_FlashAttentionShapes` (real tensors are untouched)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if query.device.type != "meta":
            return original(query, key, value, *args, **kwargs)
        return _FlashAttentionShapes.apply(query, key, value)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def build_meta(cls_name: str, config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """Instantiate a diffusers model on the meta device (shapes only, no memory)."""
    import diffusers

    cls = getattr(diffusers, cls_name)
    with torch.device("meta"):
        model = cls(**config)
    if dtype != torch.float32:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model.eval()


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks diffusers checkpoints under ``enable_gradient_checkpointing``."""
    out: list[nn.Module] = []
    for name in ("transformer_blocks", "single_transformer_blocks", "noise_refiner", "context_refiner", "layers"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList):
            out.extend(blocks)
    return out


@contextlib.contextmanager
def _block_probe(model: nn.Module, exclude: set[tuple[int, int]]) -> Iterator[dict[str, int]]:
    """Record the distinct bytes of the tensor inputs of every block call (what a checkpointed block keeps)."""
    stats = {"inputs": 0}
    seen: set[tuple[int, int]] = set(exclude)

    def pre(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        for value in (*args, *kwargs.values()):
            for t in value if isinstance(value, tuple | list) else (value,):
                if isinstance(t, torch.Tensor) and storage_key(t) not in seen:
                    seen.add(storage_key(t))
                    stats["inputs"] += t.untyped_storage().nbytes()

    handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in _blocks(model)]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _max_block_bytes(model: nn.Module, exclude: list[torch.Tensor], call: Callable[[], Any]) -> int:
    """Largest activation footprint of one block (what backward rebuilds at once under checkpointing)."""
    deltas: list[int] = []
    with saved_tensor_bytes(exclude=exclude) as meter:
        start: dict[int, int] = {}

        def pre(module: nn.Module, *_: Any) -> None:
            start[id(module)] = meter.total

        def post(module: nn.Module, *_: Any) -> None:
            deltas.append(meter.total - start[id(module)])

        handles = [h for b in _blocks(model) for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
        try:
            call()
        finally:
            for h in handles:
                h.remove()
    return max(deltas, default=0)


def forward_saved_bytes(model: nn.Module, inputs: dict[str, Any], checkpointing: bool) -> int:
    """Bytes autograd keeps for one gradient forward of ``model`` (meta or real tensors).

    Without checkpointing: the saved-tensor meter over the call. With checkpointing (diffusers'
    non-reentrant block checkpointing): what the meter sees outside the blocks + every block's
    inputs (kept for the recomputation) + the largest single block (rebuilt in backward).
    """
    params = list(model.parameters())
    skip = {storage_key(p) for p in params}

    def call() -> Any:
        with fused_attention_on_meta():
            return model(**inputs, return_dict=False)[0]

    if not checkpointing:
        with saved_tensor_bytes(exclude=params) as meter:
            call()
        return meter.total
    was = getattr(model, "gradient_checkpointing", False)
    model.disable_gradient_checkpointing()
    largest = _max_block_bytes(model, params, call)
    model.enable_gradient_checkpointing()
    try:
        with saved_tensor_bytes(exclude=params) as meter, _block_probe(model, skip) as probe:
            call()
    finally:
        if not was:
            model.disable_gradient_checkpointing()
    return meter.total + probe["inputs"] + largest


def decode_saved_bytes(vae: nn.Module, latents: torch.Tensor, checkpointing: bool) -> int:
    """Bytes kept by one differentiable VAE decode (gradient flows to the latents only)."""
    if checkpointing:
        vae.enable_gradient_checkpointing()
    latents = latents.detach().requires_grad_(True)
    with saved_tensor_bytes(exclude=list(vae.parameters())) as meter, fused_attention_on_meta():
        vae.decode(latents, return_dict=False)
    if checkpointing:
        vae.disable_gradient_checkpointing()
    return meter.total


@dataclass
class Estimate:
    backbone: str
    title: str
    method: str
    finetune: str
    resolution: int
    batch_size: int
    dtype: str
    parameters: int
    trainable: int
    forward_bytes: int  # one gradient forward (with the CFG branch it carries)
    decode_bytes: int  # one differentiable VAE decode of the batch
    grad_forwards: int  # worst case over plan draws
    reward_inputs: int
    checkpointed_plan: bool  # AlignProp-style per-call checkpointing
    weights_bytes: int
    optimizer_bytes: int  # gradients + AdamW moments (+ EMA copy)
    latent_bytes: int
    # the layout: ``batch_size`` above is the micro-batch of one process;
    # global batch = processes × accumulation × micro-batch
    processes: int = 1
    accumulation: int = 1
    processes_given: bool = True  # False: ``--processes`` was omitted and 1 was assumed (said in the report)
    fsdp_layout: Estimate | None = None  # with one process: the estimate of the paper's 8-process layout
    base_quantization: str = "none"
    optimizer: str = "adamw"
    vae_bytes: int = 0  # part of weights_bytes: not sharded by FSDP2 (only the transformer is)
    #: what FSDP2 holds gathered at once: two blocks (one computing, one prefetched) and the parameters
    #: outside the blocks (the root group), in the compute dtype
    gathered_bytes: int = 0
    offload: str = "none"

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.processes * self.accumulation

    @property
    def activation_bytes(self) -> int:
        if self.checkpointed_plan:  # every call keeps its input latent; one call is rebuilt at a time
            calls = self.grad_forwards * 2 * self.latent_bytes + self.forward_bytes
        else:
            calls = self.grad_forwards * self.forward_bytes
        return calls + self.reward_inputs * self.decode_bytes

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.optimizer_bytes + self.activation_bytes

    def sharded_peak_bytes(self, gpus: int) -> int:
        """Per-GPU peak with FSDP2 sharding the transformer over ``gpus`` (full fine-tuning as in the paper, or a
        LoRA with its frozen base): its weights and the optimizer split, plus the gathered blocks (as
        :func:`flowbp.planner.memory`)."""
        transformer = self.weights_bytes - self.vae_bytes
        return (transformer // gpus + self.gathered_bytes + self.vae_bytes + self.optimizer_bytes // gpus
                + self.activation_bytes)

    def report(self) -> str:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        ckpt = " (per-call checkpointing: inputs kept, one call rebuilt)" if self.checkpointed_plan else ""
        procs = f"{self.processes} process{'es' if self.processes > 1 else ''}"
        implicit = [] if self.processes_given else [
            f"  no --processes: 1 process (one GPU holds all {self.global_batch // self.accumulation} samples of "
            f"each micro-step); pass --processes P for P GPUs"
        ]
        modes = []
        if self.base_quantization != "none":
            modes.append(f"{self.base_quantization} base")
        if self.optimizer != "adamw":
            modes.append("8-bit AdamW")
        if self.offload != "none":
            modes.append(f"offload {self.offload}")
        mode_text = f", {', '.join(modes)}" if modes else ""
        return "\n".join([
            f"dry run: {self.title} ({self.backbone}) × {self.method}, {self.finetune} fine-tuning{mode_text}, "
            f"{self.resolution}² px, {self.dtype} compute (meta device: no weights loaded)",
            *implicit,
            f"  micro-batch per process        {self.batch_size}  (global batch {self.global_batch} = "
            f"{procs} × {self.accumulation} accumulation × {self.batch_size})",
            f"  parameters            {self.parameters:>16,}",
            f"  trainable             {self.trainable:>16,}",
            f"  saved by one grad forward      {g(self.forward_bytes)}",
            f"  saved by one VAE decode        {g(self.decode_bytes)}",
            f"  grad forwards (worst draw)     {self.grad_forwards}{ckpt}",
            f"  weights                        {g(self.weights_bytes)}",
            f"  grads + AdamW (+ EMA)          {g(self.optimizer_bytes)}",
            f"  activations                    {g(self.activation_bytes)}",
            f"  estimated peak                 {g(self.peak_bytes)}  (floor: reward model and allocator overhead"
            " not included)",
            *self._fsdp_lines(),
        ])

    def _fsdp_lines(self) -> list[str]:
        """The FSDP line, always per process: the sharded weights plus the activations of the micro-batch
        each process really holds (with one process: the paper's 8-GPU layout, estimated separately)."""
        from flowbp.memory_modes import FSDP2_BASE_QUANTIZATIONS

        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        if self.base_quantization not in FSDP2_BASE_QUANTIZATIONS:  # the trainer refuses it before building
            allowed = ", ".join(FSDP2_BASE_QUANTIZATIONS)
            return [f"  FSDP: not available with base_quantization {self.base_quantization} (torchao's tensor cannot "
                    f"be sharded; allowed under FSDP2: {allowed}); more processes replicate the model (DDP)"]
        if self.processes > 1:
            return [f"  {f'per GPU, FSDP over {self.processes} GPUs':<30} "
                    f"{g(self.sharded_peak_bytes(self.processes))}  (--processes {self.processes}: micro-batch "
                    f"{self.batch_size} per process)"]
        if self.fsdp_layout is None:
            return [f"  FSDP: not estimated (the global batch {self.global_batch} does not split over "
                    f"{FSDP_REFERENCE_PROCESSES} processes × {self.accumulation} accumulation); use --processes P"]
        alt = self.fsdp_layout
        return [f"  {f'per GPU, FSDP over {alt.processes} GPUs':<30} {g(alt.sharded_peak_bytes(alt.processes))}  "
                f"(as with --processes {alt.processes}: micro-batch {alt.batch_size} per process)"]


def plan_cost(method: str, method_args: dict[str, Any], num_steps: int, draws: int = 64) -> tuple[int, int, bool]:
    """(worst grad forwards, reward inputs, per-call checkpointing) over ``draws`` plans on the paper's grid."""
    from flowbp.methods import make_plan
    from flowbp.trajectory import training_sigmas

    sigmas = training_sigmas(num_steps)
    worst, inputs, ckpt = 0, 1, False
    for seed in range(draws):
        plan = make_plan(method, sigmas, seed, **method_args)
        worst = max(worst, plan.grad_forwards)
        inputs, ckpt = 1 + plan.renoised, plan.checkpoint
    return worst, inputs, ckpt


def make_trainable(model: nn.Module, arch: Architecture, finetune: str, lora_rank: int) -> int:
    """Attach the LoRA (rank = alpha, the architecture's targets) or unfreeze everything; returns the trainable
    parameter count. The estimators' stand-in for the trainer's set-up (on meta or tiny models)."""
    from peft import LoraConfig

    if finetune == "lora":
        model.requires_grad_(False)
        targets = arch.lora_targets
        model.add_adapter(LoraConfig(
            r=lora_rank, lora_alpha=lora_rank, target_modules=targets if isinstance(targets, str) else list(targets),
        ))
    else:
        model.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def estimate(
    arch: Architecture,
    method: str,
    method_args: dict[str, Any] | None = None,
    *,
    resolution: int = 512,
    batch_size: int = 1,
    num_steps: int = 25,
    finetune: str = "full",
    lora_rank: int = 8,
    dtype: torch.dtype = torch.bfloat16,
    guidance_scale: float | None = None,
    detach_negative: bool = True,
    gradient_checkpointing: bool = True,
    vae_gradient_checkpointing: bool = False,
    ema: bool = True,
    base_quantization: str = "none",
    optimizer: str = "adamw",
    offload: str = "none",
    device: str | torch.device = "meta",
    transformer: nn.Module | None = None,
    vae: nn.Module | None = None,
) -> Estimate:
    """Estimate one training step of ``method`` on ``arch`` (see the module docstring).

    ``dtype`` is the compute dtype of the forward (bf16 under the presets' autocast). ``transformer``
    / ``vae`` replace the full-size models (a test passes a tiny real model to compare with a
    measured run).
    """
    device = torch.device(device)
    model = transformer
    if model is None:
        model = build_meta(arch.transformer_class, arch.transformer_config, dtype)
    parameters = sum(p.numel() for p in model.parameters())
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in _blocks(model)]
    gathered = (2 * max(block_sizes, default=0) + parameters - sum(block_sizes)) * _BYTES[dtype]
    quantized_saving = _quantized_saving(model, base_quantization, _BYTES[dtype])
    trainable = make_trainable(model, arch, finetune, lora_rank)
    g = 1.0 if guidance_scale is None else guidance_scale
    carries_negative = g > 1.0 and arch.real_cfg and not detach_negative
    call_batch = batch_size * (2 if carries_negative else 1)  # [negative, positive] batched, both with grad
    inputs = arch.make_inputs(call_batch, resolution, arch.text_len, dtype, device)
    with torch.enable_grad():
        forward = forward_saved_bytes(model, inputs, gradient_checkpointing)
        autoencoder = vae if vae is not None else build_meta(arch.vae_class, arch.vae_config, dtype)
        autoencoder.requires_grad_(False)
        side = resolution // arch.vae_factor
        frames = (1,) if arch.vae_frames else ()
        latents = torch.empty(batch_size, arch.vae_latent_channels, *frames, side, side, dtype=dtype, device=device)
        decode = decode_saved_bytes(autoencoder, latents, vae_gradient_checkpointing)
    forwards, reward_inputs, ckpt_plan = plan_cost(method, method_args or {}, num_steps)
    elem = _BYTES[dtype]
    frozen = parameters - (trainable if finetune == "full" else 0)
    vae_params = sum(p.numel() for p in autoencoder.parameters())
    weights = frozen * elem + vae_params * elem
    if finetune == "full":  # fp32 master weights + the bf16 copy autocast keeps for the forward
        weights += trainable * 4 + (trainable * elem if elem != 4 else 0)
    else:
        weights += trainable * 4 - quantized_saving  # LoRA parameters stay fp32 on the (quantized) base
        if offload in ("base", "all"):
            weights -= _streamed_saving(model, base_quantization, elem)
    moments = 8 if optimizer == "adamw" else 2  # adamw8bit: one byte per moment (block scales < 1 %)
    optimizer_bytes = trainable * (4 + moments + (4 if ema else 0))  # grad + Adam moments (+ EMA)
    latent_numel = batch_size * arch.vae_latent_channels * side * side
    return Estimate(
        backbone=arch.backbone, title=arch.title, method=method, finetune=finetune, resolution=resolution,
        batch_size=batch_size, dtype=str(dtype).removeprefix("torch."), parameters=parameters, trainable=trainable,
        forward_bytes=forward, decode_bytes=decode, grad_forwards=forwards, reward_inputs=reward_inputs,
        checkpointed_plan=ckpt_plan, weights_bytes=weights, optimizer_bytes=optimizer_bytes,
        latent_bytes=latent_numel * 4, base_quantization=base_quantization, optimizer=optimizer,
        vae_bytes=vae_params * elem, gathered_bytes=gathered, offload=offload,
    )


def _quantized_saving(model: nn.Module, mode: str, elem: int) -> int:
    """Bytes a weight-only quantized base saves over the compute dtype (the layers training quantizes)."""
    if mode == "none":
        return 0
    from flowbp.memory_modes import quantizable, quantized_weight_bytes

    dtype = {2: torch.bfloat16, 4: torch.float32}[elem]
    layers = [m for m in model.modules() if quantizable(m, mode)]
    return sum(m.weight.numel() * elem - quantized_weight_bytes(*m.weight.shape, mode, dtype) for m in layers)


def _streamed_saving(model: nn.Module, mode: str, elem: int) -> int:
    """Bytes ``offload: base`` takes off the device: every frozen linear weight as stored, but the largest (in
    flight). Reward models are not in this estimate; ``--gpu-memory`` plans count them (flowbp.planner)."""
    from flowbp.memory_modes import quantizable, quantized_weight_bytes
    from flowbp.offload import streamed_layers

    dtype = {2: torch.bfloat16, 4: torch.float32}[elem]
    stored = [quantized_weight_bytes(*m.weight.shape, mode, dtype) if quantizable(m, mode) else m.weight.numel() * elem
              for m in streamed_layers(model)]
    return sum(stored) - max(stored, default=0)


def micro_batch(batch_size: int, processes: int, accumulation: int) -> int:
    """The per-process micro-batch of a global ``batch_size`` (as :mod:`flowbp.train` splits it)."""
    if processes < 1:
        raise ValueError(f"--processes: must be >= 1, got {processes}")
    shards = processes * accumulation
    if batch_size % shards:
        raise ValueError(
            f"--processes: batch_size {batch_size} (the global batch) is not divisible by processes ({processes})"
            f" × gradient_accumulation_steps ({accumulation}) = {shards}"
        )
    return batch_size // shards


def estimate_config(config: Any, processes: int | None = None) -> Estimate:
    """The per-process estimate for a :class:`~flowbp.config.TrainConfig` launched on ``processes``
    processes (``flowbp train --dry-run [--processes P]``): one micro-batch of the global batch.

    ``processes=None`` (no ``--processes``) assumes one process and says so in the report; its FSDP
    line is then estimated for the paper's 8-process layout, with that layout's micro-batch.
    """
    if config.backbone not in ARCHITECTURES:
        known = ", ".join(sorted(a for a in ARCHITECTURES if a not in VARIANTS.values()))
        raise ValueError(f"backbone: --dry-run covers the full-size architectures ({known}), got {config.backbone!r}")
    given = processes is not None
    processes = processes if given else 1
    accumulation = config.gradient_accumulation_steps
    micro = micro_batch(config.batch_size, processes, accumulation)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
    if compute is None:
        compute = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.dtype, torch.float32)

    def one(micro: int) -> Estimate:
        return estimate(
            ARCHITECTURES[VARIANTS.get(str(config.backbone_path), config.backbone)], config.method,
            config.method_args,
            resolution=config.resolution or 512, batch_size=micro, num_steps=config.num_inference_steps,
            finetune=config.finetune, lora_rank=config.lora_rank, dtype=compute, guidance_scale=config.guidance_scale,
            detach_negative=config.detach_negative, gradient_checkpointing=config.gradient_checkpointing,
            vae_gradient_checkpointing=config.vae_gradient_checkpointing, ema=config.ema,
            base_quantization=config.base_quantization, optimizer=config.optimizer, offload=config.offload,
        )

    est = one(micro)
    est.processes, est.accumulation, est.processes_given = processes, accumulation, given
    if processes == 1 and config.batch_size % (FSDP_REFERENCE_PROCESSES * accumulation) == 0:
        alt = one(config.batch_size // (FSDP_REFERENCE_PROCESSES * accumulation))
        alt.processes, alt.accumulation = FSDP_REFERENCE_PROCESSES, accumulation
        est.fsdp_layout = alt
    return est
