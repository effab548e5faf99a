"""Every expected failure is one clear line and a non-zero exit, and nothing is lost or half-written.

docs/reliability.md lists these cases; keep the two in step (a test counts them).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from flowbp.cli import main
from flowbp.config import load_config
from flowbp.train import train

TINY = {
    "steps": 2,
    "batch_size": 2,
    "num_inference_steps": 4,
    "eval_samples_per_prompt": 2,
    "sample_every": 0,
    "checkpoint_every": 1,
    "progress": False,
}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        code = int(exc.code)
    return code, capsys.readouterr().err


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256: 'nothing lost' means this is unchanged."""
    if not root.exists():
        return {}
    files = (p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ------------------------------------------------------------------------------------- configs, prompts, models
def _write(tmp: Path, name: str, content: bytes | str) -> str:
    path = tmp / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def _bad_model_dir(tmp: Path, weights: bytes, config: str | None = None) -> str:
    from flowbp.backbones.digits import ASSETS_DIR, FLOW_CONFIG, FLOW_WEIGHTS

    d = tmp / "model"
    d.mkdir()
    (d / FLOW_WEIGHTS).write_bytes(weights)
    (d / FLOW_CONFIG).write_text(config if config is not None else (ASSETS_DIR / FLOW_CONFIG).read_text())
    return str(d)


def _truncated_model_dir(tmp: Path) -> str:
    from flowbp.backbones.digits import ASSETS_DIR, FLOW_WEIGHTS

    return _bad_model_dir(tmp, (ASSETS_DIR / FLOW_WEIGHTS).read_bytes()[:5000])


def _foreign_model_dir(tmp: Path) -> str:
    from flowbp.backbones.digits import ASSETS_DIR, FLOW_WEIGHTS

    return _bad_model_dir(tmp, (ASSETS_DIR / FLOW_WEIGHTS).read_bytes(), config="{not json")


TRAIN_CASES = {
    # name: (extra CLI args or a function of tmp_path returning them, expected message fragment)
    "unknown config key": (["--set", "lerning_rate=0.1"], "config: unknown key 'lerning_rate'"),
    "wrong type": (["--set", "steps=many"], "config.steps: expected an integer, got 'many'"),
    "negative learning rate": (["--set", "learning_rate=-0.001"], "learning_rate: must be > 0, got -0.001"),
    "config file missing": (["--config", "/nonexistent/cfg.yaml"], "config: file not found: /nonexistent/cfg.yaml"),
    "config not YAML": (lambda t: ["--config", _write(t, "c.yaml", "steps: [1, 2")], "is not valid YAML"),
    "config not a mapping": (lambda t: ["--config", _write(t, "c.yaml", "- steps\n")], "must hold a mapping"),
    "--set without =": (["--set", "steps"], "--set: expected key=value, got 'steps'"),
    "accumulation 0": (["--set", "gradient_accumulation_steps=0"], "gradient_accumulation_steps: must be >= 1"),
    "batch not divisible by accumulation": (
        ["--set", "batch_size=6", "--set", "gradient_accumulation_steps=4"],
        "batch_size: 6 is not divisible by gradient_accumulation_steps (4)",
    ),
    "unknown LR schedule": (["--set", "lr_scheduler=cosinus"], "lr_scheduler: unknown schedule 'cosinus'; allowed:"),
    "warm-up with constant LR": (["--set", "lr_warmup_steps=10"], "lr_warmup_steps: 10 has no effect"),
    "unknown tracker": (["--set", "log_with=neptune"], "log_with: unknown tracker 'neptune'"),
    "negative keep_last": (["--set", "checkpoint_keep_last=-1"], "checkpoint_keep_last: must be >= 0, got -1"),
    "max_consecutive_skips 0": (["--set", "max_consecutive_skips=0"], "max_consecutive_skips: must be >= 1"),
    "unknown method": (["--set", "method=sparse"], "method: unknown method 'sparse'"),
    "method override out of range": (
        ["--set", "method=flowbp-bridge", "--set", "method_args={alpha: 2}"],
        "method_args: alpha: must be in [0, 1], got 2",
    ),
    "unknown reward": (["--set", "reward=digit-beauty"], "reward: unknown reward(s) ['digit-beauty']"),
    "reward weights without a sign": (
        ["--set", "reward=digit-alignment 0.5*digit-contrast"],
        "reward: cannot parse reward spec",
    ),
    "prompts file missing": (["--set", "prompts_file=/nonexistent/p.txt"], "prompts_file: file or directory not found"),
    "prompts file empty": (lambda t: ["--set", f"prompts_file={_write(t, 'p.txt', chr(10) * 3)}"], "holds no prompts"),
    "prompts file not text": (
        lambda t: ["--set", f"prompts_file={_write(t, 'p.txt', bytes([0xFF, 0xFE, 0x00, 0x81]))}"],
        "prompts_file: cannot read",
    ),
    "prompts file is a directory": (
        lambda t: ["--set", f"prompts_file={t}"],
        "prompts_file: file or directory not found",
    ),
    "prompt the backbone cannot encode": (
        lambda t: ["--set", f"prompts_file={_write(t, 'p.txt', 'digit 3' + chr(10) + 'a cat' + chr(10))}"],
        "a cat",
    ),
    "model folder without weights": (["--set", "backbone_path=/"], "backbone_path: no digits flow model in /"),
    "model weights truncated": (
        lambda t: ["--set", f"backbone_path={_truncated_model_dir(t)}"],
        "backbone_path: cannot load",
    ),
    "model config corrupt": (
        lambda t: ["--set", f"backbone_path={_foreign_model_dir(t)}"],
        "backbone_path: cannot load",
    ),
    "unknown option": (["--steps", "3"], "unrecognized arguments: --steps 3"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_bad_train_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys, case: str) -> None:
    args, message = TRAIN_CASES[case]
    if callable(args):
        args = args(tmp_path)
    out = tmp_path / "never"
    before = snapshot(tmp_path)
    code, err = run_cli(["train", "--output-dir", str(out), *args], capsys)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists() and snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------- checkpoints and --resume
@pytest.fixture(scope="module")
def paused_run(tmp_path_factory) -> Path:
    """A run stopped after step 2 of 3 (checkpoints step-000002, step-000002): what --resume is given."""
    out = tmp_path_factory.mktemp("paused") / "run"
    assert train(load_config(None, {**TINY, "steps": 3, "output_dir": str(out)}), stop_after=2) is None
    return out


def _truncate(run: Path) -> None:
    f = run / "checkpoints/step-000002/trainable.safetensors"
    f.write_bytes(f.read_bytes()[:100])


def _flip_byte(run: Path) -> None:  # same size, different content: only the hash can tell
    f = run / "checkpoints/step-000002/state.json"
    data = bytearray(f.read_bytes())
    data[10] = ord("X") if data[10] != ord("X") else ord("Y")
    f.write_bytes(bytes(data))


def _edit_config(run: Path, **changes) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg.update(changes)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def _other_world_size(run: Path) -> None:
    """A consistent checkpoint (manifest updated) written by 2 processes, resumed by 1."""
    from flowbp.checkpoint import sha256_file

    ckpt = run / "checkpoints/step-000002"
    state = json.loads((ckpt / "state.json").read_text())
    state["world_size"] = 2
    (ckpt / "state.json").write_text(json.dumps(state, indent=1))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"bytes": (ckpt / "state.json").stat().st_size,
                                       "sha256": sha256_file(ckpt / "state.json")}
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1))


