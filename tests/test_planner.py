"""The recipe planner (``--dry-run --gpu-memory``): hand-derived choices, measured profiles, the CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny_pipelines import meta_twins, tiny_sd3_architecture

from flowbp.backbones import load_backbone
from flowbp.cli import main
from flowbp.dryrun import GiB, estimate
from flowbp.planner import SPEED, Affine, Profile, Recipe, memory, plan_for_gpu, profile, recipes, search, step_cost

NO_QUANT = {"int8": (0, 0), "float8": (0, 0), "nf4": (0, 0)}


def _profile(**kw) -> Profile:
    """A hand-made profile in plain bytes: every recipe's memory and cost can be worked out on paper."""
    base = dict(
        title="hand", backbone="hand", method="m", finetune="lora", global_batch=4, elem=2, parameters=100,
        trainable=0, linear_weights={"int8": (100, 100), "float8": (100, 100), "nf4": (100, 50)}, largest_block=10,
        vae_parameters=0, reward_parameters=0, forward={False: Affine(10, 10), True: Affine(2, 2)},
        decode={False: Affine(5, 5), True: Affine(1, 1)}, grad_forwards=2, reward_inputs=1, checkpointed_plan=False,
        latent_per_sample=0, rollout_steps=10,
    )
    return Profile(**{**base, **kw})


def test_lora_choice_by_hand() -> None:
    """memory = base weights (200 B; int8/float8 100, nf4 50) + 2 grad forwards × F(m) + D(m), with
    F = 10m (2m checkpointed), D = 5m (1m checkpointed). Cost per sample = 10 + 2 × (3 | 4) + (3 | 4),
    × (1 + 0.5/m) × the quantization factor, × 4 samples."""
    p = _profile()
    assert memory(p, Recipe(1, 4, 1, False, False)).peak == 300
    # 240 B: unlimited, micro-batch 4 without any mode (cost 19 × 1.125 × 4 = 85.5) needs 300 B. One change:
    # float8 base 200 B, 19 × 1.125 × 1.10 × 4 = 94.05; checkpointed grad forwards 236 B, 21 × 1.125 × 4 = 94.5;
    # int8 200 B, 98.3; micro-batch 2: 250 B (no fit); checkpointed decode: 284 B (no fit). Two changes cost more.
    best = search(p, 240, 1).best
    assert best == Recipe(1, 4, 1, False, False, "float8")
    assert step_cost(p, best) == pytest.approx(94.05)
    assert step_cost(p, Recipe(1, 4, 1, True, False)) == pytest.approx(94.5)
    # 150 B: the base must be quantized. float8 (×1.10) at micro-batch 4 with checkpointed grad forwards:
    # 100 + 16 + 20 = 136 B, cost 21 × 1.125 × 1.1 × 4 = 103.95; the next best, float8 at micro-batch 2
    # without checkpointing (100 + 40 + 10 = 150 B), costs 19 × 1.25 × 1.1 × 4 = 104.5
    plan = search(p, 150, 1)
    assert plan.best == Recipe(1, 4, 1, True, False, "float8")
    assert step_cost(p, plan.best) == pytest.approx(103.95)
    # 40 B: nothing fits; the smallest is nf4, micro-batch 1, both checkpointed: 50 + 2 × 2 + 1 = 55 B
    plan = search(p, 40, 1)
    assert not plan.fits and plan.smallest == Recipe(1, 1, 4, True, True, "nf4")
    assert memory(p, plan.smallest).peak == 55
    assert "does not fit" in plan.report() and "the smallest needs" in plan.report()


def test_a_gpu_keeps_a_tenth_free() -> None:
    """The estimate omits the CUDA context, fragmentation and the reward's activations: from the CLI a recipe may
    use 90 % of the GPU. A 300 B GPU fits the unlimited recipe's 300 B exactly, yet the plan keeps 270 B and
    takes the float8 base (200 B, the cheapest one change, as worked out above)."""
    p = _profile()
    assert search(p, 300, 1).best == Recipe(1, 4, 1, False, False)
    plan = plan_for_gpu(p, 300.5 / GiB, 1)
    assert (plan.gpu_memory, plan.budget) == (300, 270)
    assert plan.best == Recipe(1, 4, 1, False, False, "float8")
    assert "(recipes may use 0.0 GiB: 90%" in plan.report()


