"""The small, replaceable components a run is built from: prompts, backbone, reward, trainable module,
optimizer, learning-rate schedule and the random streams (see :mod:`flowbp.train` for their seeding)."""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors import SafetensorError

from flowbp.config import TrainConfig
from flowbp.evaluate import eval_size, read_prompts


def training_prompts(config: TrainConfig, backbone: Any) -> list[str]:
    if config.prompts_file is not None:
        return read_prompts(config.prompts_file, "prompts_file")
    if config.prompts is not None:
        return list(config.prompts)
    if not getattr(backbone, "trains_on_default_prompts", False):
        raise ValueError(
            f"prompts_file: backbone {config.backbone!r} needs training prompts: --set prompts_file=FILE "
            "(one prompt per line) or prompts=[...]; its default prompts (the HPDv2 test set) are for "
            "evaluation only, and training on them would inflate every evaluation"
        )
    return list(backbone.default_prompts())


def eval_prompt_set(config: TrainConfig, backbone: Any) -> list[str]:
    if config.eval_prompts_file is not None:
        prompts = read_prompts(config.eval_prompts_file, "eval_prompts_file")
    else:
        prompts = list(backbone.default_prompts())
    return prompts[: eval_size(config)[0]]  # the config's eval_max_prompts, else the backbone's default


def build_backbone(config: TrainConfig, device: torch.device) -> Any:
    from flowbp.backbones import backbone_from_config

    try:
        return backbone_from_config(config, device)
    except (OSError, KeyError, RuntimeError, json.JSONDecodeError, SafetensorError) as exc:
        # a truncated or foreign weights file, a config that does not fit the weights
        where = config.backbone_path or "the shipped weights"
        message = " ".join(str(exc).split())[:300]
        raise ValueError(f"backbone_path: cannot load {config.backbone} from {where}: {message}") from exc


def build_reward(config: TrainConfig, device: torch.device) -> torch.nn.Module:
    from flowbp.rewards import load_reward

    reward = load_reward(config.reward, paths=config.reward_paths).to(device)
    reward.requires_grad_(False)
    return reward


def make_trainable(config: TrainConfig, backbone: Any, shards: int = 1) -> torch.nn.Module:
    """Attach LoRA (or unfreeze everything) on every rank identically; returns the module to train.

    ``shards``: the processes FSDP2 shards the model over (1: not sharded), for the quantized base's layout."""
    model = backbone.transformer
    torch.manual_seed(config.seed)  # peft draws the LoRA A matrices from the global generator
    if config.finetune == "lora":
        from flowbp.memory_modes import add_lora_on_quantized_base

        add_lora_on_quantized_base(backbone, config, shards)  # base_quantization: none is the plain add_lora
    else:
        model.requires_grad_(True)
    model.eval()  # no dropout: the re-forwarded velocities must equal the cached ones
    return model


def make_optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from flowbp.memory_modes import make_adamw

    return make_adamw(  # optimizer: adamw (fp32 moments) or adamw8bit
        parameters,
        config.optimizer,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    """diffusers' schedules; stepped once per training step (not prepared: accelerate would step it
    once per process, making the schedule depend on the number of processes)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.steps,
    )


def make_generators(config: TrainConfig, rank: int) -> dict[str, torch.Generator]:
    torch.manual_seed(config.seed + 1000 * rank + 7)  # this rank's own global stream (after LoRA init)
    return {
        "plan": torch.Generator().manual_seed(config.plan_seed),  # shared: identical plans everywhere
        "data": torch.Generator().manual_seed(config.seed),  # shared: global batch, sharded below
        "renoise": torch.Generator().manual_seed(config.seed + 1 + 1000 * rank),  # this rank's own
    }
