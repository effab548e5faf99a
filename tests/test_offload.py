"""``offload``: frozen linear weights streamed from the CPU. On CPU the onload and offload devices are the same,
so these tests check what does not depend on the device: the gradient equals the resident model's, nothing more
is saved for backward, and the bytes left on the onload device are what the planner counts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from flowbp.backbones import load_backbone
from flowbp.config import load_config
from flowbp.engine import surrogate
from flowbp.memory import saved_tensor_bytes, tensor_bytes
from flowbp.methods import available_methods, make_plan
from flowbp.offload import apply_offload, offload_store
from flowbp.rewards import load_reward
from flowbp.trajectory import rollout

PROMPTS = ["a red cube on a table", "two dogs"]
MODES = ["none", "reward", "base", "all"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rewards_tiny import clip_folder

    return clip_folder(tmp_path_factory.mktemp("clip"))


def _setup(directory: Path, offload: str, quant: str = "none", clip: Path | None = None, **kw):
    from flowbp.memory_modes import add_lora_on_quantized_base

    bb = load_backbone("sd3", path=str(directory), resolution=32, **kw)
    cfg = load_config(None, {"backbone": "sd3", "finetune": "lora", "lora_rank": 4, "offload": offload,
                             "base_quantization": quant})
    torch.manual_seed(0)
    add_lora_on_quantized_base(bb, cfg)
    torch.manual_seed(3)
    for name, p in bb.transformer.named_parameters():  # a non-trivial adapter (B = 0 hides the base's effect)
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    # a tiny transformers CLIP (PickScore's code), else a reward without layers
    reward = load_reward("pickscore", path=clip) if clip is not None else load_reward("digit-contrast")
    reward.requires_grad_(False)
    frozen = [p for m in (bb.transformer, bb.vae, reward) for p in m.parameters() if not p.requires_grad]
    counts = apply_offload(cfg, bb, reward, torch.device("cpu"))
    return bb, reward, counts, frozen


def _gradients(bb, reward, frozen, method: str) -> tuple[torch.Tensor, int, float]:
    sigmas = bb.sigmas(6)
    velocity = bb.velocity_fn(bb.encode_prompts(PROMPTS), 3.5, detach_uncond=True)
    traj = rollout(velocity, bb.initial_noise(2, torch.Generator().manual_seed(1)), sigmas)
    plan = make_plan(method, sigmas, torch.Generator().manual_seed(5))
    bb.transformer.zero_grad(set_to_none=True)
    with saved_tensor_bytes(exclude=frozen) as meter:
        out = surrogate(plan, traj, velocity, generator=torch.Generator().manual_seed(6))
        scores = [reward(bb.decode(x), PROMPTS) for x in out.inputs]
        loss = -sum(s.mean() for s in scores)
    loss.backward()
    lora = [p.grad.flatten() for n, p in bb.transformer.named_parameters() if p.requires_grad and p.grad is not None]
    return torch.cat(lora), meter.total, float(scores[0].detach().sum())


@pytest.mark.parametrize("mode", MODES[1:])
def test_every_method_under_offload_gives_the_resident_gradient(tiny_sd3_dir: Path, clip_dir: Path, mode: str) -> None:
    """Each method, one step: finite LoRA gradients equal to offload: none's, and the same bytes saved for backward
    (a streamed layer saves no weight; the resident one's weight is a parameter, excluded from the count)."""
    ref_bb, ref_reward, _, ref_frozen = _setup(tiny_sd3_dir, "none", clip=clip_dir)
    bb, reward, counts, frozen = _setup(tiny_sd3_dir, mode, clip=clip_dir)
    assert (counts.get("base", 0) > 10) == (mode != "reward") and (counts.get("reward", 0) > 1) == (mode != "base")
    for method in available_methods():
        ref_grad, ref_saved, ref_score = _gradients(ref_bb, ref_reward, ref_frozen, method)
        grad, saved, score = _gradients(bb, reward, frozen, method)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, method
        assert score == ref_score, method  # the forward is bit-identical
        err = ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item()
        print(f"offload {mode}, {method}: max |Δgrad| / max |grad| = {err:.2e}")
        assert err == 0.0, (method, err)  # bit-identical on CPU: the same matmuls in the same order
        assert saved == ref_saved, method


def test_offload_composes_with_a_quantized_base(tiny_sd3_dir: Path) -> None:
    """An int8 base streams its int8 tensors (half the bf16 bytes) and trains with its resident gradient."""
    pytest.importorskip("torchao")
    ref_bb, ref_reward, _, ref_frozen = _setup(tiny_sd3_dir, "none", "int8")
    bb, reward, _, frozen = _setup(tiny_sd3_dir, "all", "int8", gradient_checkpointing=True)
    assert type(offload_store(bb.transformer)[0]).__name__ == "Int8Tensor"
    for method in ("flowbp-lagrange", "draft-lv"):
        ref_grad, _, ref_score = _gradients(ref_bb, ref_reward, ref_frozen, method)
        grad, _, score = _gradients(bb, reward, frozen, method)
        err = ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item()
        print(f"offload all + int8 base, {method}: max |Δgrad| / max |grad| = {err:.2e}, score {score} vs {ref_score}")
        assert score == ref_score and err == 0.0, method


def _tiny_inputs(batch: int, res: int, text_len: int, dtype: torch.dtype, device: torch.device) -> dict:
    side = res // 2
    return {
        "hidden_states": torch.empty(batch, 4, side, side, dtype=dtype, device=device),
        "encoder_hidden_states": torch.empty(batch, text_len, 32, dtype=dtype, device=device),
        "pooled_projections": torch.empty(batch, 64, dtype=dtype, device=device),
        "timestep": torch.empty(batch, dtype=torch.float32, device=device),
    }


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_resident_bytes_are_what_the_planner_counts(tiny_sd3_dir: Path, quant: str) -> None:
    """After offload: base, the transformer's parameters (norms, embeddings, biases, the fp32 LoRA) + the largest
    streamed weight (the layer in flight) + the VAE are exactly the planner's weight term; every linear weight
    is in the offload store. (Buffers such as SD3's positional table are resident and, in every mode, not
    counted by the planner.)"""
    if quant != "none":
        pytest.importorskip("torchao")
    from flowbp.dryrun import ARCHITECTURES, build_meta
    from flowbp.planner import Recipe, memory, profile

    bb, _, _, _ = _setup(tiny_sd3_dir, "base", quant)
    fresh = load_backbone("sd3", path=str(tiny_sd3_dir), resolution=32)

    def config(m: torch.nn.Module) -> dict:
        return {k: v for k, v in dict(m.config).items() if not k.startswith("_")}

    arch = dataclasses.replace(
        ARCHITECTURES["sd3"], make_inputs=_tiny_inputs, vae_latent_channels=4, vae_factor=2, text_len=77 + 256
    )
    prof = profile(
        arch, "flowbp-lagrange", global_batch=2, resolution=32, num_steps=4, lora_rank=4, dtype=torch.float32,
        transformer=build_meta("SD3Transformer2DModel", config(fresh.transformer), torch.float32),
        vae=build_meta("AutoencoderKL", config(fresh.vae), torch.float32),
    )
    store = offload_store(bb.transformer)
    linears = [m for m in fresh.transformer.modules() if isinstance(m, torch.nn.Linear)]
    assert len(store) == len(linears) and all(t.device.type == "cpu" for t in store)
    assert prof.trainable == sum(p.numel() for p in bb.transformer.parameters() if p.requires_grad)
    resident = tensor_bytes(bb.transformer.parameters())
    in_flight = max(tensor_bytes([t]) for t in store)
    vae = tensor_bytes(bb.vae.parameters())
    estimate = memory(prof, Recipe(1, 2, 1, False, False, quant, offload="base")).weights
    assert resident + in_flight + vae == estimate
    # and what moved: the resident model minus the streamed weights
    full = tensor_bytes(fresh.transformer.parameters()) + tensor_bytes(p for n, p in bb.transformer.named_parameters()
                                                                      if p.requires_grad)
    if quant == "none":
        assert resident + tensor_bytes(store) == full
    print(f"{quant}: transformer resident {resident} B + in flight {in_flight} B; offload store "
          f"{tensor_bytes(store)} B (resident model {full} B)")


def test_reward_linear_counts_match_the_clip_configs() -> None:
    """planner.REWARD_LINEAR for the CLIP rewards, recounted on transformers' CLIPModel built on the meta device
    from the reference configs; the same models' totals are planner.REWARD_PARAMETERS (from the checkpoints)."""
    from transformers import CLIPConfig, CLIPModel

    from flowbp.planner import REWARD_LINEAR, REWARD_PARAMETERS

    def clip(text: tuple[int, int, int, int], vision: tuple[int, int, int, int], proj: int) -> CLIPModel:
        (th, ti, tl, tn), (vh, vi, vl, vn) = text, vision
        config = CLIPConfig(
            text_config=dict(vocab_size=49408, hidden_size=th, intermediate_size=ti, num_hidden_layers=tl,
                             num_attention_heads=tn, max_position_embeddings=77, projection_dim=proj),
            vision_config=dict(hidden_size=vh, intermediate_size=vi, num_hidden_layers=vl, num_attention_heads=vn,
                               image_size=224, patch_size=14, projection_dim=proj),
            projection_dim=proj,
        )
        with torch.device("meta"):
            return CLIPModel(config)

    for name, model in (("hpsv2", clip((1024, 4096, 24, 16), (1280, 5120, 32, 16), 1024)),
                        ("clipscore", clip((768, 3072, 12, 12), (1024, 4096, 24, 16), 768))):
        linears = [m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert sum(p.numel() for p in model.parameters()) == REWARD_PARAMETERS[name]
        assert (sum(linears), max(linears)) == REWARD_LINEAR[name]
