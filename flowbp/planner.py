"""``flowbp train --dry-run --gpu-memory GIB [--processes P]``: the fastest recipe that fits a GPU.

The recipe space, for the config's method, backbone, fine-tuning mode and global batch (never changed):

* micro-batch × gradient accumulation (every split of ``batch_size / P`` into whole micro-batches),
* ``gradient_checkpointing`` of the transformer's grad forwards and ``vae_gradient_checkpointing``,
* ``base_quantization`` none / int8 / float8 / nf4 of the frozen transformer (LoRA only: a fully
  fine-tuned transformer is not frozen),
* ``optimizer`` adamw / adamw8bit (8-bit moments; full fine-tuning, where the moments are large),
* FSDP2 sharding over the ``P`` processes (full fine-tuning, and LoRA with a base FSDP2 can shard: none or
  nf4; the frozen base and the adapter are both sharded per block),
* ``offload`` none / reward / base / all: frozen linear weights streamed from the CPU one layer at a time
  (``flowbp.offload``; base: LoRA only, not with FSDP2).

Memory comes from one :class:`Profile` measured on the meta device (as ``--dry-run``): the bytes one
grad forward and one VAE decode save are affine in the micro-batch (measured at 1 and 2 and
extrapolated; checked against direct measurements in the tests), parameter bytes are counted per mode.

Speed is a **model, not a measurement** (``SPEED``; ``benchmarks/gpu_check.py`` measures the real
factors on a GPU). One optimizer step on one process costs

    samples per process × work per sample × (1 + MICRO_STEP_OVERHEAD / micro-batch) × mode factors

in units of one no-grad transformer forward of one sample: work per sample = rollout steps + 3 per
grad forward (forward + backward ≈ 2 forwards) + 1 more per grad forward under checkpointing (the
recomputation) + DECODE_COST × (3, or 4 checkpointed) per differentiable decode. The micro-step
overhead says a small micro-batch under-uses the GPU; the mode factors are the dequantisation cost of
a quantized base on every transformer forward and FSDP2's all-gathers. The printed "speed cost" is the
step time relative to the same processes with unlimited memory (largest micro-batch, no saving mode).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flowbp.dryrun import (
    _BYTES,
    ARCHITECTURES,
    VARIANTS,
    Architecture,
    GiB,
    _blocks,
    build_meta,
    decode_saved_bytes,
    forward_saved_bytes,
    make_trainable,
    plan_cost,
)
from flowbp.memory_modes import FSDP2_BASE_QUANTIZATIONS, quantizable, quantized_weight_bytes

#: The share of a GPU's memory a recipe's estimate may fill. The estimate counts the tensors the step allocates;
#: the CUDA context (~0.3–0.5 GiB), the caching allocator's fragmentation and the reward model's own activations
#: are not in it, so a recipe estimated at 23.9 GiB would not run on a 24 GiB card.
USABLE_FRACTION = 0.9

#: Speed-model assumptions (relative cost factors), stated rather than measured; see the module doc.
SPEED: dict[str, float] = {
    "micro_step_overhead": 0.5,  # a micro-batch of m samples runs at m / (m + 0.5) of full throughput
    "decode_cost": 1.0,  # one VAE decode of a sample ≈ one transformer forward
    "int8": 1.15,  # weight-only dequantisation on every transformer forward (rollout and grad forwards)
    "float8": 1.10,
    "nf4": 1.30,
    "fsdp2": 1.10,  # all-gather of each block in forward and backward, partly overlapped
    "adamw8bit": 1.02,  # the step itself is negligible; the 2 % states a preference for exact fp32 moments
    # offload: every transformer forward (rollout, grad forwards, their backward and recomputation) copies
    # every linear weight host -> device; at ~25 GB/s PCIe against ~1-3 TB/s HBM that dominates unless the
    # micro-batch is large. An assumption to be measured (benchmarks/gpu_check.py), not a measurement.
    "offload_base": 2.0,
    # the reward model runs once per reward input (forward + input backward): a small share of the step
    "offload_reward": 1.05,
}

#: Parameters of the reward models whose weights sit on the GPU beside the backbone (stored in the
#: compute dtype): shared/reference/reward_models.md (hpsv2: ViT-H-14 986,109,441; ImageReward BLIP
#: ≈ 446.6 M); CLIP ViT-H-14 for pickscore, ViT-L/14 (427.6 M) for clipscore, its vision tower (303.2 M)
#: + the 0.93 M MLP head for aesthetic. Rewards not listed (the digits classifiers) count as 0.
REWARD_PARAMETERS = {
    "hpsv2": 986_109_441,
    "pickscore": 986_109_441,
    "imagereward": 446_600_000,
    "clipscore": 427_616_513,
    "aesthetic": 303_179_776 + 927_969,
}

#: Elements of the reward models' ``nn.Linear`` weights (what ``offload: reward`` streams) and of the largest
#: one (the layer in flight). CLIP ViT-H-14 and ViT-L/14: counted on transformers' ``CLIPModel`` built on the
#: meta device from the configs in shared/reference/reward_models.md, whose total parameters equal
#: REWARD_PARAMETERS above (tests/test_offload.py rebuilds them); aesthetic: ViT-L/14's vision tower + the MLP
#: head; ImageReward: config arithmetic (ViT-L/16 24 × 12.58 M, BERT-base with cross-attention 12 × 9.83 M,
#: the MLP head), not checked against the file.
REWARD_LINEAR: dict[str, tuple[int, int]] = {
    "hpsv2": (933_494_784, 6_553_600),
    "pickscore": (933_494_784, 6_553_600),
    "clipscore": (388_300_800, 4_194_304),
    "aesthetic": (301_989_888 + 926_736, 4_194_304),
    "imagereward": (301_989_888 + 117_964_800 + 926_736, 4_194_304),
}


@dataclass(frozen=True)
class Affine:
    """Bytes as a function of the micro-batch: ``at1 + (m - 1) × per_sample`` (measured at m = 1, 2)."""

    at1: int
    per_sample: int

    def __call__(self, m: int) -> int:
        return self.at1 + (m - 1) * self.per_sample


@dataclass(frozen=True)
class Profile:
    """What a recipe's memory depends on, measured once per config on the meta device."""

    title: str
    backbone: str
    method: str
    finetune: str
    global_batch: int
    elem: int  # bytes per element of the compute dtype
    parameters: int  # the transformer without LoRA (counted before the adapter is attached)
    trainable: int
    linear_weights: dict[str, tuple[int, int]]  # mode -> (elements stored quantized, their quantized bytes)
    largest_block: int  # parameters of the largest transformer block (what FSDP2 gathers at once)
    vae_parameters: int
    reward_parameters: int
    forward: dict[bool, Affine]  # gradient_checkpointing -> one grad forward
    decode: dict[bool, Affine]  # vae_gradient_checkpointing -> one differentiable decode
    grad_forwards: int
    reward_inputs: int
    checkpointed_plan: bool
    latent_per_sample: int  # fp32 bytes of one sample's latent
    rollout_steps: int
    #: parameters outside the blocks (embedders, final norm and projection): FSDP2's root group, gathered
    #: for the whole forward and backward
    outside_blocks: int = 0
    # offload (flowbp.offload): elements of the base's linear weights (streamed), and the bytes of the largest
    # one as stored under each base_quantization (the layer in flight); the reward's streamed / largest elements
    linear_numel: int = 0
    largest_linear: dict[str, int] = field(default_factory=dict)
    reward_linear: int = 0
    reward_largest_linear: int = 0


