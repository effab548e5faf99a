"""``offload``: frozen linear weights streamed from the CPU. On CPU the onload and offload devices are the same,
so these tests check what does not depend on the device: the gradient equals the resident model's, nothing more
is saved for backward, and the bytes left on the onload device are what the planner counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_pipelines import meta_twins, tiny_sd3_architecture

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


@pytest.fixture(scope="module")
def resident(tiny_sd3_dir: Path, clip_dir: Path) -> dict:
    """offload: none's (gradient, saved bytes, score) per method: the reference of every mode."""
    bb, reward, _, frozen = _setup(tiny_sd3_dir, "none", clip=clip_dir)
    return {method: _gradients(bb, reward, frozen, method) for method in available_methods()}


@pytest.mark.parametrize("mode", MODES[1:])
def test_every_method_under_offload_gives_the_resident_gradient(
    tiny_sd3_dir: Path, clip_dir: Path, resident: dict, mode: str
) -> None:
    """Each method, one step: finite LoRA gradients equal to offload: none's, and the same bytes saved for backward
    (a streamed layer saves no weight; the resident one's weight is a parameter, excluded from the count)."""
    bb, reward, counts, frozen = _setup(tiny_sd3_dir, mode, clip=clip_dir)
    assert (counts.get("base", 0) > 10) == (mode != "reward") and (counts.get("reward", 0) > 1) == (mode != "base")
    for method in available_methods():
        ref_grad, ref_saved, ref_score = resident[method]
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



