"""A quick command line: help and typo errors import no torch, diffusers or transformers, and every
option explains itself. Each check runs a fresh interpreter, because the pytest process has imported
torch long ago; the checks are on which modules were imported, not on timings (those are measured by
benchmarks/cli_startup.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "numpy")

PROBE = f"""
import contextlib, io, json, sys
from flowbp.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
heavy = sorted(m for m in {HEAVY} if m in sys.modules)
print(json.dumps({{"code": code, "out": out.getvalue(), "err": err.getvalue(), "heavy": heavy}}))
"""


def probe(args: list[str], cwd: Path) -> dict:
    """Run ``flowbp ARGS`` in a fresh interpreter; its exit code, output and the heavy modules it imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_imports_nothing_heavy(tmp_path: Path) -> None:
    result = probe(["--help"], tmp_path)
    assert result["code"] == 0 and "train" in result["out"]
    assert result["heavy"] == []


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("method=flowbp-lagrang", "method: unknown method 'flowbp-lagrang'; known methods: "),
        ("reward=hpsv2+0.5*pickscor", "reward: unknown reward(s) ['pickscor']; known rewards: "),
        ("backbone=sd35", "backbone: unknown backbone 'sd35'; known: "),
        ("lerning_rate=1e-4", "config: unknown key 'lerning_rate'"),
    ],
)
def test_typos_fail_before_any_heavy_import(tmp_path: Path, setting: str, message: str) -> None:
    result = probe(["train", "--set", setting], tmp_path)
    assert result["code"] == 2
    assert result["err"].count("\n") == 1 and message in result["err"], result["err"]
    assert "run directory" not in result["out"]
    assert result["heavy"] == []
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_train_help_describes_the_command_and_lists_every_preset(tmp_path: Path) -> None:
    result = probe(["train", "--help"], tmp_path)
    text = " ".join(result["out"].split())
    assert result["code"] == 0 and result["heavy"] == []
    assert "Fine-tune" in text  # a description, not only the usage line
    presets = sorted(p.stem for p in (ROOT / "flowbp" / "configs").glob("*.yaml"))
    assert len(presets) >= 29
    for name in presets:
        assert name in text, name


def _subparser(name: str):
    from flowbp.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[name]


@pytest.mark.parametrize("command", ["sample", "methods", "train", "eval", "plan"])
def test_every_option_has_help(command: str) -> None:
    parser = _subparser(command)
    assert parser.description, f"flowbp {command} --help has no description"
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"flowbp {command} {action.option_strings[0]} has no help text"


def test_eval_help_prints_percent_signs_once() -> None:
    text = _subparser("eval").format_help()
    assert "%%" not in text and "95% CI" in " ".join(text.split())