@dataclass(frozen=True)
class Recipe:
    processes: int
    micro_batch: int
    accumulation: int
    gradient_checkpointing: bool
    vae_gradient_checkpointing: bool
    base_quantization: str = "none"
    optimizer: str = "adamw"
    fsdp2: bool = False
    offload: str = "none"

    def overrides(self, finetune: str) -> list[str]:
        """The exact ``--set`` overrides of this recipe (its global batch is the config's)."""
        sets = [
            f"gradient_accumulation_steps={self.accumulation}",
            f"gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
            f"vae_gradient_checkpointing={str(self.vae_gradient_checkpointing).lower()}",
        ]
        if finetune == "lora":
            sets.append(f"base_quantization={self.base_quantization}")
        else:
            sets.append(f"optimizer={self.optimizer}")
        sets.append(f"offload={self.offload}")
        return sets


@dataclass(frozen=True)
class Breakdown:
    weights: int
    optimizer: int
    activations: int
    reward: int

    @property
    def peak(self) -> int:
        return self.weights + self.optimizer + self.activations + self.reward


def _linear_weights(model: nn.Module, elem: int) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    dtype = {2: torch.bfloat16, 4: torch.float32}[elem]
    for mode in ("int8", "float8", "nf4"):
        layers = [m for m in model.modules() if quantizable(m, mode)]
        numel = sum(m.weight.numel() for m in layers)
        out[mode] = (numel, sum(quantized_weight_bytes(*m.weight.shape, mode, dtype) for m in layers))
    return out


