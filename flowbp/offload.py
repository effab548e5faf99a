"""``offload``: frozen ``nn.Linear`` weights kept off the GPU and streamed to it one layer at a time.

``offload: base`` streams the frozen transformer's linear weights under a LoRA, ``reward`` the reward
model's, ``all`` both. A streamed layer's weight leaves the module's parameters and lives in an offload
store on the CPU (pinned when CUDA is present, so the copy can run asynchronously); every call of the
layer copies it to the layer's device, uses it and drops it. Norms, embeddings, convolutions, biases
and the trainable LoRA stay resident: they are a few per cent of the bytes.

Why not diffusers' group offloading hooks: they move ``param.data`` before a module's forward and back
after it, but a *grad* forward's autograd graph has saved the weight, so its backward would find the
offloaded (or already replaced) tensor. :class:`_StreamedLinear` saves nothing but a reference to the
layer and fetches the weight again in backward (the pattern of ``flowbp.memory_modes``'s quantized
linear); the input gradient is all a frozen layer needs. A quantized base (``base_quantization``)
streams its quantized tensors: 1/2 (int8, float8) or ~1/4 (nf4) of the bytes.

Why the reward is streamed rather than moved to the GPU as a whole for scoring: scoring happens after
the grad forwards, while their saved activations are alive, so a whole reward model on the GPU at that
moment adds its full weight to the step's peak however briefly it stays; streamed, it adds one layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

OFFLOADS = ("none", "reward", "base", "all")
#: marks a streamed layer; its ``weight`` is then a plain attribute (the offload store), not a parameter, so
#: ``.to(device)`` and accelerate's device placement leave it where it is, and code that reads
#: ``layer.weight.dtype`` still works
ONLOAD = "_flowbp_onload_device"


def offloads_base(mode: str) -> bool:
    return mode in ("base", "all")


def offloads_reward(mode: str) -> bool:
    return mode in ("reward", "all")


def streamable(layer: nn.Module) -> bool:
    """A frozen ``nn.Linear`` whose forward is called as a module (the planner counts the same layers)."""
    return isinstance(layer, nn.Linear) and not layer.weight.requires_grad and not hasattr(layer, ONLOAD)


def streamed_layers(model: nn.Module) -> list[nn.Linear]:
    # nn.MultiheadAttention reads out_proj.weight directly instead of calling the layer: never stream those
    inside_mha = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [m for m in model.modules() if streamable(m) and id(m) not in inside_mha]


def _fetch(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight
    device = getattr(layer, ONLOAD)
    if weight.device == device:
        return weight
    return weight.to(device, non_blocking=True)


def _dequantize(weight: torch.Tensor) -> torch.Tensor:
    if hasattr(weight, "get_original_weight"):  # torchao NF4Tensor
        return weight.get_original_weight()
    if hasattr(weight, "dequantize") and type(weight) is not torch.Tensor:  # torchao Int8/Float8 tensors
        return weight.dequantize()
    return weight


class _StreamedLinear(torch.autograd.Function):
    """``F.linear`` with a streamed frozen weight: saves no tensor, fetches the weight again in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer  # a module reference, not a saved tensor: the weight stays in the offload store
        return torch.nn.functional.linear(x, _fetch(layer), layer.bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight = _dequantize(_fetch(ctx.layer)).to(grad.dtype)
        return grad @ weight, None


def _streamed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _StreamedLinear.apply(x, self)
    return torch.nn.functional.linear(x, _fetch(self), self.bias)


def stream_linears(model: nn.Module, device: torch.device | str) -> int:
    """Move ``model``'s frozen linear weights to the offload store; returns how many layers stream.

    Call after the LoRA is attached (peft places a new adapter on its base layer's weight's device) and
    after quantization. ``device`` is where the layers compute (the onload device).
    """
    device = torch.device(device)
    pin = torch.cuda.is_available() and device.type == "cuda"
    layers = streamed_layers(model)
    for layer in layers:
        weight = layer.weight.detach()
        if weight.device.type != "cpu":
            weight = weight.to("cpu")
        if pin and type(weight) is torch.Tensor:  # torchao's quantized tensors are copied unpinned
            weight = weight.pin_memory()
        del layer._parameters["weight"]
        layer.weight = weight  # a plain tensor attribute now (see ONLOAD)
        setattr(layer, ONLOAD, device)
        layer.forward = _streamed_forward.__get__(layer)
    return len(layers)


def offload_store(model: nn.Module) -> list[torch.Tensor]:
    """The weights ``model`` keeps in its offload store (off the onload device)."""
    return [m.weight for m in model.modules() if hasattr(m, ONLOAD)]


def resident_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What ``model`` keeps on its onload device: its parameters and buffers."""
    return [*model.parameters(), *model.buffers()]


def apply_offload(config: Any, backbone: Any, reward: nn.Module, device: torch.device) -> dict[str, int]:
    """Stream what ``config.offload`` names; returns the number of streamed layers per part (a reward the trainer
    built with ``offload: reward`` already streams: it is counted, not streamed twice)."""
    counts = {}
    if offloads_base(config.offload):
        counts["base"] = stream_linears(backbone.transformer, device)
        backbone.transformer.to(device)  # the rest (norms, embeddings, biases, LoRA); loaded on the CPU
    if offloads_reward(config.offload):
        already = sum(1 for m in reward.modules() if hasattr(m, ONLOAD))
        counts["reward"] = already or stream_linears(reward, device)
    return counts
