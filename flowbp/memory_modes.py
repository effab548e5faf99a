"""Frozen-base memory modes: a weight-only quantized transformer under a LoRA, and 8-bit AdamW.

``base_quantization`` (config key) stores the frozen transformer's ``nn.Linear`` weights in 8 or 4 bits
with torchao (``int8``: per-row int8, ``float8``: per-row float8 e4m3, ``nf4``: QLoRA's 4-bit
NormalFloat in blocks of 64); the LoRA on top stays fp32 (peft wraps the quantized layer). torchao's
NF4 runs on every device, so nf4 needs no bitsandbytes/CUDA here.

Why a custom autograd function: torchao's weight-only linear saves the *dequantized* weight for backward
(measured: one full-precision copy of every layer per gradient forward), which would cost more memory
than the quantization saves. A frozen weight needs no gradient, and the input gradient needs only the
weight, so :class:`_FrozenQuantizedLinear` keeps nothing but a reference to the (resident) quantized
weight and dequantizes it again in backward: a quantized grad forward saves exactly what the
full-precision one saves (tests/test_memory_modes.py measures it).
"""

from __future__ import annotations

import importlib.util
import types
from typing import Any

import torch
from torch import nn

BASE_QUANTIZATIONS = ("none", "int8", "float8", "nf4")
#: The modes whose quantized weights FSDP2's ``fully_shard`` can shard (torchao's NF4Tensor implements the
#: FSDP2 all-gather hooks; its Int8Tensor / Float8Tensor lack the ops sharding needs: ``aten.split``).
FSDP2_BASE_QUANTIZATIONS = ("none", "nf4")
OPTIMIZERS = ("adamw", "adamw8bit")
#: torchao's NF4 blocks: 64 weights share one scale, 256 scales share one float32 scaler.
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256


def quantizable(layer: nn.Module, mode: str, shards: int = 1) -> bool:
    """Whether ``mode`` stores this layer's weight quantized (the planner counts the same layers).

    Every ``nn.Linear`` qualifies for int8/float8; nf4 needs whole blocks (numel divisible by 64 × 256).
    Sharded by FSDP2 over ``shards`` processes, an nf4 weight must split into equal row shards of whole
    scaler blocks (torchao's NF4 split); the few small layers that do not stay unquantized.
    """
    if mode == "none" or not isinstance(layer, nn.Linear):
        return False
    if mode == "nf4":
        out_features = layer.weight.shape[0]
        return layer.weight.numel() % (NF4_BLOCK * NF4_SCALER_BLOCK * shards) == 0 and out_features % shards == 0
    return True


def quantized_weight_bytes(out_features: int, in_features: int, mode: str, dtype: torch.dtype) -> int:
    """Bytes of one quantized ``out × in`` weight (data + scales), as torchao 0.16 lays it out.

    int8: int8 data and one scale per row in the weight's dtype; float8: float8 data and one float32 scale
    per row; nf4: 4-bit codes, one int8 scale per 64-block, and in the weight's dtype one scaler per 256
    scales, the 16-entry code book and the scalers' mean (checked against the real tensors in the tests).
    """
    numel = out_features * in_features
    elem = torch.finfo(dtype).bits // 8
    if mode == "int8":
        return numel + out_features * elem
    if mode == "float8":
        return numel + out_features * 4
    if mode == "nf4":
        blocks = numel // NF4_BLOCK
        return numel // 2 + blocks + (blocks // NF4_SCALER_BLOCK + 16 + 1) * elem
    raise ValueError(f"base_quantization: unknown mode {mode!r}; allowed: {', '.join(BASE_QUANTIZATIONS)}")


def check_fsdp2(base_quantization: str) -> None:
    """One-line error for a base quantization that FSDP2 cannot shard (checked before anything is built)."""
    if base_quantization not in FSDP2_BASE_QUANTIZATIONS:
        raise ValueError(
            f"base_quantization: {base_quantization!r} cannot be sharded by FSDP2 (torchao's quantized tensor "
            f"lacks the ops fully_shard needs); allowed under FSDP2: {', '.join(FSDP2_BASE_QUANTIZATIONS)} "
            "(or launch data-parallel with the multi-gpu preset)"
        )


