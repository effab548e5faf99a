"""`flowbp export`: a finished run as a Hub folder; the kohya/ComfyUI layout read back by diffusers' own converters.

References: diffusers' kohya readers (``_convert_kohya_flux_lora_to_diffusers`` for FLUX.1,
``_convert_kohya_flux2_lora_to_diffusers`` for FLUX.2, which ``Flux2KleinPipeline.load_lora_weights`` runs)
must give back the same weight changes ΔW = (α/r)·B·A per module; the card's numbers are summary.json's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowbp.cli import main
from flowbp.config import load_config, save_config
from flowbp.lora_formats import to_kohya

R = 32


def _delta(state: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """module -> ΔW = scale · B·A from diffusers-layout keys (transformer.<m>.lora_A/B.weight)."""
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            b = state[key.replace(".lora_A.", ".lora_B.")]
            out[module] = scale * b.double() @ a.double()
    return out


def _random_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module, (out_f, in_f) in shapes.items():
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen)
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen)
    return state


def test_flux1_kohya_layout_reads_back_through_diffusers_converter() -> None:
    """FLUX.1 at its real widths (the converter hard-codes 3072 / 12288), blocks 0 only, alpha ≠ rank."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    d, mlp = 3072, 12288
    shapes = {}
    for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_add_out", "ff.net.2", "ff_context.net.2"):
        shapes[f"transformer_blocks.0.{m}"] = (d, d) if "net.2" not in m else (d, mlp)
    shapes["transformer_blocks.0.ff.net.0.proj"] = (mlp, d)
    shapes["transformer_blocks.0.ff_context.net.0.proj"] = (mlp, d)
    for m in ("attn.to_q", "attn.to_k", "attn.to_v"):  # flowbp's default targets: no proj_mlp
        shapes[f"single_transformer_blocks.1.{m}"] = (d, d)
    rank, alpha = 2, 8.0
    state = _random_lora(shapes, rank)
    kohya = to_kohya("flux1", state, alpha)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert kohya["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (3 * d + mlp, 4 * rank)
    back = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    got, want = _delta(back), _delta(state, alpha / rank)
    assert set(want) <= set(got)
    for module, dw in want.items():
        torch.testing.assert_close(got[module], dw, rtol=1e-6, atol=1e-6, msg=module)
    # the untrained proj_mlp of the fused single-block linear1 comes back as an exact zero change
    assert set(got) - set(want) == {"single_transformer_blocks.1.proj_mlp"}
    assert not got["single_transformer_blocks.1.proj_mlp"].any()


def _fake_run(run: Path, backbone: str, folder: Path | None, lora_state_save) -> None:
    """A finished run's files (config, summary, samples) around a LoRA saved by the backbone itself."""
    from PIL import Image

    run.mkdir(parents=True)
    overrides = {"backbone": backbone, "resolution": R if backbone != "digits" else None, "lora_rank": 4,
                 "lora_alpha": 2.0, "steps": 3, "prompts": ["x"], "method": "flowbp-bridge"}
    if folder is not None:
        overrides["backbone_path"] = str(folder)
    save_config(load_config(None, overrides), run / "config.yaml")
    lora_state_save(run / "lora")
    summary = {
        "method": "flowbp-bridge", "backbone": backbone, "steps": 3, "eval_samples": 8,
        "before": {"reward": 0.25}, "after": {"reward": 0.3125},
        "reward_improvement": {"mean": 0.0625, "ci95_low": 1.087e-05, "ci95_high": 0.125, "n": 8},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "samples").mkdir()
    for name in ("step-000000.png", "final.png"):
        Image.new("RGB", (8, 8), "gray").save(run / "samples" / name)


def test_export_flux2_klein_comfyui_loads_back_into_the_same_weights(tiny_flux2_klein_dir: Path,
                                                                       tmp_path: Path, capsys) -> None:
    import diffusers
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux2_lora_to_diffusers

    from flowbp.backbones import load_backbone

    bb = load_backbone("flux2-klein", path=tiny_flux2_klein_dir, resolution=R)
    bb.add_lora(4, 2.0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in bb.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    run = tmp_path / "run"
    _fake_run(run, "flux2-klein", tiny_flux2_klein_dir, bb.save_lora)
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--format", "comfyui", "--name", "klein test"]) == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["README.md", "config.yaml", "klein_test_comfyui.safetensors", "pytorch_lora_weights.safetensors",
                     "samples/after.png", "samples/before.png", "summary.json"]
    original = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    kohya = load_file(str(out / "klein_test_comfyui.safetensors"))
    assert all(k.startswith("lora_unet_") for k in kohya)
    back = _convert_kohya_flux2_lora_to_diffusers(dict(kohya))
    got, want = _delta(back), _delta(original, 2.0 / 4)
    assert set(got) == set(want)
    for module, dw in want.items():
        torch.testing.assert_close(got[module], dw, rtol=1e-6, atol=1e-6, msg=module)
    # and the pipeline's own loader (which detects the kohya layout) changes the transformer as flowbp's LoRA does
    pipe = diffusers.Flux2KleinPipeline.from_pretrained(str(tiny_flux2_klein_dir))
    pipe.load_lora_weights(str(out), weight_name="klein_test_comfyui.safetensors")
    pipe.fuse_lora()
    base = diffusers.Flux2Transformer2DModel.from_pretrained(str(tiny_flux2_klein_dir), subfolder="transformer")
    fused, base_w = pipe.transformer.state_dict(), base.state_dict()
    for module, dw in want.items():
        key = f"{module}.weight"
        fused_key = key if key in fused else f"{module}.base_layer.weight"
        torch.testing.assert_close(fused[fused_key].double() - base_w[key].double(), dw, rtol=1e-4, atol=1e-5)
    # the model card: base model, method, reward, steps, the CI as the one formatter prints it, the grids
    card = (out / "README.md").read_text()
    for text in ("flowbp-bridge", "digit-alignment+5*digit-contrast", "| reward | 0.25 | 0.3125 | "
                 "+0.0625 [+1.087e-05, +0.125] |", "![before training](samples/before.png)",
                 "Flux2KleinPipeline", "klein_test_comfyui.safetensors"):
        assert text in card, text
    assert str(tiny_flux2_klein_dir) in card


def test_export_refusals_are_one_line_and_write_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    from flowbp.backbones import load_backbone

    bb = load_backbone("digits")
    bb.add_lora(4, 2.0)
    run = tmp_path / "run"
    _fake_run(run, "digits", None, bb.save_lora)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((run / "config.yaml").read_text())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cases = [
        ([str(run), "--out", str(busy)], "--out: ", "exists and is not empty"),
        ([str(unfinished), "--out", str(tmp_path / "o1")], "has not finished (no summary.json)", ""),
        ([str(tmp_path / "nope"), "--out", str(tmp_path / "o2")], "is not a run directory", ""),
        ([str(run), "--out", str(tmp_path / "o3"), "--format", "comfyui"], "--format comfyui: no ComfyUI", "digits"),
        ([str(run), "--out", str(tmp_path / "o4"), "--push", "me/model"], "--push: not logged in", "hf auth login"),
        ([str(run), "--out", str(tmp_path / "o5"), "--push", "not a repo"], "--push: ", "not a Hub repository id"),
    ]
    for args, message, detail in cases:
        capsys.readouterr()
        assert main(["export", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and detail in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "hf-home", "run", "unfinished"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["busy", "run", "unfinished"]
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["export", str(run), "--out", str(tmp_path / "o6"), "--push", "me/model"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err and not (tmp_path / "o6").exists()
    # logged in but the Hub is unreachable (this machine is offline): the export is complete, the push one line
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "o7"), "--push", "me/model"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("flowbp export: error")]
    assert len(lines) == 1 and "--push: upload to me/model failed" in lines[0], err
    for name in ("README.md", "pytorch_lora_weights.safetensors", "config.yaml"):
        assert (tmp_path / "o7" / name).is_file(), name
    # the digits LoRA exported loads back through `flowbp sample --lora`
    assert main(["sample", "--lora", str(tmp_path / "o7"), "--prompt", "digit 1", "--images-per-prompt", "1",
                 "--steps", "2", "--no-progress", "--out", str(tmp_path / "s")]) == 0


def test_sd3_comfyui_file_keeps_the_diffusers_keys(tiny_sd3_dir: Path, tmp_path: Path) -> None:
    """ComfyUI reads SD3 LoRAs in diffusers' layout (comfy/lora.py); diffusers has no SD3 kohya reader."""
    from flowbp.backbones import load_backbone

    bb = load_backbone("sd3", path=tiny_sd3_dir, resolution=R)
    bb.add_lora(4, 2.0)
    run = tmp_path / "run"
    _fake_run(run, "sd3", tiny_sd3_dir, bb.save_lora)
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--format", "comfyui"]) == 0
    a = load_file(str(out / "pytorch_lora_weights.safetensors"))
    b = load_file(str(out / "export_comfyui.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(re.fullmatch(r"transformer\..+\.lora_[AB]\.weight", k) for k in a)


@pytest.mark.parametrize("bad", ["transformer.x.lora_A.weight_only"])
def test_unknown_keys_are_named(bad: str) -> None:
    with pytest.raises(ValueError, match="is not transformer"):
        to_kohya("flux1", {bad: torch.zeros(1)}, 1.0)
