"""The weights a run evaluates and ships: its EMA weights (as the paper evaluates), swapped in and out.

Imports nothing from :mod:`flowbp.evaluate` or :mod:`flowbp.config`, so that the evaluation code can use
:func:`ema_weights` without an import cycle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from flowbp.training.accelerator import is_dtensor, whole

if TYPE_CHECKING:
    from flowbp.training.run import Run


@contextlib.contextmanager
def ema_weights(run: Run) -> Iterator[None]:
    """Temporarily evaluate with the EMA weights (as the paper does), then restore the live ones."""
    if run.ema is None:
        yield
        return
    params = list(run.parameters.values())
    run.ema.store(params)
    run.ema.copy_to(params)
    try:
        yield
    finally:
        run.ema.restore(params)


def save_weights(run: Run) -> None:
    """The shipped weights are the EMA weights, as evaluated, in the backbone's format."""
    acc = run.accelerator
    with ema_weights(run):
        if run.config.finetune == "lora":
            gathered = None
            if any(is_dtensor(p) for p in run.parameters.values()):  # FSDP2 shards the adapter: every rank gathers
                gathered = {name: whole(p).clone() for name, p in run.parameters.items()}
            if run.is_main:
                run.backbone.transformer = run.model
                try:
                    run.backbone.save_lora(run.run_dir / "lora", state_dict=gathered)
                finally:
                    run.backbone.transformer = run.prepared
        elif hasattr(run.backbone, "save_full") and acc.distributed_type.value != "FSDP":
            if run.is_main:  # diffusers backbones: <run>/transformer for from_pretrained
                run.backbone.transformer = run.model
                try:
                    run.backbone.save_full(run.run_dir)
                finally:
                    run.backbone.transformer = run.prepared
        else:
            from safetensors.torch import save_file

            # whole tensors: FSDP2 shards are gathered by every rank (full_tensor is a collective)
            state = {k: whole(v).clone().contiguous() for k, v in run.model.state_dict().items()}
            if run.is_main:
                tensors = state
                tmp = run.run_dir / ".transformer.safetensors.tmp"
                save_file(tensors, str(tmp))
                tmp.replace(run.run_dir / "transformer.safetensors")
    acc.wait_for_everyone()
