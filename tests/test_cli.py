"""CLI commands other than plan/train: sample, pretrain wiring, help."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from flowbp.cli import build_parser, main


def test_help_lists_every_command() -> None:
    text = build_parser().format_help()
    for command in ("plan", "methods", "pretrain", "train", "sample", "bench"):
        assert command in text


def test_pretrain_cli_default_steps_match_the_library() -> None:
    from flowbp.commands.pretrain import DEFAULT_FLOW_STEPS
    from flowbp.testbed.pretrain import DEFAULT_FLOW_STEPS as library_steps

    assert DEFAULT_FLOW_STEPS == library_steps


def test_sample_writes_a_grid_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "samples"
    args = ["sample", "--samples", "2", "--steps", "8", "--out", str(out), "--reward", "digit-alignment"]
    assert main([*args, "--prompt", "digit 3", "--prompt", "digit 7"]) == 0
    printed = capsys.readouterr().out
    assert "digit-alignment" in printed and "95% CI over 2 prompts" in printed
    assert len(list((out / "images").glob("p*_s*.png"))) == 4
    grid = Image.open(out / "grid.png")
    assert grid.width > 2 * 128 and grid.height > 2 * 128  # two rows, two seeds, labels
    assert main([*args]) == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err
    assert main(["sample", "--lora", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "--lora: not found" in capsys.readouterr().err
    assert main(["sample", "--prompt", "a cat", "--out", str(tmp_path / "y")]) == 2
    assert "a cat" in capsys.readouterr().err
