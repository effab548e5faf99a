"""Two real CPU processes (torchrun, gloo, DDP through accelerate) of ``python -m flowbp train``.

Checks: the same final weights as one process with the same global batch, identical plans on both
ranks, and a preempted 2-process run that resumes every rank's own random streams.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowbp.checkpoint import list_checkpoints
from flowbp.config import load_config
from flowbp.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "steps": 3,
    "batch_size": 4,
    "num_inference_steps": 5,
    "eval_samples_per_prompt": 2,
    "sample_every": 0,
    "checkpoint_every": 0,
    "progress": False,
}


def torchrun(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "flowbp"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*cmd, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=400)


def set_args(cfg: dict) -> list[str]:
    return [a for k, v in cfg.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = list_checkpoints(run)[-1]
    out = {f"ckpt/{k}": v for k, v in load_file(str(ckpt / "trainable.safetensors")).items()}
    out.update({f"lora/{k}": v for k, v in load_file(str(run / "lora/pytorch_lora_weights.safetensors")).items()})
    return out


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    two, one = tmp_path / "two", tmp_path / "one"
    proc = torchrun(["train", "--output-dir", str(two), *set_args(TINY)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("reward improvement") == 1  # only rank 0 reports
    train(load_config(None, {**TINY, "output_dir": str(one)}))
    summary = json.loads((two / "summary.json").read_text())
    assert summary["num_processes"] == 2
    h2, h1 = (json.loads((r / "history.json").read_text()) for r in (two, one))
    # both ranks drew the same plan at every step, and the same as the single process
    assert all(len(h["plan_digests"]) == 2 and len(set(h["plan_digests"])) == 1 for h in h2)
    assert [h["plan_digests"][0] for h in h2] == [h["plan_digests"][0] for h in h1]
    for a, b in zip(h2, h1, strict=True):  # rewards gathered from both ranks = the whole global batch
        assert a["reward"] == b["reward"] or abs(a["reward"] - b["reward"]) < 1e-6
    w2, w1 = final_weights(two), final_weights(one)
    assert w2.keys() == w1.keys()
    # float tolerance: the all-reduce sums two halves; AdamW turns rounding in a near-zero gradient
    # component into a fraction of one lr = 1e-3 step (1.2e-6 measured)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-5, msg=k)
    assert max(float(v.abs().max()) for k, v in w1.items() if "lora_B" in k) > 1e-3  # it did train
    ckpt = list_checkpoints(two)[-1]
    ranks = [load_file(str(ckpt / f"rng-rank{r}.safetensors")) for r in (0, 1)]
    assert torch.equal(ranks[0]["plan"], ranks[1]["plan"]) and torch.equal(ranks[0]["data"], ranks[1]["data"])
    assert not torch.equal(ranks[0]["renoise"], ranks[1]["renoise"])  # each rank's own stream


@pytest.mark.slow
def test_preempted_two_process_run_resumes_every_ranks_own_streams(tmp_path: Path) -> None:
    """DRaFT-LV draws its renoised inputs from each rank's own stream: a resume that restored the
    wrong stream to a rank (or rank 0's to both) would change the gradients and the final weights."""
    cfg = {**TINY, "steps": 2, "method": "draft-lv"}
    full, split = tmp_path / "full", tmp_path / "split"
    proc = torchrun(["train", "--output-dir", str(full), *set_args(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # SIGTERM reaches rank 0 only; rank 1 learns of it through the all-reduced stop flag
    proc = torchrun(["train", "--output-dir", str(split), *set_args(cfg)], env={"FLOWBP_TEST_SIGTERM_AT": "1"})
    assert "stopped by SIGTERM after step 1 of 2" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode != 0 and [p.name for p in list_checkpoints(split)] == ["step-000001"]
    rng = [load_file(str(list_checkpoints(split)[0] / f"rng-rank{r}.safetensors")) for r in (0, 1)]
    assert not torch.equal(rng[0]["renoise"], rng[1]["renoise"])
    proc = torchrun(["train", "--resume", str(split)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = final_weights(full), final_weights(split)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for r in (0, 1):  # every rank's streams end where the uninterrupted run's do
        ra = load_file(str(list_checkpoints(full)[-1] / f"rng-rank{r}.safetensors"))
        rb = load_file(str(list_checkpoints(split)[-1] / f"rng-rank{r}.safetensors"))
        assert all(torch.equal(ra[k], rb[k]) for k in ra)


def _fsdp2_case(finetune: str, request: pytest.FixtureRequest) -> tuple[dict, tuple[str, ...]]:
    """The config of one FSDP2 case and the files that must equal one process's."""
    cfg = {**TINY, "steps": 2, "checkpoint_every": 1}
    ckpt = ("checkpoints/step-000002/ema.safetensors", "checkpoints/step-000002/optimizer.safetensors")
    if finetune == "full":
        return {**cfg, "finetune": "full", "learning_rate": 0.0001}, ("transformer.safetensors", *ckpt)
    # LoRA on the tiny SD3 pipeline (its file is then loaded by diffusers' own pipeline), EMA on
    sd3 = {"backbone": "sd3", "backbone_path": str(request.getfixturevalue("tiny_sd3_dir")), "resolution": 32,
           "reward": "digit-contrast", "prompts": ["a red cube on a table", "two dogs"], "guidance_scale": 3.5,
           "eval_max_prompts": 2, "eval_samples_per_prompt": 1, "ema": True}
    files = ("lora/pytorch_lora_weights.safetensors", "checkpoints/step-000002/trainable.safetensors", *ckpt)
    return {**cfg, **sd3}, files


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_fsdp2_preempted_and_resumed_equals_one_process(
    tmp_path: Path, finetune: str, request: pytest.FixtureRequest
) -> None:
    """accelerate's FSDP2 path (forced onto CPU/gloo by a test hook: accelerate itself only enables FSDP
    on GPUs): sharded DTensor parameters (for LoRA: the frozen base and the adapter, sharded per block),
    gathered checkpoints, re-sharding on resume, whole-tensor weights files — equal to one process
    training the same global batch, step by step."""
    cfg, files = _fsdp2_case(finetune, request)
    env = {"FLOWBP_TEST_FSDP2_ON_CPU": "JointTransformerBlock"}
    two, one = tmp_path / "two", tmp_path / "one"
    proc = torchrun(["train", "--output-dir", str(two), *set_args(cfg)], env={**env, "FLOWBP_TEST_SIGTERM_AT": "1"})
    assert "stopped by SIGTERM after step 1 of 2" in proc.stderr, proc.stderr[-3000:]
    proc = torchrun(["train", "--resume", str(two)], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(load_config(None, {**cfg, "output_dir": str(one)}))
    for rel in files:
        a, b = load_file(str(two / rel)), load_file(str(one / rel))
        assert a.keys() == b.keys() and len(a) > 20, rel
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=f"{rel}:{k}")
    h2, h1 = (json.loads((r / "history.json").read_text()) for r in (two, one))
    assert [h["step"] for h in h2] == [h["step"] for h in h1] == [1, 2]
    for a, b in zip(h2, h1, strict=True):  # the global batch's rewards and loss, per step
        assert a["reward"] == pytest.approx(b["reward"], rel=1e-5, abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    if finetune == "lora":
        _lora_files_load_into_the_pipeline_and_agree(Path(cfg["backbone_path"]), two, one)


def _lora_files_load_into_the_pipeline_and_agree(directory: Path, two: Path, one: Path) -> None:
    """The LoRA written by the 2-process FSDP2 run loads with diffusers' ``load_lora_weights`` into a fresh
    pipeline and samples what the 1-process LoRA samples (and not what the base samples)."""
    from diffusers import StableDiffusion3Pipeline

    def images(run: Path | None) -> torch.Tensor:
        pipe = StableDiffusion3Pipeline.from_pretrained(str(directory), local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        if run is not None:
            pipe.load_lora_weights(str(run / "lora"))
        latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
        return pipe(prompt=["a red cube on a table", "two dogs"], latents=latents, num_inference_steps=4,
                    height=32, width=32, guidance_scale=3.5, output_type="pt").images

    ours, theirs, base = images(two), images(one), images(None)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - base).abs().max().item() > 1e-4  # the adapter trained: not a no-op


@pytest.mark.parametrize("mode", ["int8", "float8"])
def test_lora_on_a_base_fsdp2_cannot_shard_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """torchao's int8 / float8 weight-only tensors cannot be sharded by fully_shard (measured: aten.split is
    missing): under the FSDP2 preset such a LoRA run stops at set-up with one line, and writes nothing."""
    import types

    import flowbp.train as train_module

    fsdp = types.SimpleNamespace(distributed_type=types.SimpleNamespace(value="FSDP"), num_processes=2)
    monkeypatch.setattr(train_module, "make_accelerator", lambda config, run_dir, **_: fsdp)
    run = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        train(load_config(None, {**TINY, "base_quantization": mode, "output_dir": str(run)}))
    assert str(err.value) == (
        f"base_quantization: {mode!r} cannot be sharded by FSDP2 (torchao's quantized tensor lacks the ops "
        "fully_shard needs); allowed under FSDP2: none, nf4 (or launch data-parallel with the multi-gpu preset)"
    )
    assert not run.exists()


def test_accelerate_presets_parse_and_document_their_launch_command(capsys) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    from flowbp.cli import main
    from flowbp.commands.accelerate_config import presets

    expected = {"single-gpu": "NO", "multi-gpu": "MULTI_GPU", "fsdp2": "FSDP", "multi-node": "MULTI_GPU"}
    found = presets()
    assert set(found) == set(expected)
    for name, path in found.items():
        cfg = load_config_from_file(str(path))
        assert cfg.distributed_type.value == expected[name]
        assert f'--config_file "$(flowbp accelerate-config {name})"' in path.read_text()
        assert main(["accelerate-config", name]) == 0
        assert capsys.readouterr().out.strip() == str(path)
    fsdp = load_config_from_file(str(found["fsdp2"])).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert load_config_from_file(str(found["multi-node"])).num_machines == 2
