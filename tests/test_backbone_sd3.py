"""The ``sd3`` backbone against diffusers' own StableDiffusion3Pipeline on a tiny random pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flowbp.backbones import Backbone, load_backbone
from flowbp.cli import main
from flowbp.engine import surrogate
from flowbp.memory import saved_tensor_bytes
from flowbp.methods import available_methods, make_plan
from flowbp.rewards import load_reward
from flowbp.trajectory import rollout

PROMPTS = ["a red cube on a table", "two dogs"]
N = 4


def _pipe(directory: Path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(directory), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_images(pipe, bb, latents: torch.Tensor, guidance: float) -> torch.Tensor:
    return pipe(
        prompt=PROMPTS, latents=latents.clone(), sigmas=bb.pipeline_sigmas(N), num_inference_steps=N,
        height=bb.resolution, width=bb.resolution, guidance_scale=guidance, output_type="pt",
    ).images


def _flowbp_images(bb, latents: torch.Tensor, guidance: float) -> torch.Tensor:
    traj = rollout(bb.velocity_fn(bb.encode_prompts(PROMPTS), guidance), latents, bb.sigmas(N))
    return bb.decode(traj.sample)


@pytest.mark.parametrize("guidance", [3.5, 1.0])
def test_rollout_matches_the_pipeline(tiny_sd3_dir: Path, guidance: float) -> None:
    bb = load_backbone("sd3", path=str(tiny_sd3_dir), resolution=32)
    pipe = _pipe(tiny_sd3_dir)
    latents = bb.initial_noise(2, torch.Generator().manual_seed(3))
    # the layout initial_noise returns is the one the pipeline prepares itself
    prepared = pipe.prepare_latents(2, 4, 32, 32, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert latents.shape == prepared.shape
    ours, theirs = _flowbp_images(bb, latents, guidance), _pipeline_images(pipe, bb, latents, guidance)
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().max().item() <= 1e-5
    # the grid is what the pipeline's scheduler ran (paper's grid: shift 3 applied to linspace(1, 1/N, N))
    assert torch.allclose(bb.sigmas(N).float(), pipe.scheduler.sigmas, atol=1e-7)
    assert bb.sigmas(N)[-2].item() == pytest.approx(3 * 0.25 / (1 + 2 * 0.25))


def test_prompt_cache_and_negative_branch(tiny_sd3_dir: Path) -> None:
    bb = load_backbone("sd3", path=str(tiny_sd3_dir), resolution=32)
    assert isinstance(bb, Backbone) and len(bb.default_prompts()) == 400
    cond = bb.encode_prompts(PROMPTS)
    assert set(bb._cache) == {*PROMPTS, ""}
    assert cond.tensors["encoder_hidden_states"].shape[0] == 2 and cond.negative is not None
    # the cached embeddings are the pipeline's own encode_prompt output
    pos, neg, pooled, neg_pooled = bb.pipe.encode_prompt(PROMPTS, None, None, negative_prompt="")
    assert torch.equal(cond.tensors["encoder_hidden_states"], pos)
    assert torch.equal(cond.negative["pooled_projections"], neg_pooled)
    assert torch.equal(cond.negative["encoder_hidden_states"], neg)
    bb.free_text_encoders()
    assert torch.equal(bb.encode_prompts(PROMPTS[:1]).tensors["pooled_projections"], pooled[:1])
    with pytest.raises(ValueError, match="not cached and the text encoders were freed"):
        bb.encode_prompts(["something new"])


def test_detach_negative_only_changes_the_gradient(tiny_sd3_dir: Path) -> None:
    bb = load_backbone("sd3", path=str(tiny_sd3_dir), resolution=32)
    cond = bb.encode_prompts(PROMPTS[:1])
    x = bb.initial_noise(1, torch.Generator().manual_seed(0))
    param = bb.transformer.proj_out.weight
    param.requires_grad_(True)
    grads, values, saved = [], [], []
    for detach in (False, True):
        with saved_tensor_bytes(exclude=list(bb.transformer.parameters())) as meter:
            v = bb.velocity_fn(cond, 3.5, detach_uncond=detach)(x, 0.7)
        (g,) = torch.autograd.grad(v.square().sum(), param)
        grads.append(g)
        values.append(v.detach())
        saved.append(meter.total)
    assert torch.allclose(values[0], values[1], atol=1e-6)
    assert not torch.allclose(grads[0], grads[1])
    # the detached negative branch runs without autograd: its activations are not kept
    assert saved[1] < 0.6 * saved[0]


@pytest.mark.parametrize("method", available_methods())
def test_every_method_trains_one_step(tiny_sd3_dir: Path, method: str) -> None:
    bb = load_backbone("sd3", path=str(tiny_sd3_dir), resolution=32, gradient_checkpointing=method == "alignprop")
    bb.add_lora(4)
    reward = load_reward("digit-contrast")
    sigmas = bb.sigmas(8)  # DRTune needs K = 3 nodes before its stop node
    cond = bb.encode_prompts(PROMPTS)
    velocity = bb.velocity_fn(cond, 3.5, detach_uncond=True)
    traj = rollout(velocity, bb.initial_noise(2, torch.Generator().manual_seed(1)), sigmas)
    plan = make_plan(method, sigmas, torch.Generator().manual_seed(5))
    out = surrogate(plan, traj, velocity, generator=torch.Generator().manual_seed(6))
    loss = -sum(reward(bb.decode(x), PROMPTS).mean() for x in out.inputs)
    loss.backward()
    lora = {n: p for n, p in bb.transformer.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    grads = [p.grad for p in lora.values() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # LoRA B starts at 0, so the gradient reaches the model through the B matrices
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)


def _train_args(directory: Path, out: Path, *extra: str) -> list[str]:
    sets = {
        "backbone": "sd3", "backbone_path": str(directory), "resolution": 32, "reward": "digit-contrast",
        "prompts": "[a red cube on a table, two dogs]", "steps": 1, "batch_size": 2, "num_inference_steps": N,
        "eval_samples_per_prompt": 1, "eval_max_prompts": 2, "sample_every": 0, "checkpoint_every": 0,
        "progress": False, "learning_rate": 0.05, "guidance_scale": 3.5, "ema": False,
        "method": "flowbp-lagrange",
    }
    args = ["train", "--output-dir", str(out)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return [*args, *extra]


def test_lora_round_trip_through_flowbp_train(tiny_sd3_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_train_args(tiny_sd3_dir, out)) == 0
    lora_file = out / "lora" / "pytorch_lora_weights.safetensors"
    assert lora_file.is_file()
    bb = load_backbone("sd3", path=str(tiny_sd3_dir), resolution=32)
    latents = bb.initial_noise(2, torch.Generator().manual_seed(7))
    base = _flowbp_images(bb, latents, 3.5)
    bb.load_lora(out / "lora")
    ours = _flowbp_images(bb, latents, 3.5)
    pipe = _pipe(tiny_sd3_dir)
    pipe.load_lora_weights(str(out / "lora"))
    theirs = _pipeline_images(pipe, bb, latents, 3.5)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - base).abs().max().item() > 1e-4  # the adapter is not a no-op


def test_full_finetune_round_trip(tiny_sd3_dir: Path, tmp_path: Path) -> None:
    from diffusers import SD3Transformer2DModel

    out = tmp_path / "run"
    assert main(_train_args(tiny_sd3_dir, out, "--set", "finetune=full")) == 0
    tuned = SD3Transformer2DModel.from_pretrained(str(out), subfolder="transformer")
    bb = load_backbone("sd3", path=str(tiny_sd3_dir), resolution=32)
    base_sd = bb.transformer.state_dict()
    assert any(not torch.equal(v, base_sd[k]) for k, v in tuned.state_dict().items())
    latents = bb.initial_noise(2, torch.Generator().manual_seed(7))
    bb.transformer = tuned.eval()
    ours = _flowbp_images(bb, latents, 3.5)
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir), transformer=tuned, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert (ours - _pipeline_images(pipe, bb, latents, 3.5)).abs().max().item() <= 1e-5


def _wrong_arch(tmp: Path) -> Path:
    folder = tmp / "flux"
    folder.mkdir()
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _missing_vae(tmp: Path, source: Path) -> Path:
    folder = tmp / "novae"
    shutil.copytree(source, folder)
    shutil.rmtree(folder / "vae")
    return folder


@pytest.mark.parametrize(
    "case,message",
    [
        ("wrong", "backbone_path: {p} holds a FluxPipeline with transformer FluxTransformer2DModel; backbone 'sd3' "
                  "needs SD3Transformer2DModel (use backbone=flux1)"),
        ("novae", "backbone_path: {p} lacks the vae/ folder of component 'vae'"),
        ("resolution", "resolution: 30 is not divisible by 4 (VAE factor 2 × patch 2)"),
        ("unknown", "backbone: unknown backbone 'sd5'; known: "),
        ("notfolder", "backbone_path: {p} is not a diffusers pipeline folder (no model_index.json)"),
        # No training prompts: the default set is the HPDv2 test set, never trained on silently.
        ("noprompts", "prompts_file: backbone 'sd3' needs training prompts: --set prompts_file=FILE"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tiny_sd3_dir: Path, tmp_path: Path, capsys, case: str, message: str
) -> None:
    path = {
        "wrong": lambda: _wrong_arch(tmp_path),
        "novae": lambda: _missing_vae(tmp_path, tiny_sd3_dir),
        "notfolder": lambda: tmp_path,
    }.get(case, lambda: tiny_sd3_dir)()
    out = tmp_path / "never"
    extra = {
        "resolution": ["--set", "resolution=30"],
        "unknown": ["--set", "backbone=sd5"],
        "noprompts": ["--set", "prompts=null"],
    }.get(case, [])
    assert main(_train_args(path, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message.format(p=path) in err, err
    assert err.count("\n") == 1
    assert not out.exists()


def test_bf16_base_keeps_fp32_lora(tiny_sd3_dir: Path) -> None:
    bb = load_backbone("sd3", path=str(tiny_sd3_dir), resolution=32, dtype=torch.bfloat16)
    bb.add_lora(4)
    assert {p.dtype for p in bb.trainable_parameters()} == {torch.float32}
    assert bb.transformer.proj_out.weight.dtype == torch.bfloat16
    velocity = bb.velocity_fn(bb.encode_prompts(PROMPTS), 3.5, detach_uncond=True)
    v = velocity(bb.initial_noise(2, torch.Generator().manual_seed(0)), 0.5)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in bb.trainable_parameters())


def test_hub_id_resolves_from_the_local_cache_only(tiny_sd3_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-sd3"
    shutil.copytree(tiny_sd3_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    bb = load_backbone("sd3", path="someone/tiny-sd3", resolution=32)
    assert bb.latent_shape(1) == (1, 4, 16, 16)
    with pytest.raises(ValueError, match=r"backbone_path: cannot find someone/absent \(not in the local hub cache"):
        load_backbone("sd3", path="someone/absent", resolution=32)


def test_vae_checkpointing_keeps_values_and_gradients(tiny_sd3_dir: Path) -> None:
    results = []
    for ckpt in (False, True):
        bb = load_backbone("sd3", path=str(tiny_sd3_dir), resolution=32, vae_gradient_checkpointing=ckpt)
        z = bb.initial_noise(2, torch.Generator().manual_seed(4)).requires_grad_(True)
        with saved_tensor_bytes(exclude=list(bb.vae.parameters())) as meter:
            images = bb.decode(z)
        (grad,) = torch.autograd.grad(images.square().sum(), z)
        results.append((images.detach(), grad, meter.total))
    (im0, g0, b0), (im1, g1, b1) = results
    assert torch.equal(im0, im1) and torch.allclose(g0, g1, atol=1e-6)
    assert im0.shape == (2, 3, 32, 32) and 0 <= im0.min() and im0.max() <= 1
    assert b1 < b0