def _largest_linear(model: nn.Module, elem: int) -> dict[str, int]:
    """Bytes of the largest linear weight as each ``base_quantization`` stores it (the streamed layer in flight)."""
    dtype = {2: torch.bfloat16, 4: torch.float32}[elem]
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    out = {"none": max((m.weight.numel() * elem for m in layers), default=0)}
    for mode in ("int8", "float8", "nf4"):
        out[mode] = max(
            (quantized_weight_bytes(*m.weight.shape, mode, dtype) if quantizable(m, mode) else m.weight.numel() * elem
             for m in layers),
            default=0,
        )
    return out


def _affine(measure: Any) -> Affine:
    one, two = measure(1), measure(2)
    return Affine(one, two - one)


def profile(
    arch: Architecture,
    method: str,
    method_args: dict[str, Any] | None = None,
    *,
    global_batch: int,
    resolution: int = 512,
    num_steps: int = 25,
    finetune: str = "lora",
    lora_rank: int = 8,
    dtype: torch.dtype = torch.bfloat16,
    guidance_scale: float | None = None,
    detach_negative: bool = True,
    rewards: tuple[str, ...] = (),
    transformer: nn.Module | None = None,
    vae: nn.Module | None = None,
) -> Profile:
    """Measure a :class:`Profile` (``transformer`` / ``vae``: tiny meta models in the tests)."""
    model = transformer if transformer is not None else build_meta(
        arch.transformer_class, arch.transformer_config, dtype
    )
    elem = _BYTES[dtype]
    parameters = sum(p.numel() for p in model.parameters())
    linear = _linear_weights(model, elem)
    linear_numel = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    largest_linear = _largest_linear(model, elem)
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in _blocks(model)]
    largest = max(block_sizes, default=0)
    trainable = make_trainable(model, arch, finetune, lora_rank)
    g = 1.0 if guidance_scale is None else guidance_scale
    branches = 2 if (g > 1.0 and arch.real_cfg and not detach_negative) else 1
    device = torch.device("meta")
    autoencoder = vae if vae is not None else build_meta(arch.vae_class, arch.vae_config, dtype)
    autoencoder.requires_grad_(False)
    side = resolution // arch.vae_factor

    def fwd(ckpt: bool) -> Any:
        return lambda m: forward_saved_bytes(
            model, arch.make_inputs(m * branches, resolution, arch.text_len, dtype, device), ckpt
        )

    def dec(ckpt: bool) -> Any:
        return lambda m: decode_saved_bytes(
            autoencoder, torch.empty(m, arch.vae_latent_channels, side, side, dtype=dtype, device=device), ckpt
        )

    with torch.enable_grad():
        forward = {c: _affine(fwd(c)) for c in (False, True)}
        decode = {c: _affine(dec(c)) for c in (False, True)}
    forwards, inputs, ckpt_plan = plan_cost(method, method_args or {}, num_steps)
    return Profile(
        title=arch.title, backbone=arch.backbone, method=method, finetune=finetune, global_batch=global_batch,
        elem=elem, parameters=parameters, trainable=trainable,
        linear_weights=linear, largest_block=largest, vae_parameters=sum(p.numel() for p in autoencoder.parameters()),
        reward_parameters=sum(REWARD_PARAMETERS.get(n, 0) for n in rewards), forward=forward, decode=decode,
        grad_forwards=forwards, reward_inputs=inputs, checkpointed_plan=ckpt_plan,
        latent_per_sample=arch.vae_latent_channels * side * side * 4, rollout_steps=num_steps,
        outside_blocks=parameters - sum(block_sizes),
        linear_numel=linear_numel, largest_linear=largest_linear,
        reward_linear=sum(REWARD_LINEAR.get(n, (0, 0))[0] for n in rewards),
        reward_largest_linear=max((REWARD_LINEAR.get(n, (0, 0))[1] for n in rewards), default=0),
    )


