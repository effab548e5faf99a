"""``compile: true``: regional torch.compile of the transformer's repeated blocks (inductor on CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

from flowbp.backbones import load_backbone
from flowbp.compiling import compile_blocks, repeated_blocks
from flowbp.config import load_config
from flowbp.engine import surrogate
from flowbp.methods import make_plan
from flowbp.rewards import load_reward
from flowbp.trajectory import rollout

PROMPTS = ["a red cube on a table", "two dogs"]


def _step(directory: Path, compiled: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One ReFL step on the tiny SD3 with a non-trivial LoRA, without CFG: (the rollout's sample, the LoRA gradient).
    One method, no CFG: every variant of a block's graph (grad mode, which inputs need grad) is one more inductor
    compilation, the bulk of this test's time (3 compilations, ~1 CPU-minute)."""
    from flowbp.memory_modes import add_lora_on_quantized_base

    bb = load_backbone("sd3", path=str(directory), resolution=32)
    torch.manual_seed(0)
    add_lora_on_quantized_base(bb, load_config(None, {"backbone": "sd3", "finetune": "lora", "lora_rank": 4}))
    torch.manual_seed(3)
    for name, p in bb.transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    count = compile_blocks(bb.transformer) if compiled else 0
    reward = load_reward("digit-contrast")
    sigmas = bb.sigmas(6)
    velocity = bb.velocity_fn(bb.encode_prompts(PROMPTS), 1.0)
    traj = rollout(velocity, bb.initial_noise(2, torch.Generator().manual_seed(1)), sigmas)
    plan = make_plan("refl", sigmas, torch.Generator().manual_seed(5))
    out = surrogate(plan, traj, velocity, generator=torch.Generator().manual_seed(6))
    (-sum(reward(bb.decode(x), PROMPTS).mean() for x in out.inputs)).backward()
    grad = torch.cat([p.grad.flatten() for p in bb.transformer.parameters() if p.requires_grad and p.grad is not None])
    return traj.sample.detach(), grad, count


def test_compiled_blocks_equal_eager(tiny_sd3_dir: Path) -> None:
    """The compiled blocks serve the no-grad rollout and the grad forwards; the sample and the LoRA gradient equal
    eager's to float32 rounding (inductor fuses and reorders the arithmetic)."""
    sample, grad, _ = _step(tiny_sd3_dir, compiled=False)
    c_sample, c_grad, count = _step(tiny_sd3_dir, compiled=True)
    bb = load_backbone("sd3", path=str(tiny_sd3_dir), resolution=32)
    assert count == len(bb.transformer.transformer_blocks) > 1
    sample_err = ((c_sample - sample).abs().max() / sample.abs().max()).item()
    grad_err = ((c_grad - grad).abs().max() / grad.abs().max()).item()
    print(f"compile: sample max |Δ| / max |x| = {sample_err:.2e}, LoRA gradient max |Δ| / max |g| = {grad_err:.2e}")
    assert sample_err <= 1e-5 and grad_err <= 1e-4, (sample_err, grad_err)


def test_declared_repeated_blocks_are_used(tiny_flux1_dir: Path) -> None:
    """FLUX.1 declares ``_repeated_blocks`` (diffusers' compile_repeated_blocks): both of its block kinds are found."""
    bb = load_backbone("flux1", path=str(tiny_flux1_dir), resolution=32)
    model = bb.transformer
    assert set(type(model)._repeated_blocks) == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    found = repeated_blocks(model)
    assert found == [*model.transformer_blocks, *model.single_transformer_blocks]


def test_the_config_key_compiles_the_blocks_after_the_lora(tiny_sd3_dir: Path) -> None:
    """`compile: true` in the trainer's hook: the blocks are compiled (lazily: nothing runs here) and hold the LoRA."""
    from flowbp.training.components import apply_speed_and_offload, make_trainable

    bb = load_backbone("sd3", path=str(tiny_sd3_dir), resolution=32)
    config = load_config(None, {"backbone": "sd3", "finetune": "lora", "lora_rank": 4, "compile": True})
    make_trainable(config, bb)
    apply_speed_and_offload(config, bb, load_reward("digit-contrast"), torch.device("cpu"))
    blocks = bb.transformer.transformer_blocks
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert all(any("lora_A" in n for n, _ in b.named_parameters()) for b in blocks)
    assert bb.transformer._compiled_call_impl is None  # regional: the whole model is not compiled
