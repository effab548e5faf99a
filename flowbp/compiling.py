"""``compile: true``: regional ``torch.compile`` of the transformer's repeated blocks.

diffusers recommends compiling the repeated blocks rather than the whole model: one block's code is
compiled once and reused by every block of the same class, so start-up stays short
(``ModelMixin.compile_repeated_blocks``, for models that declare ``_repeated_blocks``). Models that
declare none (SD3 in diffusers 0.42) get each block of their block lists compiled with
``block.compile()``, which is what ``compile_repeated_blocks`` does for the declared classes. Applied
after the LoRA is attached, so the compiled code includes the adapter; the same compiled blocks serve
the no-grad rollout and the grad forwards (and the evaluation).
"""

from __future__ import annotations

from typing import Any

from torch import nn

#: the block lists of diffusers transformers (SD3, FLUX.1/2, Qwen-Image, Z-Image)
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "layers", "noise_refiner", "context_refiner")
#: dynamo's recompile limit per code object (default 8). Each block class gets one graph per variant (grad mode
#: on or off, which inputs need a gradient, CFG batch, a block's last-layer code path): FlowBP-Lagrange with CFG
#: on the tiny SD3 makes 7, and every compiled model in the process shares the count; past the limit dynamo
#: silently runs the block eagerly.
RECOMPILE_LIMIT = 64


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks to compile: the classes the model declares in ``_repeated_blocks``, else its block lists."""
    declared = set(getattr(model, "_repeated_blocks", None) or ())
    if declared:
        return [m for m in model.modules() if type(m).__name__ in declared]
    blocks: list[nn.Module] = []
    for name in BLOCK_LISTS:
        found = getattr(model, name, None)
        if isinstance(found, nn.ModuleList):
            blocks.extend(found)
    return blocks


def compile_blocks(model: nn.Module, **options: Any) -> int:
    """Compile ``model``'s repeated blocks in place (``torch.compile`` options pass through); returns how many."""
    import torch._dynamo

    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"compile: {type(model).__name__} has no repeated blocks to compile")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(**options)
    return len(blocks)