def test_full_finetune_on_two_processes_by_hand() -> None:
    """Full fine-tuning of 100 parameters (fp32 master + bf16 copy: 600 B; grad + AdamW + EMA: 1600 B,
    with 8-bit moments 1000 B). FSDP2 over 2 processes halves both and gathers 2 blocks of 10 (40 B)."""
    one = {False: Affine(1, 1), True: Affine(1, 1)}
    p = _profile(finetune="full", trainable=100, linear_weights=NO_QUANT, forward=one, decode=one)
    fsdp8 = Recipe(2, 2, 1, False, False, optimizer="adamw8bit", fsdp2=True)
    assert memory(p, fsdp8).weights == 340 and memory(p, fsdp8).optimizer == 500
    assert memory(p, dataclasses.replace(fsdp8, optimizer="adamw")).optimizer == 800
    # 1000 B: DDP needs >= 1600 + 600; FSDP2 with fp32 moments 340 + 800 + 3 = 1143: only FSDP2 + 8-bit fits
    assert search(p, 1000, 2).best == fsdp8
    # 1200 B: FSDP2 with fp32 moments fits (1143 B) and is modelled 2 % faster than 8-bit moments
    assert search(p, 1200, 2).best == dataclasses.replace(fsdp8, optimizer="adamw")
    assert step_cost(p, fsdp8) / step_cost(p, dataclasses.replace(fsdp8, optimizer="adamw")) == pytest.approx(
        SPEED["adamw8bit"]
    )
    with pytest.raises(ValueError, match=r"--processes: batch_size 4 \(the global batch\) is not divisible by 3"):
        search(p, 1000, 3)


def test_lora_under_fsdp2_on_two_processes_by_hand() -> None:
    """LoRA (10 fp32 parameters) on a 100-parameter bf16 base, 2 processes × micro-batch 2. Per process:
    data-parallel weights 200 + 40 = 240 B, grads + AdamW + EMA 10 × 16 = 160 B, activations 2 × 10m + 5m
    = 50 B: 450 B. FSDP2 shards base and adapter (240 / 2 = 120 B) and gathers two blocks of 10 and the 20
    parameters outside the blocks in bf16 (80 B): 200 B; optimizer 160 / 2 = 80 B: 330 B in all. An nf4
    base (100 weights in 50 B) is 240 − 150 = 90 B unsharded, 45 + 80 = 125 B under FSDP2."""
    p = _profile(trainable=10, outside_blocks=20)
    fsdp = Recipe(2, 2, 1, False, False, fsdp2=True)
    assert memory(p, Recipe(2, 2, 1, False, False)).peak == 450
    assert (memory(p, fsdp).weights, memory(p, fsdp).optimizer, memory(p, fsdp).peak) == (200, 80, 330)
    nf4 = dataclasses.replace(fsdp, base_quantization="nf4")
    assert memory(p, nf4).weights == 125 and memory(p, nf4).peak == 255
    # FSDP2 cannot shard torchao's int8/float8 tensors: those recipes are never offered
    offered = recipes(p, 2)
    assert {r.base_quantization for r in offered if r.fsdp2} == {"none", "nf4"}
    assert any(not r.fsdp2 and r.base_quantization == "float8" for r in offered)
    # 340 B: cost per sample 10 + 2 × 3 + 3 = 19, × 2 samples × 1.25 (micro-batch 2) = 47.5 unlimited. FSDP2
    # (330 B) costs × 1.10 = 52.25; the data-parallel alternatives that fit cost more: float8 + checkpointed
    # grad forwards (318 B) 57.75, nf4 (300 B) 61.75
    assert search(p, 340, 2).best == fsdp and step_cost(p, fsdp) == pytest.approx(52.25)
    # 280 B: FSDP2 with an nf4 base (255 B, 47.5 × 1.3 × 1.1 = 67.925) beats data-parallel nf4 with checkpointed
    # grad forwards (268 B, 52.5 × 1.3 = 68.25); FSDP2 + float8 (280 B, 57.475) would win were it runnable
    assert search(p, 280, 2).best == nf4 and step_cost(p, nf4) == pytest.approx(67.925)
    # 100 B: nothing fits; the smallest is FSDP2 + nf4, micro-batch 1, both checkpointed: 125 + 80 + 2 × 2 + 1
    plan = search(p, 100, 2)
    assert not plan.fits and plan.smallest == Recipe(2, 1, 2, True, True, "nf4", fsdp2=True)
    assert memory(p, plan.smallest).peak == 210 and "FSDP2" in plan.report()