def memory(p: Profile, r: Recipe) -> Breakdown:
    """Per-process peak of recipe ``r`` (the dry run's terms, per mode; see :mod:`flowbp.dryrun`)."""
    if p.finetune == "lora":
        transformer = p.parameters * p.elem + p.trainable * 4  # frozen base + fp32 LoRA
        if r.base_quantization != "none":
            numel, stored = p.linear_weights[r.base_quantization]
            transformer += stored - numel * p.elem
    else:  # fp32 master weights + the compute-dtype copy autocast keeps for the forward
        transformer = p.trainable * (4 + (p.elem if p.elem != 4 else 0))
    moments = 8 if r.optimizer == "adamw" else 2  # 8-bit: one byte per moment (block scales: < 1 %)
    optimizer = p.trainable * (4 + moments + 4)  # grad + moments + EMA, as the trainer keeps them
    if r.offload in ("base", "all"):  # linear weights streamed from the CPU: the largest one is in flight
        in_flight = p.largest_linear.get(r.base_quantization, 0)
        transformer = (p.parameters - p.linear_numel) * p.elem + p.trainable * 4 + in_flight
    reward = p.reward_parameters * p.elem
    if r.offload in ("reward", "all"):
        reward = (p.reward_parameters - p.reward_linear + p.reward_largest_linear) * p.elem
    if r.fsdp2:  # sharded over the processes; one block gathered at a time (+ one prefetched) and the root
        # group (outside the blocks), in the compute dtype (an upper bound for an nf4 base, gathered as nf4)
        transformer = transformer // r.processes + (2 * p.largest_block + p.outside_blocks) * p.elem
        optimizer //= r.processes
    m = r.micro_batch
    if p.checkpointed_plan:  # AlignProp: every call keeps its input latent, one call is rebuilt at a time
        calls = p.grad_forwards * 2 * p.latent_per_sample * m + p.forward[r.gradient_checkpointing](m)
    else:
        calls = p.grad_forwards * p.forward[r.gradient_checkpointing](m)
    activations = calls + p.reward_inputs * p.decode[r.vae_gradient_checkpointing](m)
    return Breakdown(
        weights=transformer + p.vae_parameters * p.elem, optimizer=optimizer, activations=activations,
        reward=reward,
    )


