"""``flowbp eval --suite paper`` on tiny models: every metric checked before sampling, unavailable ones skipped
with one line each, the table in the paper's column order, paired differences against --baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from judge_server import FakeJudgeServer

import flowbp.evaluate as ev
from flowbp.cli import main
from flowbp.rewards import REWARDS

MODEL = "UnifiedReward-test"
PROMPTS = ["a red car", "say:Final Score: 4", "say:Final Score: 2.5 is fair"]


def test_suite_paper_on_tiny_models(tiny_sd3_dir, tmp_path: Path, monkeypatch, capsys) -> None:
    from rewards_tiny import clip_folder

    monkeypatch.setenv("FLOWBP_REWARD_DIR", str(tmp_path / "no-weights"))  # hpsv2, imagereward: nowhere
    monkeypatch.delenv("FLOWBP_JUDGE_URL", raising=False)
    clip_dir = clip_folder(tmp_path / "clip")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    order: list[str] = []
    real_generate = ev.generate

    def generate(*args, **kwargs):  # what was printed before the first image is sampled
        order.append(capsys.readouterr().out)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(ev, "generate", generate)
    with FakeJudgeServer(MODEL) as server:
        common = ["eval", "--suite", "paper", "--backbone", "sd3", "--backbone-path", str(tiny_sd3_dir), "--prompts",
                  str(prompts), "--resolution", "32", "--reward-path", f"pickscore={clip_dir}",
                  "--judge-url", server.url, "--judge-model", MODEL, "--no-progress"]
        base, tuned = tmp_path / "base", tmp_path / "tuned"
        assert main([*common, "--steps", "2", "--out", str(base)]) == 0
        assert main([*common, "--steps", "3", "--out", str(tuned), "--baseline", str(base)]) == 0
        printed = capsys.readouterr().out

    skipped = ["hpsv2", "imagereward", *(["hpsv3"] if "hpsv3" in REWARDS else [])]
    before_sampling = order[0]
    for metric in skipped:  # one line each, before sampling
        lines = [line for line in before_sampling.splitlines() if line.startswith(f"skipping {metric}:")]
        assert len(lines) == 1, before_sampling
    assert "skipping pickscore" not in before_sampling and "skipping unifiedreward" not in before_sampling

    summary = json.loads((tuned / "summary.json").read_text())
    assert summary["suite"] == "paper" and sorted(summary["skipped_metrics"]) == sorted(skipped)
    assert summary["seed"] == 42 and summary["images_per_prompt"] == 1 and str(summary["guidance"]).startswith("3.5 ")
    assert set(summary["suite_overridden"]) == {"prompts", "steps", "resolution"}  # the suite's 40 steps, 512 px
    assert list(summary["metrics"]) == ["pickscore", "unifiedreward-align", "unifiedreward-iq"]
    assert sorted(p.name for p in (tuned / "images").iterdir()) == ["p0000_s42.png", "p0001_s42.png", "p0002_s42.png"]
    ur = summary["metrics"]["unifiedreward-align"]
    assert ur["mean"] == pytest.approx((3 + 4 + 2.5) / 3) and ur["n_missing"] == 0

    table = (tuned / "suite_table.md").read_text().splitlines()
    assert table[0] == "| model | HPSv2.1 | PickScore | ImageReward | UR-Align | UR-IQ |" + (
        " HPSv3 |" if "hpsv3" in REWARDS else ""
    )
    tuned_row, base_row, diff_row = table[2], table[3], table[4]
    cells = [c.strip() for c in tuned_row.strip("|").split("|")]
    assert cells[0] == "tuned" and cells[1] == "skipped" and cells[3] == "skipped"
    pick = summary["metrics"]["pickscore"]
    assert cells[2] == f"{pick['mean']:.4f} ± {pick['half']:.4f}"
    assert cells[4] == f"{ur['mean']:.4f} ± {ur['half']:.4f}"
    assert base_row.startswith("| base |")
    comparison = json.loads((tuned / "comparison.json").read_text())["metrics"]["pickscore"]
    diff_cells = [c.strip() for c in diff_row.strip("|").split("|")]
    assert diff_cells[0] == "tuned − base (paired)"
    assert diff_cells[2].startswith(f"{comparison['diff']:+.4f} [{comparison['ci95_low']:+.4f}")
    assert diff_cells[4].startswith("+0.0000")  # the judge answers by caption: the same on both sides
    assert "| model | HPSv2.1 |" in printed
    # --table: one row per finished run, the same cells as each run's own table
    table_file = tmp_path / "table.md"
    capsys.readouterr()
    assert main(["eval", "--table", str(base), str(tuned), "--baseline", str(base), "--out", str(table_file)]) == 0
    combined = table_file.read_text().splitlines()
    assert combined[:2] == table[:2] and combined[2] == base_row and combined[3] == tuned_row
    assert combined[4] == diff_row
    # report.html shows every scored metric and lists the skipped ones
    report = (tuned / "report.html").read_text()
    for metric in summary["metrics"]:
        assert f'data-metric="{metric}"' in report
    assert "skipped_metrics" in report and "hpsv2" in report


def test_suite_paper_with_nothing_available_stops_before_sampling(tiny_sd3_dir, tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    monkeypatch.setenv("FLOWBP_REWARD_DIR", str(tmp_path / "no-weights"))
    monkeypatch.delenv("FLOWBP_JUDGE_URL", raising=False)
    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("sampled although no metric is available"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red car\n")
    out = tmp_path / "run"
    code = main(["eval", "--suite", "paper", "--backbone", "sd3", "--backbone-path", str(tiny_sd3_dir), "--prompts",
                 str(prompts), "--resolution", "32", "--steps", "2", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2 and not out.exists()
    err = captured.err.strip()
    assert "--suite paper: no metric is available" in err and len(err.splitlines()) == 1, err
    # the judges say where their weights or server should be: one line each
    judge_line = next(line for line in captured.out.splitlines() if line.startswith("skipping unifiedreward-align:"))
    assert "url=" in judge_line and "config.json" in judge_line


def test_suite_refuses_metrics_option(tmp_path: Path, capsys) -> None:
    code = main(["eval", "--suite", "paper", "--images", str(tmp_path), "--metrics", "hpsv2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--metrics: --suite paper scores its own metrics" in err and len(err.splitlines()) == 1