RESUME_CASES = {
    "checkpoint file truncated": (_truncate, [], "trainable.safetensors: truncated or altered"),
    "checkpoint file corrupt": (_flip_byte, [], "state.json: corrupt (sha256 does not match"),
    "checkpoint file missing": (
        lambda r: (r / "checkpoints/step-000002/optimizer.safetensors").unlink(),
        [],
        "file optimizer.safetensors is missing",
    ),
    "checkpoint manifest missing": (
        lambda r: (r / "checkpoints/step-000002/manifest.json").unlink(),
        [],
        "manifest.json is missing",
    ),
    "config changed since the checkpoint": (
        lambda r: _edit_config(r, learning_rate=0.01),
        [],
        "differs from the config of step-000002 (learning_rate: 0.001 -> 0.01); only steps may change",
    ),
    "steps lowered below the checkpoint": (
        lambda r: _edit_config(r, steps=1),
        [],
        "steps: 1 is below the checkpoint's step 2",
    ),
    "saved config corrupt": (
        lambda r: (r / "config.yaml").write_text("steps: [\n"),
        [],
        "is not valid YAML",
    ),
    "checkpoint from another number of processes": (
        _other_world_size,
        [],
        "was written by 2 processes but this launch has 1; relaunch with 2",
    ),
    "--resume with --set": (lambda r: None, ["--set", "steps=5"], "--resume: takes the run's saved config.yaml"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_bad_resume_is_one_line_and_loses_nothing(tmp_path: Path, paused_run: Path, capsys, case: str) -> None:
    damage, extra, message = RESUME_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(paused_run, run)
    damage(run)
    before = snapshot(run)
    code, err = run_cli(["train", "--resume", str(run), *extra], capsys)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert snapshot(run) == before  # the damaged checkpoint is kept for inspection, nothing else touched


def test_resume_refusals_for_non_runs_and_finished_runs(tmp_path: Path, capsys) -> None:
    code, err = run_cli(["train", "--resume", str(tmp_path / "nope")], capsys)
    assert code == 2 and "is not a run directory (no config.yaml)" in err and err.count("\n") == 1
    done = tmp_path / "done"
    done.mkdir()
    (done / "config.yaml").write_text("steps: 1\n")
    (done / "summary.json").write_text("{}\n")
    code, err = run_cli(["train", "--resume", str(done)], capsys)
    assert code == 2 and "has finished (summary.json exists)" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------- other commands
def _lora_junk(t: Path) -> list[str]:
    return ["--lora", _write(t, "junk.safetensors", b"not a safetensors file")]


def _lora_empty_dir(t: Path) -> list[str]:
    (t / "lora").mkdir()
    return ["--lora", str(t / "lora")]


OTHER_CASES = {
    "sample: LoRA folder without weights": (_lora_empty_dir, "--lora: ", "holds no .safetensors weights"),
    "sample: LoRA file not safetensors": (_lora_junk, "--lora: ", "cannot load"),
    "sample: zero samples": (lambda t: ["--samples", "0"], "--samples: must be >= 1, got 0", ""),
    "sample: bad integer": (lambda t: ["--steps", "ten"], "argument --steps: invalid int value: 'ten'", ""),
    "plan: zero steps": (None, "--steps: must be >= 1, got 0", ""),
    "unknown command": (None, "invalid choice: 'trian'", ""),
}


@pytest.mark.parametrize("case", list(OTHER_CASES))
def test_bad_input_of_other_commands_is_one_line(tmp_path: Path, capsys, case: str) -> None:
    make, message, detail = OTHER_CASES[case]
    if case.startswith("sample"):
        args = ["sample", "--out", str(tmp_path / "grid.png"), *make(tmp_path)]
    elif case.startswith("plan"):
        args = ["plan", "flowbp-sparse", "--steps", "0"]
    else:
        args = ["trian"]
    code, err = run_cli(args, capsys)
    assert code == 2 and message in err and detail in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "grid.png").exists()


def test_several_processes_need_an_output_dir(monkeypatch, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: each rank would stamp its own default dir
    code, err = run_cli(["train"], capsys)
    assert code == 2 and "--output-dir: required when launching several processes" in err and err.count("\n") == 1


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="learning_rate: must be > 0"):
        main(["--debug", "train", "--output-dir", str(tmp_path / "x"), "--set", "learning_rate=-1"])


def test_docs_reliability_page_lists_every_case() -> None:
    section = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    cases = [*TRAIN_CASES, *RESUME_CASES, "--resume of a directory that is not a run", "--resume of a finished run",
             "several processes without --output-dir", *OTHER_CASES]
    assert len(cases) == len(set(cases)) >= 25
    assert f"{len(cases)} bad inputs" in section
    for case in cases:
        assert f"- {case}" in section, case
    json.dumps(cases)
