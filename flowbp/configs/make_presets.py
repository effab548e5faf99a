"""Generate the shipped real-backbone presets: 8 backbones × 9 methods (the paper's three with its released
settings; five more carrying the settings of their nearest paper backbone, :data:`NEXT_BACKBONES`).

    python flowbp/configs/make_presets.py            # rewrites flowbp/configs/<backbone>-<method>.yaml

Source: the authors' released final configs (shared/reference/paper_hyperparameters.md, sections 6.1–6.3):
full fine-tuning, AdamW lr 1e-5 (weight decay 1e-4), EMA 0.995, 300 steps, 512 px, 25 steps on the
paper's grid, hinge ReLU(0.55 − r) on HPSv2.1, per-method batch and knobs, CFG and its backward
compensation. ``batch_size`` is flowbp's GLOBAL batch per optimizer step, so each preset writes the
paper's global batch: per-GPU batch × 8 GPUs (its launch scripts' default) × gradient accumulation,
with the paper's ``gradient_accumulation_steps``; launched on 8 GPUs it is the paper's layout, and on
fewer GPUs raising ``gradient_accumulation_steps`` keeps both the global and the per-GPU batch (each
header says how). AlignProp and DRaFT-K have no released config; their presets use flowbp's method
defaults (per-GPU batch 4, same convention) and say so. Every preset runs with LoRA
by adding ``--set finetune=lora`` (LoRA usually wants a larger learning rate, e.g. 1e-4).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent

#: preset prefix -> (backbone, hub id, guidance, shared method args, notes)
BACKBONES: dict[str, dict[str, Any]] = {
    "sd35": {
        "backbone": "sd3",
        "backbone_path": "stabilityai/stable-diffusion-3.5-medium",
        "guidance_scale": 3.5,
        "title": "SD3.5-Medium",
    },
    "flux1": {
        "backbone": "flux1",
        "backbone_path": "black-forest-labs/FLUX.1-dev",
        "guidance_scale": 4.0,  # the distilled guidance embedding (no negative branch)
        "title": "FLUX.1-dev",
    },
    "flux2-klein": {
        "backbone": "flux2-klein",
        "backbone_path": "black-forest-labs/FLUX.2-klein-base-9B",
        "guidance_scale": 4.0,
        "title": "FLUX.2-Klein-base-9B",
    },
}

LAGRANGE_COMMON = {
    "order": 3, "support_mode": "midpoint", "support_scale": 0.25, "max_active": 2, "weights": "lagrange",
    "anchor_lambda": 1.0, "jk_sampling": "dirichlet", "dirichlet": [2.5, 6.0, 2.0],
}

#: GPUs of the paper's runs (shared/reference/paper_hyperparameters.md §6.1: NPROC_PER_NODE=8, one node)
PAPER_GPUS = 8
#: the paper's gradient accumulation where it is not 1 (§6.3)
PAPER_ACCUMULATION: dict[tuple[str, str], int] = {("flux2-klein", "draft-lv"): 2}

#: (prefix, method) -> (the paper's PER-GPU batch, method_args, extra config keys, comment)
METHODS: dict[tuple[str, str], tuple[int, dict[str, Any], dict[str, Any], str]] = {
    # ---------------------------------------------------------------- FLUX.1-dev
    ("flux1", "refl"): (4, {"last_n_steps": 11}, {}, ""),
    ("flux1", "draft-lv"): (4, {"num_noised": 2}, {}, ""),
    ("flux1", "drtune"): (4, {"num_train_steps": 3, "early_stop_ratio": 0.4}, {}, ""),
    ("flux1", "leapalign"): (8, {"alpha": 0.3, "tau": 0.1, "jk_sampling": "uniform"}, {}, ""),
    ("flux1", "flowbp-sparse"): (4, {"num_active": 3, "late_bias": 2.0, "grad_rescale": 1.0}, {}, ""),
    ("flux1", "flowbp-bridge"): (
        8, {"num_active": 5, "late_bias": 2.0, "grad_rescale": 1.0, "alpha": 0.1}, {}, ""),
    ("flux1", "flowbp-lagrange"): (
        8, {"alpha": 0.1, "tau": 0.2, "grad_rescale": 0.5, **LAGRANGE_COMMON}, {}, ""),
    # ---------------------------------------------------------------- FLUX.2-Klein-base-9B
    ("flux2-klein", "refl"): (4, {"last_n_steps": 11}, {}, ""),
    ("flux2-klein", "draft-lv"): (2, {"num_noised": 2}, {}, ""),  # × gradient accumulation 2
    ("flux2-klein", "drtune"): (4, {"num_train_steps": 3, "early_stop_ratio": 0.4}, {}, ""),
    ("flux2-klein", "leapalign"): (4, {"alpha": 0.3, "tau": 0.1, "jk_sampling": "uniform"}, {}, ""),
    ("flux2-klein", "flowbp-sparse"): (4, {"num_active": 4, "late_bias": 2.0, "grad_rescale": 0.0}, {}, ""),
    ("flux2-klein", "flowbp-bridge"): (
        4, {"num_active": 3, "late_bias": 4.0, "grad_rescale": 0.5, "alpha": 1.0}, {}, ""),
    ("flux2-klein", "flowbp-lagrange"): (
        4, {"alpha": 0.1, "tau": 0.1, "grad_rescale": 0.0, "tail_ratio": 0.7, **LAGRANGE_COMMON},
        {"cfg_grad_compensate": True},
        "the only released config with CFG backward compensation on (loss / 4.0 in backward); "
        "train_step_tail_ratio 0.7"),
    # ---------------------------------------------------------------- SD3.5-Medium
    ("sd35", "refl"): (8, {"last_n_steps": 11}, {}, ""),
    ("sd35", "draft-lv"): (4, {"num_noised": 2}, {}, ""),
    ("sd35", "drtune"): (8, {"num_train_steps": 3, "early_stop_ratio": 0.4}, {}, ""),
    ("sd35", "leapalign"): (
        8, {"alpha": 0.3, "tau": 0.1, "jk_sampling": "uniform"}, {"detach_negative": False},
        "the released SD3.5 LeapAlign config keeps the gradient through the negative CFG branch"),
    ("sd35", "flowbp-sparse"): (8, {"num_active": 4, "late_bias": 1.0, "grad_rescale": 0.5}, {}, ""),
    ("sd35", "flowbp-bridge"): (
        8, {"num_active": 5, "late_bias": 4.0, "grad_rescale": 0.0, "alpha": 0.5}, {}, ""),
    ("sd35", "flowbp-lagrange"): (
        8, {"alpha": 0.1, "tau": 0.2, "grad_rescale": 0.0, "max_j_rev": 10, **LAGRANGE_COMMON}, {}, ""),
}
UNRELEASED = {
    "alignprop": (
        4, {"checkpoint": True}, "AlignProp has no released FlowBP config: flowbp's defaults, per-GPU batch 4"),
    "draft-k": (4, {"k": 1}, "DRaFT-K has no released FlowBP config: flowbp's defaults (K = 1), per-GPU batch 4"),
}
for _prefix in BACKBONES:
    for _method, (_batch, _args, _note) in UNRELEASED.items():
        METHODS[(_prefix, _method)] = (_batch, _args, {}, _note)

#: Backbones the paper did not train (issue 17): each carries the paper's per-method settings (per-GPU
#: batch, method_args, extra keys, accumulation) from the nearest of its three backbones, named in
#: every header with the reason. The guidance scale is each model's own (its pipeline's default, in
#: flowbp's convention v_n + g (v_c − v_n)); see docs/backbones-more.md.
NEXT_BACKBONES: dict[str, dict[str, Any]] = {
    "sd35-large": {
        "backbone": "sd3",
        "backbone_path": "stabilityai/stable-diffusion-3.5-large",
        "guidance_scale": 3.5,
        "title": "SD3.5-Large",
        "guidance_note": "the paper's SD3.5-Medium value (the pipeline's default is 7.0)",
        "nearest": "sd35",
        "why": "the same SD3 MMDiT family, real CFG with the empty negative, static shift 3.0",
    },
    "flux2-klein-4b": {
        "backbone": "flux2-klein",
        "backbone_path": "black-forest-labs/FLUX.2-klein-base-4B",
        "guidance_scale": 4.0,
        "title": "FLUX.2-Klein-base-4B",
        "guidance_note": "the paper's Klein-9B value, also the pipeline's default",
        "nearest": "flux2-klein",
        "why": "the same FLUX.2-Klein architecture and pipeline at 4B instead of 9B",
    },
    "qwen-image": {
        "backbone": "qwen-image",
        "backbone_path": "Qwen/Qwen-Image",
        "guidance_scale": 4.0,  # QwenImagePipeline's true_cfg_scale default
        "title": "Qwen-Image",
        "guidance_note": "QwenImagePipeline's default true_cfg_scale (negative prompt \" \")",
        "nearest": "flux2-klein",
        "why": "real CFG in two forwards, a Qwen-VL text encoder, dynamic shift, the largest",
    },
    "z-image": {
        "backbone": "z-image",
        "backbone_path": "Tongyi-MAI/Z-Image",
        "guidance_scale": 6.0,  # ZImagePipeline's guidance_scale=5.0 (pos + 5 (pos − neg)) in flowbp's convention
        "title": "Z-Image",
        "guidance_note": "ZImagePipeline's default 5.0 in flowbp's convention: g = s + 1",
        "nearest": "sd35",
        "why": "real CFG with the empty negative and a static shift (Z-Image-Turbo's: 3.0)",
    },
    "flux2": {
        "backbone": "flux2",
        "backbone_path": "black-forest-labs/FLUX.2-dev",
        "guidance_scale": 4.0,  # Flux2Pipeline's default, fed to the guidance embedding
        "title": "FLUX.2-dev",
        "guidance_note": "Flux2Pipeline's default, fed to the guidance embedding",
        "nearest": "flux1",
        "why": "guidance-distilled: a guidance embedding, no negative branch",
    },
}
for _prefix, _bb in NEXT_BACKBONES.items():
    BACKBONES[_prefix] = _bb
    for (_near, _method), _entry in list(METHODS.items()):
        if _near == _bb["nearest"]:
            METHODS[(_prefix, _method)] = _entry
            if (_near, _method) in PAPER_ACCUMULATION:
                PAPER_ACCUMULATION[(_prefix, _method)] = PAPER_ACCUMULATION[(_near, _method)]


def batch_layout(prefix: str, method: str) -> tuple[int, int, list[str]]:
    """(global batch, gradient accumulation, header lines) of the paper's layout for one preset."""
    per_gpu = METHODS[(prefix, method)][0]
    accumulation = PAPER_ACCUMULATION.get((prefix, method), 1)
    batch = per_gpu * PAPER_GPUS * accumulation
    layout = f"{PAPER_GPUS} GPUs × {per_gpu} per GPU"
    if accumulation > 1:
        layout += f" × gradient accumulation {accumulation}"
    one_gpu = PAPER_GPUS * accumulation  # accumulation that keeps per_gpu samples per micro-batch on 1 GPU
    lines = [
        f"Batch: the paper's layout, {layout} = global {batch} (batch_size is the global batch per step).",
        f"Fewer GPUs: keep batch_size, raise gradient_accumulation_steps so that batch_size / (GPUs ×"
        f" accumulation) = {per_gpu};",
        f"  e.g. one GPU: --set gradient_accumulation_steps={one_gpu}"
        f" (4 GPUs: --set gradient_accumulation_steps={one_gpu // 4}).",
    ]
    return batch, accumulation, lines


