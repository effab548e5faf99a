"""`flowbp sample` on every registered backbone, with base, LoRA, full weights and a run directory.

References: diffusers' own StableDiffusion3Pipeline from the same latents (the PNGs equal its output to one
8-bit level); `flowbp eval` (the same settings give the same pixels, and it scores the folder as written);
weights perturbed in memory (a saved LoRA / full transformer loaded by `sample` reproduces them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowbp.cli import main

R = 32


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=int)


def _sample(*args: str) -> int:
    return main(["sample", "--no-progress", *args])


def test_digits_sample_writes_named_pngs_a_labelled_grid_and_eval_scores_the_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "s"
    assert _sample("--prompt", "digit 3", "--prompt", "digit 7", "--images-per-prompt", "3", "--steps", "6",
                   "--seed", "5", "--reward", "digit-alignment", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "digit-alignment" in printed and "95% CI over 2 prompts" in printed
    names = sorted(p.name for p in (out / "images").glob("p*_s*.png"))
    assert names == [f"p{i:04d}_s{s}.png" for i in range(2) for s in (5, 6, 7)]
    assert (out / "prompts.txt").read_text() == "digit 3\ndigit 7\n"
    settings = json.loads((out / "sample.json").read_text())
    assert settings["guidance"] == "2 (classifier-free guidance; the digits default)"
    grid = Image.open(out / "grid.png")
    # labelled: wider than the three 128-px cells alone (the prompt column), taller than two rows (caption)
    assert grid.width > 3 * 128 + 200 and grid.height > 2 * 128 + 30
    # `flowbp eval` of the same settings samples the same pixels, and scores this folder as it is
    ev_out = tmp_path / "ev"
    common = ["eval", "--prompts", str(out / "prompts.txt"), "--metrics", "digit-alignment", "--no-progress"]
    assert main([*common, "--backbone", "digits", "--steps", "6", "--seed", "5", "--images-per-prompt", "3",
                 "--out", str(ev_out)]) == 0
    for name in names:
        assert np.array_equal(_png(out / "images" / name), _png(ev_out / "images" / name)), name
    assert main([*common, "--images", str(out / "images"), "--out", str(tmp_path / "folder")]) == 0
    # refuses to overwrite; --overwrite replaces
    capsys.readouterr()
    assert _sample("--prompt", "digit 1", "--steps", "2", "--out", str(out)) == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err
    assert _sample("--prompt", "digit 1", "--steps", "2", "--images-per-prompt", "1", "--out", str(out),
                   "--overwrite") == 0
    assert sorted(p.name for p in (out / "images").glob("p*.png")) == ["p0000_s0.png"]


def test_sd3_sample_equals_the_diffusers_pipeline_at_a_chosen_resolution(tiny_sd3_dir: Path, tmp_path: Path) -> None:
    """`--resolution 32` on a tiny model (512, the default, does not fit its positional table)."""
    import diffusers

    from flowbp.backbones import load_backbone

    out = tmp_path / "s"
    assert _sample("--backbone", "sd3", "--backbone-path", str(tiny_sd3_dir), "--resolution", str(R), "--steps", "3",
                   "--guidance", "2.5", "--prompt", "a red cube", "--images-per-prompt", "2", "--seed", "11",
                   "--dtype", "float32", "--device", "cpu", "--out", str(out)) == 0
    bb = load_backbone("sd3", path=tiny_sd3_dir, resolution=R)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir))
    pipe.set_progress_bar_config(disable=True)
    for seed in (11, 12):
        x0 = bb.initial_noise(1, torch.Generator().manual_seed(seed))
        ref = pipe(prompt=["a red cube"], latents=x0, sigmas=bb.pipeline_sigmas(3), num_inference_steps=3,
                   height=R, width=R, guidance_scale=2.5, output_type="pt").images
        ref8 = (ref[0].clamp(0, 1) * 255).round().permute(1, 2, 0).numpy().astype(int)
        got = _png(out / "images" / f"p0000_s{seed}.png")
        assert got.shape == (R, R, 3)
        assert np.abs(got - ref8).max() <= 1, seed


@pytest.mark.parametrize("family", ["flux1", "flux2-klein"])
def test_every_registered_backbone_samples(family: str, request, tmp_path: Path) -> None:
    folder = request.getfixturevalue({"flux1": "tiny_flux1_dir", "flux2-klein": "tiny_flux2_klein_dir"}[family])
    out = tmp_path / family
    assert _sample("--backbone", family, "--backbone-path", str(folder), "--resolution", str(R), "--steps", "2",
                   "--prompt", "two dogs", "--images-per-prompt", "2", "--out", str(out)) == 0
    a, b = _png(out / "images" / "p0000_s0.png"), _png(out / "images" / "p0000_s1.png")
    assert a.shape == (R, R, 3) and not np.array_equal(a, b)  # two seeds, two images


def _perturbed_lora(folder: Path, target: Path):
    """A saved LoRA with non-zero B (the fresh adapter is the identity), and the backbone holding it."""
    from flowbp.backbones import load_backbone

    bb = load_backbone("sd3", path=folder, resolution=R)
    bb.add_lora(4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in bb.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    bb.save_lora(target)
    return bb


def test_lora_full_weights_and_run_directory(tiny_sd3_dir: Path, tmp_path: Path, capsys) -> None:
    from flowbp.backbones import load_backbone
    from flowbp.config import load_config, save_config
    from flowbp.evaluate import generate, plan_keys

    common = ["--resolution", str(R), "--steps", "2", "--prompt", "a red cube", "--images-per-prompt", "1"]
    base = ["--backbone", "sd3", "--backbone-path", str(tiny_sd3_dir), *common]
    # a LoRA: its samples equal the in-memory adapted model's, and differ from the base model's
    run = tmp_path / "run"
    tuned = _perturbed_lora(tiny_sd3_dir, run / "lora")
    expected = generate(tuned, ["a red cube"], plan_keys(1, 1, 0), 2, None)[0].permute(1, 2, 0).numpy()
    assert _sample(*base, "--out", str(tmp_path / "base")) == 0
    assert _sample(*base, "--lora", str(run / "lora"), "--out", str(tmp_path / "lora")) == 0
    lora_png = _png(tmp_path / "lora" / "images" / "p0000_s0.png")
    assert np.abs(lora_png - expected.astype(int)).max() <= 1
    assert not np.array_equal(lora_png, _png(tmp_path / "base" / "images" / "p0000_s0.png"))
    # a run directory: backbone, path, resolution, steps from its config.yaml; weights from RUN/lora
    config = load_config(None, {"backbone": "sd3", "backbone_path": str(tiny_sd3_dir), "resolution": R,
                                "num_inference_steps": 2, "prompts": ["x"]})
    save_config(config, run / "config.yaml")
    assert _sample("--run", str(run), "--prompt", "a red cube", "--images-per-prompt", "1",
                   "--out", str(tmp_path / "from-run")) == 0
    assert np.array_equal(_png(tmp_path / "from-run" / "images" / "p0000_s0.png"), lora_png)
    # full weights (RUN/transformer from save_full): equal to the in-memory perturbed transformer's samples
    full = load_backbone("sd3", path=tiny_sd3_dir, resolution=R)
    with torch.no_grad():
        for p in full.transformer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    full.save_full(tmp_path / "fullrun")
    expected = generate(full, ["a red cube"], plan_keys(1, 1, 0), 2, None)[0].permute(1, 2, 0).numpy()
    assert _sample(*base, "--transformer", str(tmp_path / "fullrun" / "transformer"),
                   "--out", str(tmp_path / "full")) == 0
    assert np.abs(_png(tmp_path / "full" / "images" / "p0000_s0.png") - expected.astype(int)).max() <= 1
    # bad inputs: one line naming the option, nothing written
    capsys.readouterr()
    cases = [
        ([*base[:-8], "--resolution", "30", *common[2:]], "--resolution: 30 is not divisible by 4"),
        ([*base, "--lora", str(tmp_path / "nope")], "--lora: not found"),
        (["--run", str(tmp_path)], "is not a run directory (no config.yaml)"),
        (["--run", str(run), "--backbone", "flux1"], "--backbone: 'flux1' differs from the run's backbone 'sd3'"),
        ([*base, "--transformer", str(run / "lora")], "--transformer: "),
    ]
    for args, message in cases:
        assert _sample(*args, "--out", str(tmp_path / "bad")) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()


def test_one_flag_name_across_commands_and_deprecated_aliases(tmp_path: Path, capsys) -> None:
    from flowbp.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("train", "sample", "eval", "plan"):
        options = {o for a in sub[command]._actions for o in a.option_strings if a.help != "==SUPPRESS=="}
        assert {"--backbone", "--backbone-path"} <= options, command
    for command in ("sample", "eval"):
        options = {o for a in sub[command]._actions for o in a.option_strings}
        assert "--lora" in options
    # the old names still work, with a one-line notice
    assert main(["sample", "--samples", "1", "--steps", "2", "--prompt", "digit 1", "--no-progress",
                 "--out", str(tmp_path / "a")]) == 0
    assert "--samples is deprecated; use --images-per-prompt" in capsys.readouterr().err
    assert len(list((tmp_path / "a" / "images").glob("p*.png"))) == 1
    prompts = tmp_path / "p.txt"
    prompts.write_text("digit 2\n")
    shipped = Path(__file__).resolve().parents[1] / "flowbp" / "assets"  # the digits weights folder
    assert main(["eval", "--backbone", "digits", "--model", str(shipped), "--prompts", str(prompts),
                 "--metrics", "digit-alignment", "--steps", "2", "--no-progress", "--out", str(tmp_path / "e")]) == 0
    assert "--model is deprecated; use --backbone-path" in capsys.readouterr().err
    # train takes --backbone like the others (and says so when it contradicts --set)
    assert main(["train", "--backbone", "sd3", "--set", "backbone=digits", "--output-dir", str(tmp_path / "t")]) == 2
    assert "--backbone: 'sd3' contradicts --set backbone='digits'" in capsys.readouterr().err