@pytest.mark.parametrize("quant", ["none", "int8"])
def test_resident_bytes_are_what_the_planner_counts(tiny_sd3_dir: Path, quant: str) -> None:
    """After offload: base, the transformer's parameters (norms, embeddings, biases, the fp32 LoRA) + the largest
    streamed weight (the layer in flight) + the VAE are exactly the planner's weight term; every linear weight
    is in the offload store. (Buffers such as SD3's positional table are resident and, in every mode, not
    counted by the planner.)"""
    if quant != "none":
        pytest.importorskip("torchao")
    from flowbp.planner import Recipe, memory, profile

    bb, _, _, _ = _setup(tiny_sd3_dir, "base", quant)
    fresh = load_backbone("sd3", path=str(tiny_sd3_dir), resolution=32)

    arch = tiny_sd3_architecture()
    prof = profile(
        arch, "flowbp-lagrange", global_batch=2, resolution=32, num_steps=4, lora_rank=4, dtype=torch.float32,
        **meta_twins(fresh),
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
    # the plain --dry-run estimate counts the same bytes
    from flowbp.dryrun import estimate as dry_estimate

    dry = dry_estimate(
        arch, "flowbp-lagrange", resolution=32, batch_size=2, num_steps=4, finetune="lora", lora_rank=4,
        dtype=torch.float32, base_quantization=quant, offload="base",
        **meta_twins(fresh),
    )
    assert dry.weights_bytes == estimate
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


def test_planner_offload_choice_by_hand() -> None:
    """One sample (micro-batch 1), 2-byte weights. Base: 100 parameters, 80 of them in linear weights (largest 10:
    20 B in flight; int8/float8 10 B, nf4 6 B); int8/float8 store the 80 in 80 B, nf4 in 40 B. Reward: 50
    parameters, 40 streamable, largest 5. Activations 10 B (checkpointing saves nothing here, so it is never
    worth its cost). Memory:
        base  none 200 | int8/float8 120 | nf4 80 | streamed: 40 + in flight (20 | 10 | 10 | 6)
        reward 100 | streamed (50 - 40 + 5) × 2 = 30
    Cost: 1 sample × (10 + 3 + 3) × (1 + 0.5) = 24, × 1.15 int8 / 1.10 float8 / 1.30 nf4, × SPEED offload factors."""
    from flowbp.planner import SPEED, Affine, Profile, Recipe, memory, search, step_cost

    flat = {False: Affine(10, 10), True: Affine(10, 10)}
    zero = {False: Affine(0, 0), True: Affine(0, 0)}
    p = Profile(
        title="hand", backbone="hand", method="m", finetune="lora", global_batch=1, elem=2, parameters=100,
        trainable=0, linear_weights={"int8": (80, 80), "float8": (80, 80), "nf4": (80, 40)}, largest_block=10,
        vae_parameters=0, reward_parameters=50, forward=flat, decode=zero, grad_forwards=1, reward_inputs=1,
        checkpointed_plan=False, latent_per_sample=0, rollout_steps=10, linear_numel=80,
        largest_linear={"none": 20, "int8": 10, "float8": 10, "nf4": 6}, reward_linear=40, reward_largest_linear=5,
    )

    def recipe(quant: str = "none", offload: str = "none") -> Recipe:
        return Recipe(1, 1, 1, False, False, quant, offload=offload)

    peaks = {(q, o): memory(p, recipe(q, o)).peak for q in ("none", "float8", "nf4") for o in ("none", "reward", "all")}
    assert peaks == {("none", "none"): 310, ("none", "reward"): 240, ("none", "all"): 100,
                     ("float8", "none"): 230, ("float8", "reward"): 160, ("float8", "all"): 90,
                     ("nf4", "none"): 190, ("nf4", "reward"): 120, ("nf4", "all"): 86}
    assert memory(p, recipe(offload="base")).peak == 170
    assert step_cost(p, recipe()) == pytest.approx(24)
    assert step_cost(p, recipe(offload="all")) == pytest.approx(24 * SPEED["offload_base"] * SPEED["offload_reward"])
    # 320 B: everything fits; the fastest is no mode at all
    assert search(p, 320, 1).best == recipe()
    # 235 B: float8 (230 B, ×1.10) fits and is faster than streaming the base (170 B, ×2.0) or nf4 + reward (×1.365)
    assert search(p, 235, 1).best == recipe("float8")
    # 150 B: no quantization alone fits (nf4: 190 B); nf4 + streamed reward (120 B, 24 × 1.3 × 1.05 = 32.76) beats
    # streaming the base (none/all: 100 B, 24 × 2.0 × 1.05 = 50.4)
    best = search(p, 150, 1).best
    assert best == recipe("nf4", "reward") and step_cost(p, best) == pytest.approx(24 * 1.3 * SPEED["offload_reward"])
    # 100 B: only a streamed base fits (with or without quantization: 100, 90, 90, 86 B); the cheapest is unquantized
    assert search(p, 100, 1).best == recipe(offload="all")
    assert "offload=all" in " ".join(recipe(offload="all").overrides("lora"))
    # 85 B: nothing fits; the smallest streams both and stores the base in nf4
    plan = search(p, 85, 1)
    assert not plan.fits and plan.smallest == recipe("nf4", "all") and memory(p, plan.smallest).peak == 86


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["offload=disk"], "config.offload: got 'disk'; allowed: none, reward, base, all"),
        (["offload=base", "finetune=full"], "offload: 'base' streams the frozen base under a LoRA"),
        (["offload=all", "finetune=full"], "offload: 'all' streams the frozen base under a LoRA"),
    ],
)
def test_bad_offload_is_one_line(tmp_path: Path, capsys, monkeypatch, sets: list[str], message: str) -> None:
    from flowbp.cli import main

    monkeypatch.chdir(tmp_path)
    args = [a for s in sets for a in ("--set", s)]
    assert main(["train", "--output-dir", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_training_with_everything_offloaded_equals_resident_training(tiny_sd3_dir: Path, clip_dir: Path,
                                                                     tmp_path: Path) -> None:
    """`flowbp train` end to end (accelerate's device placement, the evaluations and sample grids run on the
    streamed models): one step with offload: all writes the same LoRA file, bit for bit, as offload: none."""
    from safetensors.torch import load_file

    from flowbp.cli import main

    sets = {
        "backbone": "sd3", "backbone_path": str(tiny_sd3_dir), "resolution": 32, "reward": "pickscore",
        "reward_paths": f"{{pickscore: {clip_dir}}}", "prompts": "[a red cube on a table, two dogs]", "steps": 1,
        "batch_size": 2, "num_inference_steps": 4, "eval_samples_per_prompt": 1, "eval_max_prompts": 2,
        "sample_every": 0, "checkpoint_every": 0, "progress": False, "learning_rate": 0.05, "guidance_scale": 3.5,
        "ema": False, "method": "flowbp-lagrange", "log_with": "none",
    }
    files = {}
    for mode in ("none", "all"):
        args = [a for k, v in {**sets, "offload": mode}.items() for a in ("--set", f"{k}={v}")]
        assert main(["train", "--output-dir", str(tmp_path / mode), *args]) == 0
        (lora,) = (tmp_path / mode / "lora").glob("*.safetensors")
        files[mode] = load_file(str(lora))
    assert files["none"].keys() == files["all"].keys()
    assert all(torch.equal(files["none"][k], files["all"][k]) for k in files["none"])
    summaries = [json.loads((tmp_path / m / "summary.json").read_text()) for m in ("none", "all")]
    assert summaries[0]["after"] == summaries[1]["after"]


def test_offloaded_base_never_goes_to_the_device_whole(tiny_sd3_dir: Path) -> None:
    """With ``offload: base`` the trainer loads the transformer on the CPU and only its resident rest moves to the
    device: the meta device stands in for the accelerator (a tensor moved there loses its data), so every streamed
    weight still holding CPU data proves it never went to the device."""
    from flowbp.backbones import backbone_from_config
    from flowbp.training.components import apply_speed_and_offload, make_trainable

    device = torch.device("meta")
    cfg = load_config(None, {"backbone": "sd3", "backbone_path": str(tiny_sd3_dir), "resolution": 32,
                             "finetune": "lora", "lora_rank": 4, "offload": "base"})
    bb = backbone_from_config(cfg, device)
    assert {p.device.type for p in bb.transformer.parameters()} == {"cpu"}  # not moved at load
    assert {p.device.type for p in bb.vae.parameters()} == {"meta"}  # the rest of the backbone was
    make_trainable(cfg, bb)
    apply_speed_and_offload(cfg, bb, load_reward("digit-contrast"), device)
    store = offload_store(bb.transformer)
    assert store and all(w.device.type == "cpu" for w in store)
    assert {p.device.type for p in bb.transformer.parameters()} == {"meta"}  # norms, biases, the LoRA
    resident = load_config(None, {**cfg.to_dict(), "offload": "none"})
    whole = backbone_from_config(resident, device)
    assert {p.device.type for p in whole.transformer.parameters()} == {"meta"}  # the control: moved at load
