"""The bench end to end on a tiny setting: sections write their tables, --render rebuilds them from the JSON."""

from __future__ import annotations

import argparse
import json

import pytest

from flowbp.bench.context import Bench, Settings
from flowbp.bench.deviation import run_deviation, write_deviation
from flowbp.bench.fidelity import run_gradients, write_fidelity
from flowbp.bench.runner import render

TINY = Settings(num_steps=(3, 4), headline_steps=4, batch_size=2, batches=2, draws=2, sweeps=False,
                deviation_batches=2, deviation_draws=4)


def _args(out: str, **extra: object) -> argparse.Namespace:
    base = dict(out=out, device="cpu", reward="digit-alignment", backbone_path=None, quick=True, seeds=1,
                reference="leapalign", train_reward=None)
    base.update(extra)
    return argparse.Namespace(**base)


def test_gradient_sections_write_paired_tables_and_render_reproduces_them(tmp_path) -> None:
    bench = Bench(_args(str(tmp_path)), TINY)
    data = run_gradients(bench)
    write_fidelity(bench, data)
    write_deviation(bench, run_deviation(bench))
    # the headline N ran first and left its partial results
    partial = json.loads((tmp_path / "fidelity-partial.json").read_text())
    assert {r["num_steps"] for r in partial["rows"]} == {3, 4}
    fid = json.loads((tmp_path / "fidelity.json").read_text())
    # one paired comparison per cheap default method against the reference, per N, with t intervals over 2 batches
    rows = fid["comparisons"]["4"]["cosines"]
    refs = {r["a"] for r in rows if r["kind"] == "vs reference"}
    assert "flowbp-lagrange" in refs and "alignprop" not in refs and all(r["n"] == 2 for r in rows)
    # every row carries the true-gradient column, and alignprop's own cosine to the objective is 1
    assert all("cosine_true" in r for r in fid["rows"])
    exact = next(r for r in fid["rows"] if r["label"] == "alignprop" and r["num_steps"] == 4)
    assert exact["cosine"]["mean"] == pytest.approx(1.0, abs=1e-9)
    before = {p.name: p.read_text() for p in tmp_path.glob("*.md")}
    (tmp_path / "explosion.json").write_text(json.dumps({"per_step": data["per_step"]}))
    for name in before:
        (tmp_path / name).unlink()
    assert render(_args(str(tmp_path))) == 0
    after = {p.name: p.read_text() for p in tmp_path.glob("*.md")}
    for name in ("fidelity.md", "deviation.md"):
        assert after[name] == before[name]
