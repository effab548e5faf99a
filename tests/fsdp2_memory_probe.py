"""Run by ``torchrun --nproc_per_node 2`` from tests/test_dryrun.py: one LoRA grad step of the tiny SD3
transformer prepared by accelerate's FSDP2 plugin (the CPU test route), measuring per process what the
dry run estimates: the resident parameter bytes (local shards) and the most bytes of gathered
(unsharded) parameters alive at once, sampled at every block's forward hooks and at every saved-tensor
unpack of the backward. Rank 0 prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def main(pipeline_dir: str) -> None:
    from accelerate import Accelerator

    from flowbp import _testing_hooks as hooks
    from flowbp.backbones import load_backbone
    from flowbp.dryrun import _blocks
    from flowbp.training.accelerator import is_dtensor

    os.environ["FLOWBP_TEST_FSDP2_ON_CPU"] = "JointTransformerBlock"
    accelerator = Accelerator(cpu=True)
    hooks.fsdp2_on_cpu(accelerator)
    bb = load_backbone("sd3", path=pipeline_dir, resolution=32)
    model = bb.transformer.requires_grad_(False)
    torch.manual_seed(0)
    bb.add_lora(4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model, _ = accelerator.prepare(model, optimizer)  # FSDP2 takes the model and its optimizer together
    params = [p for m in model.modules() for p in m._parameters.values() if p is not None]
    resident = sum(p.to_local().nbytes if is_dtensor(p) else p.nbytes for p in params)
    peak = 0

    def sample(*_: object) -> None:
        nonlocal peak
        gathered = sum(p.nbytes for m in model.modules() for p in m._parameters.values()
                       if p is not None and not is_dtensor(p))
        peak = max(peak, gathered)

    for block in _blocks(model):
        block.register_forward_pre_hook(sample)
        block.register_forward_hook(sample)
    inputs = {
        "hidden_states": torch.randn(2, 4, 16, 16), "encoder_hidden_states": torch.randn(2, 77 + 256, 32),
        "pooled_projections": torch.randn(2, 64), "timestep": torch.tensor([500.0, 200.0]),
    }

    def unpack(t: torch.Tensor) -> torch.Tensor:
        sample()
        return t

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
        out = model(**inputs, return_dict=False)[0]
        out.square().mean().backward()
    if accelerator.is_main_process:
        print(json.dumps({"resident": resident, "gathered_peak": peak}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