def check_mode_available(base_quantization: str = "none", optimizer: str = "adamw") -> None:
    """One-line error when a mode cannot run here (checked with the config, before anything is written)."""
    if base_quantization not in BASE_QUANTIZATIONS:
        raise ValueError(
            f"base_quantization: unknown mode {base_quantization!r}; allowed: {', '.join(BASE_QUANTIZATIONS)}"
        )
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown optimizer {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
    for key, value in (("base_quantization", base_quantization), ("optimizer", optimizer)):
        if value not in ("none", "adamw") and importlib.util.find_spec("torchao") is None:
            raise ValueError(f"{key}: {value!r} needs the torchao package (pip install 'flowbp[quant]')")


class _FrozenQuantizedLinear(torch.autograd.Function):
    """``F.linear`` with a frozen quantized weight that saves nothing for backward (see the module doc)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        ctx.layer = layer  # a module reference, not a saved tensor: the weight is resident anyway
        return torch.nn.functional.linear(x, layer.weight, layer.bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight = _dequantize(ctx.layer.weight).to(grad.dtype)
        return grad @ weight, None


def _dequantize(weight: torch.Tensor) -> torch.Tensor:
    if hasattr(weight, "get_original_weight"):  # torchao NF4Tensor
        return weight.get_original_weight()
    return weight.dequantize()


def _frozen_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenQuantizedLinear.apply(x, self)
    return torch.nn.functional.linear(x, self.weight, self.bias)


def quantize_frozen(model: nn.Module, mode: str, shards: int = 1) -> int:
    """Quantize ``model``'s qualifying ``nn.Linear`` weights in place (weight-only); returns how many.

    Call before the LoRA is attached (peft then wraps the quantized layers). The model must be frozen:
    quantized weights get no gradient. ``shards``: the FSDP2 processes the model will be sharded over.
    """
    if mode == "none":
        return 0
    check_mode_available(mode)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    layers = [m for m in model.modules() if quantizable(m, mode, shards)]
    if mode == "nf4":
        try:
            from torchao.dtypes import to_nf4  # torchao <= 0.17
        except ImportError:
            from torchao.quantization import to_nf4

        for layer in layers:
            layer.weight = nn.Parameter(
                to_nf4(layer.weight.data, NF4_BLOCK, NF4_SCALER_BLOCK), requires_grad=False
            )
    else:
        # version 2: the plain Int8Tensor layout (version 1 is deprecated in torchao 0.16)
        config = Int8WeightOnlyConfig(version=2) if mode == "int8" else Float8WeightOnlyConfig()
        targets = {id(m) for m in layers}
        quantize_(model, config, filter_fn=lambda m, _fqn: id(m) in targets)
    for layer in layers:
        layer.weight.requires_grad_(False)
        layer.forward = types.MethodType(_frozen_forward, layer)
    return len(layers)


def add_lora_on_quantized_base(backbone: Any, config: Any, shards: int = 1) -> int:
    """Quantize the frozen transformer as ``config.base_quantization`` says, then attach the LoRA.

    Returns the number of quantized layers. The LoRA itself is unchanged: fp32, trained and saved as on
    a full-precision base (its diffusers file loads on the unquantized pipeline). ``shards``: FSDP2 processes.
    """
    import warnings

    backbone.transformer.requires_grad_(False)
    count = quantize_frozen(backbone.transformer, config.base_quantization, shards)
    with warnings.catch_warnings():
        # peft: "TorchaoLoraLinear ... merge() / unmerge() will raise": flowbp never merges into a quantized base
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")
        backbone.add_lora(config.lora_rank, config.lora_alpha, config.lora_targets)
    return count


def make_adamw(parameters: list[torch.nn.Parameter], optimizer: str, **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW with fp32 (``adamw``) or blockwise 8-bit (``adamw8bit``, torchao) moments."""
    if optimizer == "adamw8bit":
        check_mode_available(optimizer=optimizer)
        from torchao.optim import AdamW8bit

        return AdamW8bit(parameters, **kwargs)
    return torch.optim.AdamW(parameters, **kwargs)
