"""The README's memory table: `flowbp train --dry-run` for every shipped real-backbone preset.

    python benchmarks/dryrun_table.py > table.md

For each backbone × method preset (512 px, bf16, gradient checkpointing) it estimates one process of
the paper's layout, ``--dry-run --processes 8``: the preset's global ``batch_size`` split over 8
processes × its gradient accumulation, so the micro-batch is the paper's per-GPU batch. It prints the
worst-case grad forwards, the activation memory of one micro-batch, and the estimated peak for full
fine-tuning (one GPU holding everything, i.e. the preset on one GPU with 8× the accumulation, and
per GPU under FSDP over 8) and for LoRA rank 8 (one GPU). The per-forward measurement is shared
between presets with the same micro-batch and CFG branch (it does not depend on the method), so the
table builds in a few minutes on a CPU.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

# Run from a checkout without installing: the repository root holds the flowbp package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowbp.config import load_config
from flowbp.dryrun import ARCHITECTURES, GiB, estimate, micro_batch, plan_cost

PROCESSES = 8  # the paper's launch scripts: 8 GPUs, one node
PREFIXES = {"sd35": "sd3", "flux1": "flux1", "flux2-klein": "flux2-klein"}
METHODS = ["refl", "draft-k", "draft-lv", "drtune", "alignprop", "leapalign",
           "flowbp-sparse", "flowbp-bridge", "flowbp-lagrange"]


def main() -> None:
    torch.set_num_threads(1)
    cache: dict[tuple, object] = {}
    print("| preset | batch: global / per GPU | grad fwd | saved / fwd | activations per GPU | full FT, 1 GPU "
          "| full FT, per GPU (FSDP×8) | LoRA r8, 1 GPU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for prefix in PREFIXES:
        for method in METHODS:
            cfg = load_config(f"{prefix}-{method}")
            per_gpu = micro_batch(cfg.batch_size, PROCESSES, cfg.gradient_accumulation_steps)
            row = {}
            for finetune in ("full", "lora"):
                key = (cfg.backbone, per_gpu, finetune, cfg.detach_negative)
                if key not in cache:
                    cache[key] = estimate(
                        ARCHITECTURES[cfg.backbone], "refl", resolution=cfg.resolution, batch_size=per_gpu,
                        finetune=finetune, lora_rank=cfg.lora_rank, dtype=torch.bfloat16,
                        guidance_scale=cfg.guidance_scale, detach_negative=cfg.detach_negative,
                        gradient_checkpointing=cfg.gradient_checkpointing, ema=cfg.ema,
                    )
                forwards, inputs, ckpt = plan_cost(method, cfg.method_args, cfg.num_inference_steps)
                row[finetune] = dataclasses.replace(
                    cache[key], method=method, grad_forwards=forwards, reward_inputs=inputs, checkpointed_plan=ckpt,
                    processes=PROCESSES, accumulation=cfg.gradient_accumulation_steps,
                )
                assert row[finetune].global_batch == cfg.batch_size
            full, lora = row["full"], row["lora"]
            gb = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
            print(f"| {prefix}-{method} | {cfg.batch_size} / {per_gpu} | {full.grad_forwards} | "
                  f"{gb(full.forward_bytes)} | "
                  f"{gb(full.activation_bytes)} | {gb(full.peak_bytes)} | {gb(full.sharded_peak_bytes(PROCESSES))} | "
                  f"{gb(lora.peak_bytes)} |", flush=True)


if __name__ == "__main__":
    main()