def preset(prefix: str, method: str) -> tuple[dict[str, Any], str]:
    """The config mapping of one preset and its header comment."""
    bb = BACKBONES[prefix]
    _, method_args, extra, note = METHODS[(prefix, method)]
    batch, accumulation, batch_lines = batch_layout(prefix, method)
    config: dict[str, Any] = {
        "backbone": bb["backbone"],
        "backbone_path": bb["backbone_path"],
        "backbone_args": {"max_sequence_length": 512},
        "resolution": 512,
        "method": method,
        "method_args": method_args,
        "reward": "hpsv2",
        "loss": "hinge",
        "loss_margin": 0.55,
        "num_inference_steps": 25,
        "guidance_scale": bb["guidance_scale"],
        "detach_negative": True,
        "cfg_grad_compensate": False,
        "steps": 300,
        "batch_size": batch,  # GLOBAL: the paper's per-GPU batch × 8 GPUs × accumulation
        "gradient_accumulation_steps": accumulation,
        "finetune": "full",
        "learning_rate": 1e-5,
        "weight_decay": 1e-4,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_eps": 1e-8,
        "max_grad_norm": 1.0,
        "ema": True,
        "ema_decay": 0.995,
        "seed": 42,
        "plan_seed": 114,
        "mixed_precision": "bf16",
        "dtype": "auto",
        "gradient_checkpointing": True,
        "eval_every": 50,  # the paper evaluates on the 400 HPDv2 test prompts every 50 steps
        "eval_samples_per_prompt": 1,
        "eval_seed": 42,
        "eval_batch_size": 8,
        "sample_every": 50,
        "checkpoint_every": 50,
    }
    config.update(extra)
    if "nearest" in bb:
        near = BACKBONES[bb["nearest"]]["title"]
        title = [
            f"{bb['title']} × {method}: not a backbone of the FlowBP paper (generated by make_presets.py).",
            f"Per-method settings carried from the paper's {near} preset ({bb['nearest']}-{method}),",
            f"  the nearest of its three backbones ({bb['why']}).",
            f"guidance_scale {bb['guidance_scale']}: {bb['guidance_note']} (docs/backbones-more.md).",
        ]
    else:
        title = [f"{bb['title']} × {method}: the FlowBP paper's released settings (generated by make_presets.py)."]
    lines = [
        *title,
        f"  flowbp train --config {prefix}-{method} --set prompts_file=PROMPTS.txt [--set finetune=lora]",
        "backbone_path is the hub id, resolved from your local cache (or --set backbone_path=DIR).",
        *batch_lines,
    ]
    if note:
        lines.append(f"Note: {note}.")
    return config, "".join(f"# {line}\n" for line in lines)


def write_presets(directory: Path = HERE) -> list[Path]:
    written = []
    for prefix, method in sorted(METHODS):
        config, header = preset(prefix, method)
        path = directory / f"{prefix}-{method}.yaml"
        path.write_text(header + yaml.safe_dump(config, sort_keys=False))
        written.append(path)
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for p in write_presets(out):
        print(p)
