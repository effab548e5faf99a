"""Qwen-Image, Z-Image and FLUX.2-dev adapters against diffusers' own pipelines, on tiny random folders.

Parity: flowbp's no-grad rollout (the adapter's sigmas, velocity and decode) from the same latents
equals ``pipe(..., latents=x0, sigmas=linspace(1, 1/N, N), output_type="pt")``, with and without
CFG; ``initial_noise`` is the pipeline's ``prepare_latents`` draw; the cached prompt embeddings are
its ``encode_prompt``. Gradients: every method trains one step into the LoRA. Round trips: a LoRA /
fully fine-tuned transformer from ``flowbp train`` loaded by a *fresh diffusers pipeline*
reproduces flowbp's sample.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flowbp.backbones import load_backbone
from flowbp.cli import main
from flowbp.engine import surrogate
from flowbp.methods import available_methods, make_plan
from flowbp.rewards import load_reward
from flowbp.trajectory import rollout

R = 32  # px: Qwen-Image 4×4 tokens (VAE factor 4 × 2×2 packing); Z-Image / FLUX.2 8×8 tokens
STEPS = 3
PROMPTS = ["a red cube", "two dogs"]
#: text tokens. The byte-level tiny tokenizers spell out the pipelines' templates (Qwen-Image's system
#: prompt, FLUX.2's system message: ~200 bytes), so keeping the prompt itself takes ~256 tokens. Qwen-Image
#: always needs it (at 32 every prompt would equal the negative and CFG would be a no-op); FLUX.2 only in
#: the parity test (elsewhere 32 is faster and the pipeline gets the same); the default 512 only slows down
MSL = {"qwen-image": 256, "z-image": 32, "flux2": 32}
MSL_PARITY = {**MSL, "flux2": 256}
FAMILIES = ("qwen-image", "z-image", "flux2")
PIPELINES = {"qwen-image": "QwenImagePipeline", "z-image": "ZImagePipeline", "flux2": "Flux2Pipeline"}
TRANSFORMERS = {
    "qwen-image": "QwenImageTransformer2DModel", "z-image": "ZImageTransformer2DModel",
    "flux2": "Flux2Transformer2DModel",
}


@pytest.fixture
def folders(tiny_qwen_image_dir: Path, tiny_z_image_dir: Path, tiny_flux2_dir: Path) -> dict[str, Path]:
    return {"qwen-image": tiny_qwen_image_dir, "z-image": tiny_z_image_dir, "flux2": tiny_flux2_dir}


def _load(name: str, folder: Path, resolution: int = R, msl: int | None = None, **kwargs):
    msl = MSL.get(name, 32) if msl is None else msl
    return load_backbone(name, path=folder, resolution=resolution, max_sequence_length=msl, **kwargs)


def _pipeline(name: str, folder: Path, **components):
    import diffusers

    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(str(folder), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_guidance(name: str, g: float) -> dict:
    """flowbp's guidance g in each pipeline's own terms."""
    if name == "qwen-image":  # true CFG needs a negative prompt; g ≤ 1 runs without it
        return {"true_cfg_scale": g, "negative_prompt": " "} if g > 1 else {"true_cfg_scale": 1.0}
    if name == "z-image":  # pred = pos + s (pos − neg): s = g − 1 (0 turns CFG off)
        return {"guidance_scale": g - 1.0}
    return {"guidance_scale": g}  # FLUX.2-dev: the guidance embedding


def _pipeline_images(name: str, bb, pipe, x0: torch.Tensor, g: float) -> torch.Tensor:
    return pipe(
        prompt=PROMPTS, latents=x0, height=R, width=R, num_inference_steps=STEPS, sigmas=bb.pipeline_sigmas(STEPS),
        output_type="pt", max_sequence_length=bb.max_sequence_length, **_pipeline_guidance(name, g),
    ).images


def _flowbp_images(bb, x0: torch.Tensor, g: float, detach_uncond: bool = False) -> torch.Tensor:
    velocity = bb.velocity_fn(bb.encode_prompts(PROMPTS), g, detach_uncond=detach_uncond)
    traj = rollout(velocity, x0, bb.sigmas(STEPS))
    with torch.no_grad():
        return bb.decode(traj.sample)


# ---------------------------------------------------------------------------------------- sigmas
def test_grids_match_values_computed_by_hand(folders: dict[str, Path]) -> None:
    """Qwen-Image at 1024² (L = 64·64 = 4096 tokens; the tiny VAE has factor 4, so 512 px here):
    μ = 0.5 + (4096 − 256)·0.4/7936 = 0.693548, S = e^μ = 2.000913; then the terminal stretch to 0.02.
    Z-Image-Turbo: the static shift 3. FLUX.2-dev: compute_empirical_mu(1024, 25) = 1.880616."""
    qwen = _load("qwen-image", folders["qwen-image"], 512)
    assert qwen.image_seq_len() == 4096
    mu = 0.5 + (4096 - 256) * 0.4 / 7936
    assert qwen.dynamic_mu(25) == pytest.approx(mu, abs=1e-12)
    grid = qwen.sigmas(4)
    shifted = [math.exp(mu) * s / (1 + (math.exp(mu) - 1) * s) for s in (1.0, 0.75, 0.5, 0.25)]
    stretched = [1 - (1 - v) * (1 - 0.02) / (1 - shifted[-1]) for v in shifted]
    torch.testing.assert_close(grid, torch.tensor([*stretched, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
    assert grid[0] == 1.0 and grid[3] == pytest.approx(0.02, abs=1e-12)
    z = _load("z-image", folders["z-image"])
    torch.testing.assert_close(z.sigmas(4)[:-1], torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64))
    flux2 = _load("flux2", folders["flux2"], 128)
    assert flux2.dynamic_mu(25) == pytest.approx(1.880616, abs=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_sigmas_equal_the_pipeline_scheduler(name: str, folders: dict[str, Path]) -> None:
    """The scheduler, given the pipeline's μ and ``sigmas=linspace(1, 1/N, N)``, yields the adapter's grid."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    bb = _load(name, folders[name])
    scheduler, cfg = bb.scheduler, bb.scheduler.config
    for n in (4, 25):
        seq = bb.image_seq_len()
        mu = (
            compute_empirical_mu(seq, n) if name == "flux2"
            else calculate_shift(seq, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
        )
        scheduler.set_timesteps(sigmas=bb.pipeline_sigmas(n), mu=mu)
        ours = bb.sigmas(n)
        assert ours.shape == scheduler.sigmas.shape
        torch.testing.assert_close(ours.float(), scheduler.sigmas, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- parity
def _pipeline_noise(name: str, pipe, generator: torch.Generator) -> torch.Tensor:
    """The pipeline's own prepare_latents draw, in the layout its ``latents=`` takes."""
    if name == "qwen-image":
        return pipe.prepare_latents(2, pipe.transformer.config.in_channels // 4, R, R, torch.float32, "cpu", generator)
    if name == "z-image":
        return pipe.prepare_latents(2, pipe.transformer.in_channels, R, R, torch.float32, "cpu", generator)
    packed, ids = pipe.prepare_latents(2, pipe.transformer.config.in_channels // 4, R, R, torch.float32, "cpu",
                                       generator)
    return pipe._unpack_latents_with_ids(packed, ids)  # Flux2: the unpacked (B, 128, H/16, W/16) layout


@pytest.mark.parametrize("name", FAMILIES)
def test_rollout_reproduces_the_pipeline(name: str, folders: dict[str, Path]) -> None:
    bb = _load(name, folders[name], msl=MSL_PARITY[name])
    pipe = _pipeline(name, folders[name])
    x0 = bb.initial_noise(2, torch.Generator().manual_seed(7))
    assert torch.equal(x0, _pipeline_noise(name, pipe, torch.Generator().manual_seed(7)))

    # prompt embeddings: the pipeline's encode_prompt (the negative / null prompt too for the CFG families)
    cond = bb.encode_prompts(PROMPTS)
    if name == "qwen-image":
        embeds, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=MSL_PARITY[name])
        assert torch.equal(cond.tensors["encoder_hidden_states"], embeds)
        assert torch.equal(cond.tensors["encoder_hidden_states_mask"], mask)
        neg, neg_mask = pipe.encode_prompt([" "], max_sequence_length=MSL_PARITY[name])
        # encoded in one batch with the prompts (padded): equal to the lone encoding up to float rounding
        diff = (cond.negative["encoder_hidden_states"] - neg).abs().max().item()
        assert diff <= 1e-5 and neg_mask is None, diff
        assert "encoder_hidden_states_mask" not in cond.negative
    elif name == "z-image":
        pos, neg = pipe.encode_prompt(PROMPTS, max_sequence_length=MSL_PARITY[name], do_classifier_free_guidance=True)
        for i in range(2):
            n = int(cond.tensors["cap_lens"][i])
            assert torch.equal(cond.tensors["cap_feats"][i, :n], pos[i]) and n == pos[i].shape[0]
            assert torch.equal(cond.negative["cap_feats"][i, : int(cond.negative["cap_lens"][i])], neg[i])
        assert pos[0].shape[0] != pos[1].shape[0]  # variable lengths really are exercised
    else:
        embeds, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=MSL_PARITY[name])
        assert torch.equal(cond.tensors["encoder_hidden_states"], embeds)
        assert torch.equal(cond.tensors["txt_ids"], text_ids) and cond.negative is None

    runs = ((1.0, False), (3.0, False), (5.5, True)) if name != "flux2" else ((1.0, False), (3.0, False))
    for g, detach in runs:
        ours = _flowbp_images(bb, x0, g, detach)
        ref = _pipeline_images(name, bb, pipe, x0, g)
        assert ours.shape == ref.shape == (2, 3, R, R)
        assert (ours - ref).abs().max().item() <= 1e-5, (g, (ours - ref).abs().max().item())
    assert (ours - _flowbp_images(bb, x0, 1.0)).abs().max() > 1e-3  # the guidance reaches the model


def test_qwen_image_cfg_rescales_each_token_to_the_conditional_norm(folders: dict[str, Path]) -> None:
    """v = comb · ‖v_c‖/‖comb‖ with comb = v_n + g (v_c − v_n), per token; the detached negative is a
    separate no-grad call with the same value."""
    bb = _load("qwen-image", folders["qwen-image"])
    cond = bb.encode_prompts(PROMPTS)
    x = bb.initial_noise(2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        v = bb.velocity_fn(cond, 4.0)(x, 0.7)
        v_c = bb.velocity_fn(cond, 1.0)(x, 0.7)
        v_n = bb.velocity_fn(bb.encode_prompts([" ", " "]), 1.0)(x, 0.7)
        v_detached = bb.velocity_fn(cond, 4.0, detach_uncond=True)(x, 0.7)
    comb = v_n + 4.0 * (v_c - v_n)
    torch.testing.assert_close(v.norm(dim=-1), v_c.norm(dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, comb / comb.norm(dim=-1, keepdim=True) * v_c.norm(dim=-1, keepdim=True),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, v_detached, rtol=0, atol=0)


def test_z_image_flips_time_and_negates_the_output(folders: dict[str, Path]) -> None:
    """The transformer sees 1 − σ and its output is negated (checked on the raw transformer)."""
    bb = _load("z-image", folders["z-image"])
    cond = bb.encode_prompts(PROMPTS[:1])
    x = bb.initial_noise(1, torch.Generator().manual_seed(2))
    seen: list[torch.Tensor] = []
    hook = bb.transformer.register_forward_hook(lambda m, a, out: seen.append(a[1].clone()))
    try:
        with torch.no_grad():
            v = bb.velocity_fn(cond, 1.0)(x, 0.8)
            feats = [cond.tensors["cap_feats"][0, : int(cond.tensors["cap_lens"][0])]]
            raw = bb.transformer([x[0].unsqueeze(1)], torch.tensor([0.2]), feats, return_dict=False)[0][0]
    finally:
        hook.remove()
    assert seen[0].item() == pytest.approx(0.2, abs=1e-6)
    torch.testing.assert_close(v, -raw.squeeze(1).unsqueeze(0), rtol=0, atol=0)


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


def test_lora_targets_follow_the_diffusers_recipes(folders: dict[str, Path]) -> None:
    """Qwen-Image / Z-Image: to_q/k/v, to_out.0 (the text stream of Qwen-Image untouched); FLUX.2: Klein's regex."""
    wrapped = {}
    for name in FAMILIES:
        bb = _load(name, folders[name])
        bb.add_lora(2)
        wrapped[name] = {n.rsplit(".lora_A", 1)[0] for n, _ in bb.transformer.named_parameters() if ".lora_A" in n}
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_out.0"} <= wrapped["qwen-image"]
    assert not any("add_" in n or "to_add_out" in n for n in wrapped["qwen-image"])
    assert {"layers.0.attention.to_q", "noise_refiner.0.attention.to_out.0",
            "context_refiner.0.attention.to_v"} <= wrapped["z-image"]
    assert {"single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out",
            "transformer_blocks.0.attn.add_k_proj"} <= wrapped["flux2"]


# ---------------------------------------------------------------------------------------- round trips
def _train_args(name: str, folder: Path, out: Path, *extra: str) -> list[str]:
    sets = {
        "backbone": name, "backbone_path": str(folder), "resolution": R, "reward": "digit-contrast",
        "prompts": f"[{', '.join(PROMPTS)}]", "backbone_args": f"{{max_sequence_length: {MSL.get(name, 32)}}}",
        "steps": 1,
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
    assert (_pipeline_images(name, bb, pipe, x0, 3.0) - ours).abs().max().item() <= 1e-5


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
    assert (_pipeline_images(name, bb, pipe, x0, 3.0) - ours).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("name", "source", "message"),
    [
        ("qwen-image", "z-image", "needs QwenImageTransformer2DModel (use backbone=z-image)"),
        ("z-image", "qwen-image", "needs ZImageTransformer2DModel (use backbone=qwen-image)"),
        ("flux2", "qwen-image", "needs Flux2Transformer2DModel (use backbone=qwen-image)"),
        ("sd3", "flux2", "needs SD3Transformer2DModel (use backbone=flux2)"),
        ("flux2-klein", "flux2", "holds a Flux2Pipeline; backbone 'flux2-klein' needs a Flux2KleinPipeline "
                                 "(use backbone=flux2)"),
        ("flux2", "flux2-klein", "holds a Flux2KleinPipeline; backbone 'flux2' needs a Flux2Pipeline "
                                 "(use backbone=flux2-klein)"),
    ],
)
def test_a_folder_of_another_family_is_one_line_naming_its_backbone(
    name: str, source: str, message: str, folders: dict[str, Path], tiny_flux2_klein_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tiny_flux2_klein_dir if source == "flux2-klein" else folders[source]
    out = tmp_path / "never"
    assert main(_train_args(name, folder, out)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_bad_settings_are_one_line_errors(folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"resolution: 36 is not divisible by 8 \(VAE factor 4 × patch 2\)"):
        _load("qwen-image", folders["qwen-image"], 36)
    with pytest.raises(ValueError, match=r"resolution: 30 is not divisible by 4 \(VAE factor 2 × patch 2\)"):
        _load("z-image", folders["z-image"], 30)
    with pytest.raises(ValueError, match=r"max_sequence_length: the Qwen-Image pipeline takes 1 to 1024 tokens"):
        load_backbone("qwen-image", path=folders["qwen-image"], resolution=R, max_sequence_length=2048)
    with pytest.raises(ValueError, match=r"text_encoder_out_layers: \[10, 20, 31\] must be indices in \[0, 30\]"):
        _load("flux2", folders["flux2"], R, text_encoder_out_layers=(10, 20, 31))


# ---------------------------------------------------------------------------------------- variants
def test_sd35_large_layout_runs_through_the_sd3_adapter(tmp_path: Path) -> None:
    """SD3.5-Large differs from SD3.5-Medium in sizes and in having no dual-attention layers (qk-norm kept,
    shared/reference/backbones_next.md §1): a tiny SD3 of that layout reproduces its pipeline with CFG.
    FLUX.2-Klein-4B differs from Klein-9B in sizes only (same classes and pipeline), which
    tests/test_flux_backbones.py covers; _check_out_layers ties its Qwen3-4B width 3 × 2560 to joint 7680."""
    from diffusers import StableDiffusion3Pipeline
    from tiny_pipelines import build_tiny_sd3

    build_tiny_sd3(tmp_path, dual_attention_layers=())
    bb = load_backbone("sd3", path=tmp_path, resolution=R)
    assert not bb.transformer.config.dual_attention_layers
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    x0 = bb.initial_noise(2, torch.Generator().manual_seed(5))
    ours = _flowbp_images(bb, x0, 3.5)
    ref = pipe(
        prompt=PROMPTS, latents=x0, height=R, width=R, num_inference_steps=STEPS, sigmas=bb.pipeline_sigmas(STEPS),
        guidance_scale=3.5, output_type="pt",
    ).images
    assert (ours - ref).abs().max().item() <= 1e-5
