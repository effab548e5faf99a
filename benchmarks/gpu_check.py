"""GPU check of the ``--dry-run`` estimates on the full-size architectures (random weights, no download).

    python benchmarks/gpu_check.py --out gpu_check.json                  # all three, 512 px, bf16, cuda
    python benchmarks/gpu_check.py --device cpu --narrow --resolution 64 --steps 6  # CPU smoke run

For each backbone it builds the published transformer and VAE configs (flowbp.dryrun.ARCHITECTURES)
with random bf16 weights directly on the device, attaches LoRA rank 8 (fp32) to the default targets,
turns on transformer gradient checkpointing (as the presets do), and runs, at batch 1 on the paper's
25-step grid with its guidance (real CFG with a detached no-grad negative branch for SD3.5 and Klein,
the guidance embedding for FLUX.1):

- one FlowBP-Lagrange training step (the preset's method arguments), and
- one full-backprop AlignProp step (every node active, per-call checkpointing),

each = the no-grad rollout, the surrogate, VAE decode, a pixel reward, backward and an AdamW step. It
reports step time and peak allocated memory (``torch.cuda.max_memory_allocated``) beside the
``--dry-run`` estimate of the same configuration. Text encoders are not loaded (the adapters cache
embeddings and move the encoders off the accelerator): fixed random prompt embeddings of the real
shapes stand in for them, and the latents use the transformer's token layout, reshaped (not
un-patchified) for the VAE: shapes and memory are those of the real step, the values are not.

``--modes`` measures the memory modes the same way, each beside the dry run's estimate of that mode
(FlowBP-Lagrange only; ``lora`` is the plain run above)::

    python benchmarks/gpu_check.py --modes lora lora-int8 lora-float8 lora-nf4 full full-adamw8bit \
        --out gpu_modes.json

A mode whose estimate exceeds the device's memory is reported as skipped (full fine-tuning of the 12B
FLUX transformers needs FSDP over several GPUs; this script runs on one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowbp.config import load_config
from flowbp.dryrun import ARCHITECTURES, Architecture, GiB, estimate
from flowbp.engine import surrogate
from flowbp.memory_modes import make_adamw, quantize_frozen
from flowbp.methods import make_plan
from flowbp.rewards import load_reward
from flowbp.trajectory import rollout, training_sigmas

PRESET = {"sd3": "sd35", "flux1": "flux1", "flux2-klein": "flux2-klein"}

#: ``--narrow``: one block of each kind and a narrow width, but the real input/output shapes (text
#: widths, latent channels, VAE factor 8), so the whole script runs as a CPU smoke test.
NARROW_TRANSFORMER = {
    "sd3": {"num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2, "caption_projection_dim": 16,
            "dual_attention_layers": (0,)},
    "flux1": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
              "axes_dims_rope": (4, 6, 6)},
    "flux2-klein": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                    "axes_dims_rope": (4, 4, 4, 4), "timestep_guidance_channels": 16},
}
NARROW_VAE = {"block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4, "layers_per_block": 1}

#: ``--modes``: name -> the config keys of the memory mode (the trainer's names and values)
MODES: dict[str, dict[str, Any]] = {
    "lora": {"finetune": "lora"},
    "lora-int8": {"finetune": "lora", "base_quantization": "int8"},
    "lora-float8": {"finetune": "lora", "base_quantization": "float8"},
    "lora-nf4": {"finetune": "lora", "base_quantization": "nf4"},
    "full": {"finetune": "full"},
    "full-adamw8bit": {"finetune": "full", "optimizer": "adamw8bit"},
}


def narrow(arch: Architecture) -> Architecture:
    import dataclasses

    return dataclasses.replace(
        arch,
        transformer_config={**arch.transformer_config, **NARROW_TRANSFORMER[arch.backbone]},
        vae_config={**arch.vae_config, **NARROW_VAE},
    )


def build(arch: Architecture, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    import diffusers

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in bf16 directly: a 12B fp32 init would not fit beside it
    try:
        with torch.device(device):
            transformer = getattr(diffusers, arch.transformer_class)(**arch.transformer_config)
            vae = getattr(diffusers, arch.vae_class)(**arch.vae_config)
    finally:
        torch.set_default_dtype(previous)
    return transformer.eval().requires_grad_(False), vae.eval().requires_grad_(False)


def add_lora(transformer: torch.nn.Module, arch: Architecture, rank: int = 8) -> list[torch.nn.Parameter]:
    from peft import LoraConfig

    targets = arch.lora_targets
    transformer.add_adapter(LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian",  # B ≠ 0: a real gradient through every adapter
        target_modules=targets if isinstance(targets, str) else list(targets),
    ))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def make_velocity(arch: Architecture, transformer: torch.nn.Module, batch: int, resolution: int, guidance: float,
                  dtype: torch.dtype, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def condition() -> dict[str, torch.Tensor]:
        template = arch.make_inputs(batch, resolution, arch.text_len, dtype, torch.device("meta"))
        out = {}
        for key, t in template.items():
            if key in ("hidden_states", "timestep", "guidance"):
                continue
            value = torch.randn(t.shape, generator=gen) * 0.5 if t.is_floating_point() else torch.zeros(t.shape)
            out[key] = value.to(device, t.dtype)
        return out

    template = arch.make_inputs(batch, resolution, arch.text_len, dtype, torch.device("meta"))
    shape = tuple(template["hidden_states"].shape)
    positive, negative = condition(), condition()
    real_cfg = arch.real_cfg and guidance > 1.0

    def call(x: torch.Tensor, sigma: float, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        t = sigma * 1000.0 if arch.backbone == "sd3" else sigma  # FLUX transformers multiply by 1000 inside
        kwargs: dict[str, Any] = {
            "hidden_states": x.to(dtype),
            "timestep": torch.full((x.shape[0],), t, device=x.device, dtype=template["timestep"].dtype),
            **cond,
        }
        if "guidance" in template:
            kwargs["guidance"] = torch.full((x.shape[0],), guidance, device=x.device, dtype=torch.float32)
        return transformer(**kwargs, return_dict=False)[0].float()

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        v_c = call(x, sigma, positive)
        if not real_cfg:
            return v_c
        with torch.no_grad():  # the detached negative branch, as the adapters run it under autograd
            v_u = call(x, sigma, negative)
        return v_u + guidance * (v_c - v_u)

    return velocity, shape


def run_step(method: str, method_args: dict[str, Any], velocity, shape, vae, params, steps: int,
             device: torch.device, dtype: torch.dtype, resolution: int, optimizer_name: str = "adamw",
             autocast: bool = False) -> dict[str, float]:
    """Two training steps as the trainer runs them (EMA copy kept); the second one is measured, so the
    optimizer moments exist during its forwards, as in every step after the first."""
    reward = load_reward("digit-contrast").to(device)
    sigmas = training_sigmas(steps, 3.0)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    optimizer = make_adamw(params, optimizer_name, lr=1e-5)
    ema = [p.detach().clone().float() for p in params]  # the trainer's EMA of the trainable weights
    cuda = device.type == "cuda"
    side = resolution // 8
    out: dict[str, float] = {}
    for step in range(2):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            traj = rollout(velocity, noise, sigmas)
            if cuda:
                torch.cuda.synchronize()
            rollout_s = time.perf_counter() - start
            plan = make_plan(method, sigmas, step, **method_args)
            sur = surrogate(plan, traj, velocity)
            losses = []
            for x in sur.inputs:
                z = x.reshape(x.shape[0], -1, side, side).to(dtype)
                image = (vae.decode(z, return_dict=False)[0].float() * 0.5 + 0.5).clamp(0, 1)
                losses.append(-reward(image, [""] * x.shape[0]).mean())
            loss = torch.stack(losses).mean()
        loss.backward()
        grad_norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                e.lerp_(p.float(), 0.01)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / GiB if cuda else float("nan")
        out = {"grad_forwards": plan.grad_forwards, "step_s": seconds, "rollout_s": rollout_s, "peak_gib": peak,
               "grad_norm": grad_norm}
        del traj, sur, losses, loss
    return out


def prepare(arch: Architecture, mode: dict[str, Any], dtype: torch.dtype, device: torch.device):
    """The transformer and VAE set up as the trainer sets up ``mode`` (returns them and the trained parameters)."""
    transformer, vae = build(arch, dtype, device)
    transformer.enable_gradient_checkpointing()
    if mode.get("finetune", "lora") == "lora":
        quantize_frozen(transformer, mode.get("base_quantization", "none"))  # before the LoRA, as training does
        params = add_lora(transformer, arch)
    else:  # fp32 master weights, bf16 compute under autocast (accelerate's mixed_precision: bf16)
        transformer.float().requires_grad_(True)
        params = list(transformer.parameters())
    return transformer, vae, params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(PRESET), choices=list(PRESET))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    parser.add_argument("--narrow", action="store_true", help="one narrow block per kind: a CPU smoke run")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=None,
                        help="memory modes to measure with FlowBP-Lagrange (default: the LoRA Lagrange and "
                             "AlignProp rows)")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    capacity = torch.cuda.get_device_properties(device).total_memory / GiB if device.type == "cuda" else None
    rows = []
    for name in args.backbones:
        arch = narrow(ARCHITECTURES[name]) if args.narrow else ARCHITECTURES[name]
        lagrange = load_config(f"{PRESET[name]}-flowbp-lagrange")
        guidance = float(lagrange.guidance_scale)
        runs = [("lora", "flowbp-lagrange", dict(lagrange.method_args)), ("lora", "alignprop", {"checkpoint": True})]
        if args.modes:
            runs = [(mode, "flowbp-lagrange", dict(lagrange.method_args)) for mode in args.modes]
        for mode_name, method, method_args in runs:
            mode = MODES[mode_name]
            est = estimate(arch, method, method_args, resolution=args.resolution, batch_size=1, num_steps=args.steps,
                           lora_rank=8, dtype=dtype, guidance_scale=guidance, detach_negative=True,
                           gradient_checkpointing=True, **mode)
            row: dict[str, Any] = {"backbone": name, "mode": mode_name, "method": method,
                                   "resolution": args.resolution, "estimate_gib": est.peak_bytes / GiB,
                                   "estimate_grad_forwards": est.grad_forwards}
            if capacity is not None and est.peak_bytes / GiB > 0.95 * capacity:
                row["skipped"] = f"estimate {est.peak_bytes / GiB:.1f} GiB > 95% of the device's {capacity:.0f} GiB"
            else:
                t0 = time.perf_counter()
                transformer, vae, params = prepare(arch, mode, dtype, device)
                row["build_s"] = time.perf_counter() - t0
                velocity, shape = make_velocity(arch, transformer, 1, args.resolution, guidance, dtype, device)
                row.update(run_step(method, method_args, velocity, shape, vae, params, args.steps, device, dtype,
                                    args.resolution, mode.get("optimizer", "adamw"),
                                    autocast=mode["finetune"] == "full"))
                del transformer, vae, params, velocity
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| backbone | mode | method | grad fwd | step (s) | rollout (s) | peak measured | --dry-run estimate |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['backbone']} | {r['mode']} | {r['method']} | | | | skipped: {r['skipped']} | "
                  f"{r['estimate_gib']:.1f} GiB |")
            continue
        print(f"| {r['backbone']} | {r['mode']} | {r['method']} | {r['grad_forwards']} | {r['step_s']:.1f} | "
              f"{r['rollout_s']:.1f} | {r['peak_gib']:.1f} GiB | {r['estimate_gib']:.1f} GiB |")
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