def step_cost(p: Profile, r: Recipe) -> float:
    """Modelled time of one optimizer step on one process (see the module doc and ``SPEED``)."""
    per_sample = (
        p.rollout_steps
        + p.grad_forwards * (4 if r.gradient_checkpointing else 3)
        + p.reward_inputs * SPEED["decode_cost"] * (4 if r.vae_gradient_checkpointing else 3)
    )
    samples = p.global_batch // r.processes
    factor = SPEED[r.base_quantization] if r.base_quantization != "none" else 1.0
    factor *= SPEED["fsdp2"] if r.fsdp2 else 1.0
    factor *= SPEED[r.optimizer] if r.optimizer != "adamw" else 1.0
    factor *= SPEED["offload_base"] if r.offload in ("base", "all") else 1.0
    factor *= SPEED["offload_reward"] if r.offload in ("reward", "all") else 1.0
    return samples * per_sample * (1 + SPEED["micro_step_overhead"] / r.micro_batch) * factor


def recipes(p: Profile, processes: int) -> list[Recipe]:
    """Every recipe for ``processes`` processes that keeps the global batch."""
    check_processes(p.global_batch, processes)
    per_process = p.global_batch // processes
    micro = [m for m in range(1, per_process + 1) if per_process % m == 0]
    lora = p.finetune == "lora"
    quant = ("none", "int8", "float8", "nf4") if lora else ("none",)
    optim = ("adamw",) if lora else ("adamw", "adamw8bit")
    fsdp = (False, True) if processes > 1 else (False,)
    offload = ("none", "reward", "base", "all") if lora else ("none", "reward")
    out = []
    for m, ckpt, vae_ckpt, q, o, f in itertools.product(micro, (False, True), (False, True), quant, optim, fsdp):
        if f and q not in FSDP2_BASE_QUANTIZATIONS:  # torchao's int8/float8 tensors cannot be sharded
            continue
        # a streamed base is not sharded (its linear weights are no parameters): offload base / all without FSDP2
        out.extend(Recipe(processes, m, per_process // m, ckpt, vae_ckpt, q, o, f, off) for off in offload
                   if not (f and off in ("base", "all")))
    return out


def check_processes(global_batch: int, processes: int) -> None:
    if processes < 1:
        raise ValueError(f"--processes: must be >= 1, got {processes}")
    if global_batch % processes:
        raise ValueError(
            f"--processes: batch_size {global_batch} (the global batch) is not divisible by {processes} processes"
        )


@dataclass(frozen=True)
class Plan:
    profile: Profile
    budget: int  # bytes a recipe's estimate may use (USABLE_FRACTION of the GPU's memory from the CLI)
    processes: int
    best: Recipe | None  # fastest fitting recipe
    smallest: Recipe  # least memory of all recipes
    baseline: Recipe  # unlimited memory: largest micro-batch, no saving mode
    gpu_memory: int | None = None  # the GPU's memory the budget was derived from (None: the budget itself)

    @property
    def fits(self) -> bool:
        return self.best is not None

    def report(self, config_name: str | None = None) -> str:
        p = self.profile
        gib = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
        procs = f"{self.processes} process{'es' if self.processes > 1 else ''}"
        gpu = self.gpu_memory or self.budget
        head = (f"plan: {p.title} ({p.backbone}) × {p.method}, {p.finetune} fine-tuning, global batch "
                f"{p.global_batch} on {procs}, {gib(gpu)} per GPU")
        if self.gpu_memory is not None:
            head += (f" (recipes may use {gib(self.budget)}: {USABLE_FRACTION:.0%}; the rest is for the CUDA "
                     "context, the allocator's fragmentation and the reward's activations, which the estimate omits)")
        if self.best is None:
            need = memory(p, self.smallest).peak
            return (f"{head}\ndoes not fit: no recipe fits {gib(self.budget)} per GPU on {procs}; the smallest "
                    f"needs {gib(need)} ({' '.join(self.smallest.overrides(p.finetune))}"
                    f"{', FSDP2' if self.smallest.fsdp2 else ''})")
        r, b = self.best, memory(p, self.best)
        cost = step_cost(p, r) / step_cost(p, self.baseline)
        sets = " ".join(f"--set {s}" for s in r.overrides(p.finetune))
        config = f"--config {config_name} " if config_name else ""
        launch = "flowbp"
        if r.processes > 1:
            preset = "fsdp2" if r.fsdp2 else "multi-gpu"
            launch = (f'accelerate launch --config_file "$(flowbp accelerate-config {preset})" '
                      f"--num_processes {r.processes} -m flowbp")
        modes = [f"micro-batch {r.micro_batch} × {r.accumulation} accumulation"]
        modes += ["checkpointed grad forwards"] * r.gradient_checkpointing
        modes += ["checkpointed VAE decode"] * r.vae_gradient_checkpointing
        modes += [f"{r.base_quantization} base"] * (r.base_quantization != "none")
        modes += ["8-bit AdamW"] * (r.optimizer == "adamw8bit") + ["FSDP2 sharding"] * r.fsdp2
        modes += [f"offload {r.offload} (streamed from the CPU)"] * (r.offload != "none")
        return "\n".join([
            head,
            f"fastest fitting recipe: {', '.join(modes)}",
            f"  {launch} train {config}{sets}",
            f"  estimated peak {gib(b.peak)} per GPU (weights {gib(b.weights)}, grads + optimizer + EMA "
            f"{gib(b.optimizer)}, activations {gib(b.activations)}, reward model {gib(b.reward)})",
            f"  speed cost ×{cost:.2f} the step time with unlimited memory (modelled: flowbp.planner.SPEED)",
        ])


def search(p: Profile, budget_bytes: int, processes: int) -> Plan:
    """The fastest recipe whose estimated peak fits ``budget_bytes`` (ties: the smaller peak)."""
    candidates = recipes(p, processes)
    fitting = [r for r in candidates if memory(p, r).peak <= budget_bytes]
    best = min(fitting, key=lambda r: (step_cost(p, r), memory(p, r).peak)) if fitting else None
    smallest = min(candidates, key=lambda r: (memory(p, r).peak, step_cost(p, r)))
    per_process = p.global_batch // processes
    baseline = Recipe(processes, per_process, 1, False, False)
    return Plan(p, budget_bytes, processes, best, smallest, baseline)


def profile_config(config: Any) -> Profile:
    """The :class:`Profile` of a :class:`~flowbp.config.TrainConfig` (its full-size architecture)."""
    if config.backbone not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"backbone: --dry-run covers the full-size architectures ({known}), got {config.backbone!r}")
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
    if compute is None:
        compute = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.dtype, torch.float32)
    from flowbp.rewards import parse_reward_spec

    return profile(
        ARCHITECTURES[VARIANTS.get(str(config.backbone_path), config.backbone)], config.method, config.method_args,
        global_batch=config.batch_size,
        resolution=config.resolution or 512, num_steps=config.num_inference_steps, finetune=config.finetune,
        lora_rank=config.lora_rank, dtype=compute, guidance_scale=config.guidance_scale,
        detach_negative=config.detach_negative, rewards=tuple(parse_reward_spec(config.reward)),
    )


def plan_for_gpu(p: Profile, gpu_memory_gib: float, processes: int) -> Plan:
    """:func:`search` within ``USABLE_FRACTION`` of a GPU's memory (the estimate is a floor: see the constant)."""
    gpu = int(gpu_memory_gib * GiB)
    plan = search(p, int(gpu * USABLE_FRACTION), processes)
    return dataclasses.replace(plan, gpu_memory=gpu)


def plan_config(config: Any, gpu_memory_gib: float, processes: int) -> Plan:
    if not gpu_memory_gib > 0:
        raise ValueError(f"--gpu-memory: must be a positive number of GiB, got {gpu_memory_gib}")
    check_processes(config.batch_size, processes)  # before the (slow) profile
    return plan_for_gpu(profile_config(config), gpu_memory_gib, processes)


