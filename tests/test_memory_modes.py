"""Frozen-base memory modes on a tiny SD3: a torchao-quantized base under the LoRA, and 8-bit AdamW."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao")

from flowbp import memory_modes
from flowbp.backbones import load_backbone
from flowbp.cli import main
from flowbp.config import load_config
from flowbp.dryrun import _quantized_saving, build_meta
from flowbp.engine import surrogate
from flowbp.memory import saved_tensor_bytes, tensor_bytes
from flowbp.memory_modes import add_lora_on_quantized_base, quantizable, quantized_weight_bytes
from flowbp.methods import available_methods, make_plan
from flowbp.rewards import load_reward
from flowbp.trajectory import rollout

PROMPTS = ["a red cube on a table", "two dogs"]
MODES = ["int8", "float8", "nf4"]


@pytest.fixture(autouse=True)
def _small_nf4_blocks(monkeypatch) -> None:
    """The tiny transformer's layers (32 × 32) are smaller than one QLoRA scaler block (64 × 256 weights):
    with 64 × 4 they are quantized too. The byte count and the planner read the same constants."""
    monkeypatch.setattr(memory_modes, "NF4_SCALER_BLOCK", 4)


def _backbone(directory: Path, mode: str, rank: int = 4, **kw):
    bb = load_backbone("sd3", path=str(directory), resolution=32, **kw)
    cfg = load_config(None, {"backbone": "sd3", "finetune": "lora", "lora_rank": rank, "base_quantization": mode})
    torch.manual_seed(0)  # peft draws the LoRA A matrices from the global generator (as make_trainable seeds it)
    count = add_lora_on_quantized_base(bb, cfg)
    return bb, count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_quantized_bytes_are_what_the_dry_run_counts(tiny_sd3_dir: Path, mode: str, dtype: torch.dtype) -> None:
    """The formula (and the dry run's saving on the meta model) equals torchao's real tensors' bytes."""
    bb = load_backbone("sd3", path=str(tiny_sd3_dir), resolution=32)
    model = bb.transformer.to(dtype).requires_grad_(False)
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    meta = build_meta("SD3Transformer2DModel", config, dtype)
    layers = [m for m in model.modules() if quantizable(m, mode)]
    before = tensor_bytes(m.weight for m in layers)
    assert len(layers) == memory_modes.quantize_frozen(model, mode) > 10
    after = tensor_bytes(m.weight for m in layers)
    assert after == sum(quantized_weight_bytes(*m.weight.shape, mode, dtype) for m in layers)
    assert _quantized_saving(meta, mode, dtype.itemsize) == before - after > 0


@pytest.mark.parametrize("mode", MODES)
def test_every_method_trains_one_step_on_a_quantized_base(tiny_sd3_dir: Path, mode: str) -> None:
    bb, count = _backbone(tiny_sd3_dir, mode, gradient_checkpointing=True)
    assert count > 10
    reward = load_reward("digit-contrast")
    sigmas = bb.sigmas(8)
    velocity = bb.velocity_fn(bb.encode_prompts(PROMPTS), 3.5, detach_uncond=True)
    traj = rollout(velocity, bb.initial_noise(2, torch.Generator().manual_seed(1)), sigmas)
    lora = {n: p for n, p in bb.transformer.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n and p.dtype == torch.float32 for n, p in lora.items())
    for method in available_methods():
        bb.transformer.zero_grad(set_to_none=True)
        plan = make_plan(method, sigmas, torch.Generator().manual_seed(5))
        out = surrogate(plan, traj, velocity, generator=torch.Generator().manual_seed(6))
        (-sum(reward(bb.decode(x), PROMPTS).mean() for x in out.inputs)).backward()
        grads = [p.grad for n, p in lora.items() if "lora_B" in n and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), method
        assert any(g.abs().sum() > 0 for g in grads), method


def _lora_gradient_and_sample(directory: Path, mode: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    bb, _ = _backbone(directory, mode)
    torch.manual_seed(3)
    for name, p in bb.transformer.named_parameters():  # a non-trivial adapter (B = 0 hides the base's effect)
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    sigmas = bb.sigmas(6)
    velocity = bb.velocity_fn(bb.encode_prompts(PROMPTS), 3.5, detach_uncond=True)
    traj = rollout(velocity, bb.initial_noise(2, torch.Generator().manual_seed(1)), sigmas)
    plan = make_plan("flowbp-lagrange", sigmas, torch.Generator().manual_seed(5))
    frozen = [p for p in [*bb.transformer.parameters(), *bb.vae.parameters()] if not p.requires_grad]
    with saved_tensor_bytes(exclude=frozen) as meter:
        out = surrogate(plan, traj, velocity, generator=torch.Generator().manual_seed(6))
        images = bb.decode(out.inputs[0])
    images.square().mean().backward()
    grad = torch.cat([p.grad.flatten() for n, p in bb.transformer.named_parameters() if p.requires_grad])
    return grad, bb.decode(traj.sample).detach(), meter.total


def test_int8_and_float8_base_gradients_and_samples_are_close(tiny_sd3_dir: Path) -> None:
    """Same adapter, same plan: the LoRA gradient on a quantized base points where the fp32 one does, the
    sample is close, and the quantized grad forwards save exactly the bytes the fp32 ones save."""
    ref_grad, ref_sample, ref_saved = _lora_gradient_and_sample(tiny_sd3_dir, "none")
    for mode, min_cos, max_diff in (("int8", 0.999, 0.02), ("float8", 0.99, 0.06), ("nf4", 0.95, 0.2)):
        grad, sample, saved = _lora_gradient_and_sample(tiny_sd3_dir, mode)
        cos = torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0).item()
        diff = (sample - ref_sample).abs().max().item()
        print(f"{mode}: gradient cosine {cos:.6f}, sample max |diff| {diff:.4f} (images in [0, 1])")
        assert cos >= min_cos and diff <= max_diff, (mode, cos, diff)
        assert saved == ref_saved  # nothing dequantized is kept for backward (memory_modes docstring)


def _train_args(directory: Path, out: Path, *extra: str) -> list[str]:
    sets = {
        "backbone": "sd3", "backbone_path": str(directory), "resolution": 32, "reward": "digit-contrast",
        "prompts": "[a red cube on a table, two dogs]", "steps": 1, "batch_size": 2, "num_inference_steps": 4,
        "eval_samples_per_prompt": 1, "eval_max_prompts": 2, "sample_every": 0, "checkpoint_every": 0,
        "progress": False, "learning_rate": 0.05, "guidance_scale": 3.5, "ema": False, "method": "flowbp-lagrange",
    }
    return ["train", "--output-dir", str(out), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], *extra]


