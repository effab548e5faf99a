"""FLUX.1 and FLUX.2-Klein adapters against diffusers' own pipelines, on tiny random-weight folders.

Parity: flowbp's no-grad rollout (the adapter's sigmas, velocity and decode) from the same latents
equals ``pipe(..., latents=x0, sigmas=linspace(1, 1/N, N), output_type="pt")``. Gradients: every
method trains one step into the LoRA. Round trips: a saved LoRA / fully fine-tuned transformer
loaded by a *fresh diffusers pipeline* reproduces flowbp's sample.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from flowbp.backbones import load_backbone
from flowbp.cli import main
from flowbp.engine import surrogate
from flowbp.methods import available_methods, make_plan
from flowbp.rewards import load_reward
from flowbp.trajectory import rollout

R = 32  # px: an 8×8 token grid for the tiny VAE (factor 2) × 2×2 patches
STEPS = 3
PROMPTS = ["a red cube", "two dogs"]
MSL = 32  # text tokens (the pipelines' default 512 only slows the tiny models down)
FAMILIES = ("flux1", "flux2-klein")
PIPELINES = {"flux1": "FluxPipeline", "flux2-klein": "Flux2KleinPipeline"}
TRANSFORMERS = {"flux1": "FluxTransformer2DModel", "flux2-klein": "Flux2Transformer2DModel"}


@pytest.fixture
def folders(tiny_flux1_dir: Path, tiny_flux2_klein_dir: Path) -> dict[str, Path]:
    return {"flux1": tiny_flux1_dir, "flux2-klein": tiny_flux2_klein_dir}


def _load(name: str, folder: Path, resolution: int = R, **kwargs):
    return load_backbone(name, path=folder, resolution=resolution, max_sequence_length=MSL, **kwargs)


def _pipeline(name: str, folder: Path, **components):
    import diffusers

    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(str(folder), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_images(bb, pipe, x0: torch.Tensor, guidance: float) -> torch.Tensor:
    return pipe(
        prompt=PROMPTS, latents=x0, height=R, width=R, num_inference_steps=STEPS,
        sigmas=bb.pipeline_sigmas(STEPS), guidance_scale=guidance, output_type="pt", max_sequence_length=MSL,
    ).images


def _flowbp_images(bb, x0: torch.Tensor, guidance: float, detach_uncond: bool = False) -> torch.Tensor:
    velocity = bb.velocity_fn(bb.encode_prompts(PROMPTS), guidance, detach_uncond=detach_uncond)
    traj = rollout(velocity, x0, bb.sigmas(STEPS))
    with torch.no_grad():
        return bb.decode(traj.sample)


# ---------------------------------------------------------------------------------------- sigmas
def test_dynamic_mu_and_grid_match_the_reference_values(folders: dict[str, Path]) -> None:
    """At 128 px the tiny models have L = 32·32 = 1024 image tokens, like the full models at 512².

    FLUX.1: μ = 0.5 + (1024 − 256)·0.65/3840 = 0.63. FLUX.2: compute_empirical_mu(1024, 25) = 1.880616,
    and its grid (backbone_configs.md §3, computed independently) is 1 .9937 .9869 … .3631 .2146.
    """
    flux = _load("flux1", folders["flux1"], 128)
    assert flux.image_seq_len() == 1024
    assert flux.dynamic_mu(25) == pytest.approx(0.5 + 768 * 0.65 / 3840, abs=1e-12)
    klein = _load("flux2-klein", folders["flux2-klein"], 128)
    assert klein.dynamic_mu(25) == pytest.approx(1.880616, abs=1e-6)
    assert klein.dynamic_mu(50) == pytest.approx(1.702, abs=1e-3)  # μ depends on N for FLUX.2 only
    grid = klein.sigmas(25)
    assert grid.dtype == torch.float64 and grid.shape == (26,) and grid[-1] == 0
    assert [round(v, 4) for v in grid[[0, 1, 2, 22, 23, 24]].tolist()] == [1.0, 0.9937, 0.9869, 0.4721, 0.3631, 0.2146]
    assert math.isclose(float(grid[24]), math.exp(1.880616) / (math.exp(1.880616) + 24), rel_tol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_sigmas_equal_the_pipeline_scheduler(name: str, folders: dict[str, Path]) -> None:
    """The scheduler, given the pipeline's μ and ``sigmas=linspace(1, 1/N, N)``, yields the adapter's grid."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    bb = _load(name, folders[name])
    scheduler = bb.scheduler
    for n in (4, 25):
        seq = bb.image_seq_len()
        cfg = scheduler.config
        mu = (
            calculate_shift(seq, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
            if name == "flux1" else compute_empirical_mu(seq, n)
        )
        scheduler.set_timesteps(sigmas=bb.pipeline_sigmas(n), mu=mu)
        ours = bb.sigmas(n)
        assert ours.shape == scheduler.sigmas.shape
        torch.testing.assert_close(ours.float(), scheduler.sigmas, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", FAMILIES)
def test_rollout_reproduces_the_pipeline(name: str, folders: dict[str, Path]) -> None:
    bb = _load(name, folders[name])
    pipe = _pipeline(name, folders[name])
    # initial_noise is the pipeline's own `latents=` layout, drawn as its prepare_latents draws it
    x0 = bb.initial_noise(2, torch.Generator().manual_seed(7))
    own, _ = pipe.prepare_latents(
        2, pipe.transformer.config.in_channels // 4, R, R, torch.float32, "cpu", torch.Generator().manual_seed(7)
    )
    packed = x0 if name == "flux1" else pipe._pack_latents(x0)
    assert torch.equal(packed, own)

    for guidance, detach in ((3.0, False), (5.5, True)):  # (Klein: batched CFG, then separate no-grad uncond)
        ours = _flowbp_images(bb, x0, guidance, detach)
        ref = _pipeline_images(bb, pipe, x0, guidance)
        assert ours.shape == ref.shape == (2, 3, R, R)
        assert (ours - ref).abs().max().item() <= 1e-5
    assert (ours - _flowbp_images(bb, x0, 3.0)).abs().max() > 1e-3  # the guidance scale reaches the model


def test_klein_cfg_batched_detached_and_skipped(folders: dict[str, Path]) -> None:
    """CFG: one batched call; detached: a separate no-grad negative call (half the saved activations,
    same values, same gradient w.r.t. the LoRA as detaching the batched output); g = 1: cond only."""
    from flowbp.memory import saved_tensor_bytes

    bb = _load("flux2-klein", folders["flux2-klein"])
    torch.manual_seed(0)
    bb.add_lora(2)
    with torch.no_grad():
        for n, p in bb.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    cond = bb.encode_prompts(PROMPTS)
    x = bb.initial_noise(2, torch.Generator().manual_seed(1))
    calls: list[int] = []
    hook = bb.transformer.register_forward_hook(
        lambda m, a, kw, out: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    params = list(bb.trainable_parameters())
    try:
        with saved_tensor_bytes(params) as batched_mem:
            v = bb.velocity_fn(cond, 4.0)(x, 0.7)
        with saved_tensor_bytes(params) as detached_mem:
            v_detached = bb.velocity_fn(cond, 4.0, detach_uncond=True)(x, 0.7)
        with torch.no_grad():
            v_c = bb.velocity_fn(cond, 1.0)(x, 0.7)
    finally:
        hook.remove()
    assert calls == [4, 2, 2, 2]
    torch.testing.assert_close(v, v_detached, rtol=1e-6, atol=1e-6)
    assert detached_mem.total < 0.6 * batched_mem.total
    # the gradient of the detached form equals that of detaching v_u inside the batched call
    grad_detached = torch.autograd.grad(v_detached.square().sum(), params)
    v_u_only = bb.velocity_fn(bb.encode_prompts(["", ""]), 1.0)
    v_ref = v_u_only(x, 0.7).detach() + 4.0 * (bb.velocity_fn(cond, 1.0)(x, 0.7) - v_u_only(x, 0.7).detach())
    for a, b in zip(grad_detached, torch.autograd.grad(v_ref.square().sum(), params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # v = v_u + g (v_c − v_u) with v_u the empty prompt's velocity
    with torch.no_grad():
        v_u = v_u_only(x, 0.7)
    torch.testing.assert_close(v.detach(), v_u + 4.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", FAMILIES)
def test_every_method_trains_one_step_into_the_lora(name: str, folders: dict[str, Path]) -> None:
    bb = _load(name, folders[name])
    torch.manual_seed(0)
    bb.add_lora(4)
    params = bb.trainable_parameters()
    assert params and all(p.dtype == torch.float32 for p in params)
    with torch.no_grad():  # B = 0 at init would make every A-gradient vanish: start from a non-trivial adapter
        for n, p in bb.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    reward = load_reward("digit-contrast")
    optimizer = torch.optim.SGD(params, lr=1e-3)
    sigmas = bb.sigmas(4)
    small = {"drtune": {"num_train_steps": 2}, "flowbp-bridge": {"num_active": 3}}  # defaults need N > 4
    methods = [m for m in available_methods() if m != "custom"]
    assert len(methods) == 10  # the paper's nine and coarse-leap
    for i, method in enumerate(methods):
        gen = torch.Generator().manual_seed(i)
        cond = bb.encode_prompts(PROMPTS[:1])
        velocity = bb.velocity_fn(cond, None, detach_uncond=True)
        traj = rollout(velocity, bb.initial_noise(1, gen), sigmas)
        plan = make_plan(method, sigmas, torch.Generator().manual_seed(i), **small.get(method, {}))
        out = surrogate(plan, traj, velocity, generator=gen)
        loss = -sum(reward(bb.decode(x), cond.prompts).mean() for x in out.inputs)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        assert grads, method
        total = torch.stack([g.norm() for g in grads]).norm()
        assert torch.isfinite(total) and total > 0, (method, total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_lora_targets_cover_each_architecture(folders: dict[str, Path]) -> None:
    """FLUX.2: fused single-stream to_qkv_mlp_proj + plain to_out, double-stream to_out.0 (a ModuleList)."""
    klein = _load("flux2-klein", folders["flux2-klein"], R)
    klein.add_lora(2)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in klein.transformer.named_parameters() if ".lora_A" in n}
    assert {
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out",
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.add_k_proj",
        "transformer_blocks.0.attn.to_add_out",
    } <= wrapped
    flux = _load("flux1", folders["flux1"], R)
    flux.add_lora(2)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in flux.transformer.named_parameters() if ".lora_A" in n}
    assert {
        "single_transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0",
        "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_add_out",
        "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff_context.net.2",
    } <= wrapped


# ---------------------------------------------------------------------------------------- round trips
def _train_args(name: str, folder: Path, out: Path, *extra: str) -> list[str]:
    sets = {
        "backbone": name, "backbone_path": str(folder), "resolution": R, "reward": "digit-contrast",
        "prompts": f"[{', '.join(PROMPTS)}]", "backbone_args": f"{{max_sequence_length: {MSL}}}", "steps": 1,
        "batch_size": 2, "num_inference_steps": STEPS, "eval_samples_per_prompt": 1, "eval_max_prompts": 1,
        "sample_every": 0, "checkpoint_every": 0, "progress": False, "learning_rate": 0.05, "ema": False,
        "guidance_scale": 3.0, "method": "flowbp-lagrange",
    }
    args = ["train", "--output-dir", str(out)]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return [*args, *extra]


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_from_flowbp_train_loads_into_a_fresh_pipeline(
    name: str, folders: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert main(_train_args(name, folders[name], out)) == 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    bb = _load(name, folders[name])
    x0 = bb.initial_noise(2, torch.Generator().manual_seed(3))
    base = _flowbp_images(bb, x0, 3.0)
    bb.load_lora(out / "lora")
    ours = _flowbp_images(bb, x0, 3.0)
    assert (ours - base).abs().max().item() > 1e-4  # the trained adapter is not a no-op
    pipe = _pipeline(name, folders[name])
    pipe.load_lora_weights(str(out / "lora"))
    assert (_pipeline_images(bb, pipe, x0, 3.0) - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_full_finetune_from_flowbp_train_loads_into_a_fresh_pipeline(
    name: str, folders: dict[str, Path], tmp_path: Path
) -> None:
    import diffusers

    out = tmp_path / "run"
    assert main(_train_args(name, folders[name], out, "--set", "finetune=full")) == 0
    tuned = getattr(diffusers, TRANSFORMERS[name]).from_pretrained(str(out), subfolder="transformer").eval()
    bb = _load(name, folders[name])
    x0 = bb.initial_noise(2, torch.Generator().manual_seed(4))
    base = _flowbp_images(bb, x0, 3.0)
    bb.transformer = tuned
    ours = _flowbp_images(bb, x0, 3.0)
    assert (ours - base).abs().max().item() > 1e-4  # training changed the weights
    pipe = _pipeline(name, folders[name], transformer=tuned)
    assert (_pipeline_images(bb, pipe, x0, 3.0) - ours).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------- bad input
def test_wrong_architecture_and_bad_settings_are_one_line_errors(folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"needs FluxTransformer2DModel \(use backbone=flux2-klein\)") as err:
        _load("flux1", folders["flux2-klein"], R)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"needs Flux2Transformer2DModel \(use backbone=flux1\)"):
        _load("flux2-klein", folders["flux1"], R)
    with pytest.raises(ValueError, match=r"resolution: 30 is not divisible by 4"):
        _load("flux1", folders["flux1"], 30)
    with pytest.raises(ValueError, match=r"text_encoder_out_layers: \[9, 18, 40\] must be indices in \[0, 28\]"):
        _load("flux2-klein", folders["flux2-klein"], R, text_encoder_out_layers=(9, 18, 40))
    with pytest.raises(ValueError, match=r"joint_attention_dim is 24"):
        _load("flux2-klein", folders["flux2-klein"], R, text_encoder_out_layers=(9, 18))


def _without(folder: Path, tmp: Path, component: str) -> Path:
    copy = tmp / f"no-{component}"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / component)
    return copy


@pytest.mark.parametrize("case", ["sd3-as-flux1", "flux1-as-klein", "no-text_encoder_2", "resolution"])
def test_bad_folders_fail_in_one_line_and_write_nothing(
    case: str, folders: dict[str, Path], tiny_sd3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, folder, extra, message = {
        "sd3-as-flux1": ("flux1", tiny_sd3_dir, [], "backbone 'flux1' needs FluxTransformer2DModel (use backbone=sd3)"),
        "flux1-as-klein": (
            "flux2-klein", folders["flux1"], [],
            "backbone 'flux2-klein' needs Flux2Transformer2DModel (use backbone=flux1)",
        ),
        "no-text_encoder_2": (
            "flux1", _without(folders["flux1"], tmp_path, "text_encoder_2"), [],
            "lacks the text_encoder_2/ folder of component 'text_encoder_2'",
        ),
        "resolution": (
            "flux2-klein", folders["flux2-klein"], ["--set", "resolution=30"],
            "resolution: 30 is not divisible by 4 (VAE factor 2 × patch 2)",
        ),
    }[case]
    out = tmp_path / "never"
    assert main(_train_args(name, folder, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()