@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_profile_extrapolation_equals_the_direct_estimate(tiny_sd3_dir: Path, finetune: str) -> None:
    """The profile (measured at micro-batch 1 and 2) predicts the dry run's direct measurement at 4,
    with and without checkpointing, and the same weights and optimizer bytes."""
    bb = load_backbone("sd3", path=str(tiny_sd3_dir), resolution=32)
    arch = tiny_sd3_architecture()
    common = dict(resolution=32, num_steps=6, finetune=finetune, lora_rank=4, dtype=torch.float32,
                  guidance_scale=3.5, detach_negative=False)
    prof = profile(arch, "flowbp-sparse", {"num_active": 3}, global_batch=4, **common, **meta_twins(bb))
    for ckpt in (False, True):
        est = estimate(arch, "flowbp-sparse", {"num_active": 3}, batch_size=4, gradient_checkpointing=ckpt,
                       vae_gradient_checkpointing=ckpt, ema=True, **common, **meta_twins(bb))
        b = memory(prof, Recipe(1, 4, 1, ckpt, ckpt))
        assert (b.activations, b.weights, b.optimizer) == (est.activation_bytes, est.weights_bytes, est.optimizer_bytes)
        # FSDP2 over 2 processes (micro-batch 2 each): the dry run's per-GPU FSDP line is the planner's memory
        half = estimate(arch, "flowbp-sparse", {"num_active": 3}, batch_size=2, gradient_checkpointing=ckpt,
                        vae_gradient_checkpointing=ckpt, ema=True, **common, **meta_twins(bb))
        assert memory(prof, Recipe(2, 2, 1, ckpt, ckpt, fsdp2=True)).peak == half.sharded_peak_bytes(2)
    assert prof.forward[True].per_sample < prof.forward[False].per_sample


def test_planner_cli(capsys) -> None:
    args = ["train", "--config", "sd35-refl", "--set", "finetune=lora", "--set", "resolution=128", "--dry-run"]
    assert main([*args, "--gpu-memory", "80", "--processes", "8"]) == 0
    out = capsys.readouterr().out
    assert "plan: SD3.5-Medium (sd3) × refl, lora fine-tuning, global batch 64 on 8 processes, 80.0 GiB per GPU" in out
    # unlimited memory on 8 processes: the whole micro-batch of 8 at once, no saving mode (speed cost ×1)
    assert "--set gradient_accumulation_steps=1 --set gradient_checkpointing=false" in out
    assert "--set base_quantization=none" in out and "speed cost ×1.00" in out
    assert 'accelerate launch --config_file "$(flowbp accelerate-config multi-gpu)" --num_processes 8' in out
    assert main([*args, "--gpu-memory", "0.1"]) == 1  # 1 GiB fits with everything offloaded
    out = capsys.readouterr().out
    assert "--processes not given: planning for 1 process" in out
    assert "does not fit: no recipe fits 0.1 GiB per GPU on 1 process; the smallest needs" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dry-run", "--gpu-memory", "0"], "--gpu-memory: must be a positive number of GiB, got 0"),
        (["--dry-run", "--gpu-memory", "-3"], "--gpu-memory: must be a positive number of GiB, got -3"),
        (["--gpu-memory", "24"], "--gpu-memory: only with --dry-run"),
        (["--dry-run", "--gpu-memory", "24", "--processes", "3"],
         "--processes: batch_size 64 (the global batch) is not divisible by 3 processes"),
        (["--dry-run", "--set", "base_quantization=int4"], "base_quantization"),
        (["--dry-run", "--set", "base_quantization=int8", "--set", "finetune=full"],
         "base_quantization: 'int8' quantizes the frozen base under a LoRA"),
    ],
)
def test_planner_bad_input_is_one_line(capsys, tmp_path: Path, monkeypatch, extra: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "sd35-refl", "--set", "resolution=128", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []  # nothing written