def test_lora_trained_on_an_int8_base_loads_on_the_unquantized_pipeline(tiny_sd3_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "run"
    assert main(_train_args(tiny_sd3_dir, out, "--set", "base_quantization=int8")) == 0
    bb = load_backbone("sd3", path=str(tiny_sd3_dir), resolution=32)
    latents = bb.initial_noise(2, torch.Generator().manual_seed(7))
    sigmas = bb.sigmas(4)
    base = bb.decode(rollout(bb.velocity_fn(bb.encode_prompts(PROMPTS), 3.5), latents, sigmas).sample)
    bb.load_lora(out / "lora")
    ours = bb.decode(rollout(bb.velocity_fn(bb.encode_prompts(PROMPTS), 3.5), latents, sigmas).sample)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out / "lora"))
    theirs = pipe(prompt=PROMPTS, latents=latents.clone(), sigmas=bb.pipeline_sigmas(4), num_inference_steps=4,
                  height=32, width=32, guidance_scale=3.5, output_type="pt").images
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - base).abs().max().item() > 1e-4  # the adapter trained on the int8 base is not a no-op


def test_adamw8bit_matches_adamw_on_a_full_finetune_step(tiny_sd3_dir: Path) -> None:
    """One AdamW step from the same gradient: 8-bit moments give the same update direction."""
    from flowbp.memory_modes import make_adamw

    updates = {}
    for name in ("adamw", "adamw8bit"):
        bb = load_backbone("sd3", path=str(tiny_sd3_dir), resolution=32)
        params = [p for p in bb.transformer.parameters() if p.numel() >= 256]  # torchao: 8-bit for big tensors
        before = [p.detach().clone() for p in params]
        torch.manual_seed(0)
        for p in params:
            p.grad = torch.randn_like(p)
        opt = make_adamw(params, name, lr=1e-3, weight_decay=0.0)
        for _ in range(2):
            opt.step()
        updates[name] = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before, strict=True)])
        if name == "adamw8bit":
            assert type(opt).__name__ == "AdamW8bit"
    cos = torch.nn.functional.cosine_similarity(updates["adamw"], updates["adamw8bit"], dim=0).item()
    assert cos > 0.99, cos


