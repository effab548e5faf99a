"""One number format for the CLI and the HTML report; settings shown as what was used, never ``None``."""

from __future__ import annotations

import json
from pathlib import Path

from flowbp.cli import main
from flowbp.commands.eval import _print_comparison
from flowbp.report import fmt, write_report


def test_a_tiny_significant_difference_prints_as_tiny_in_cli_and_html(tmp_path: Path, capsys) -> None:
    c = {"mean_a": 0.5000108, "mean_b": 0.5, "diff": 1.087e-05, "ci95_low": 9.1e-06, "ci95_high": 1.26e-05,
         "significant": True, "n_prompts": 8, "n_images": 16}
    comparison = {"a": "A", "b": "B", "pairing": "paired", "metrics": {"reward": c}}
    _print_comparison(comparison)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("reward"))
    assert "+1.087e-05" in row and "[+9.100e-06, +1.260e-05]" in row and "+0.0000" not in row
    summary = {"metrics": {"reward": {"mean": 0.5000108, "ci95_low": 0.4, "ci95_high": 0.6, "n_prompts": 8,
                                      "n_images": 16}}}
    html = write_report(tmp_path, summary, [], ["reward"], comparison).read_text()
    assert f"<td>{fmt(1.087e-05, True)}</td>" in html and "[+9.100e-06, +1.260e-05]" in html
    assert fmt(0.0) == "0" and fmt(-0.25, True) == "-0.25" and fmt(None) == "missing" and fmt(123456.0) == "1.235e+05"


def test_eval_report_names_the_guidance_used(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("digit 2\ndigit 5\n")
    out = tmp_path / "run"
    assert main(["eval", "--backbone", "digits", "--prompts", str(prompts), "--metrics", "digit-alignment",
                 "--steps", "2", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["guidance"] == "2 (classifier-free guidance; the digits default)"
    html = (out / "report.html").read_text()
    assert "the digits default" in html and ">None<" not in html