def test_a_mode_without_its_package_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    for key, value in (("base_quantization", "nf4"), ("optimizer", "adamw8bit")):
        assert main(["train", "--set", f"{key}={value}", "--output-dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert f"{key}: '{value}' needs the torchao package" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []



def test_adamw8bit_state_survives_a_checkpoint(tmp_path: Path) -> None:
    """8-bit moments go through the checkpoint's safetensors files as their plain parts (no pickle) and a
    restored optimizer takes the next step exactly as the uninterrupted one."""
    import json

    from safetensors.torch import load_file, save_file

    from flowbp.checkpoint import _flatten_optimizer, _unflatten_optimizer
    from flowbp.memory_modes import make_adamw

    torch.manual_seed(0)
    grads = [torch.randn(64, 64) for _ in range(3)]
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = make_adamw([p], "adamw8bit", lr=1e-2)
    for g in grads[:2]:
        p.grad = g.clone()
        opt.step()
    tensors, meta = _flatten_optimizer(opt.state_dict())
    save_file(tensors, str(tmp_path / "opt.safetensors"))
    meta = json.loads(json.dumps(meta))
    q = torch.nn.Parameter(p.detach().clone())
    restored = make_adamw([q], "adamw8bit", lr=1e-2)
    restored.load_state_dict(_unflatten_optimizer(load_file(str(tmp_path / "opt.safetensors")), meta))
    assert type(restored.state[q]["exp_avg"]).__name__ == "OptimState8bit"
    assert torch.equal(restored.state[q]["exp_avg"].codes, opt.state[p]["exp_avg"].codes)
    for param, o in ((p, opt), (q, restored)):
        param.grad = grads[2].clone()
        o.step()
    assert torch.equal(p, q)


def test_full_finetune_with_adamw8bit_trains_checkpoints_and_resumes(tmp_path: Path) -> None:
    """The digits testbed, full fine-tuning with 8-bit moments and a schedule: checkpoints are written
    (tensor learning rate and 8-bit states included) and one loads back into a resumed run."""
    from flowbp.checkpoint import list_checkpoints
    from flowbp.train import train

    sets = {"steps": 2, "batch_size": 4, "num_inference_steps": 5, "eval_samples_per_prompt": 2, "sample_every": 0,
            "checkpoint_every": 1, "checkpoint_keep_last": 0, "progress": False, "finetune": "full",
            "optimizer": "adamw8bit", "lr_scheduler": "cosine", "learning_rate": 1e-4,
            "output_dir": str(tmp_path / "r")}
    train(load_config(None, sets))
    first = list_checkpoints(tmp_path / "r")[0]
    assert len(list_checkpoints(tmp_path / "r")) == 2
    import json

    opt = json.loads((first / "state.json").read_text())["optimizer"]
    assert "lr" in opt["tensor_group_keys"]
    assert {s["class"] for e in opt["scalars"].values() for s in e.get("__subclasses__", {}).values()} == {
        "OptimState8bit"
    }
    # a second run resumed from the first checkpoint (the later one removed) ends at step 2 again
    import shutil

    shutil.rmtree(list_checkpoints(tmp_path / "r")[1])
    (tmp_path / "r" / "summary.json").unlink()  # as if stopped after step 1
    train(resume=str(tmp_path / "r"))
    assert len(list_checkpoints(tmp_path / "r")) == 2
