"""Run the selected sections of the bench and record what ran and how long it took."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from flowbp.bench.ablation_common import ABLATIONS
from flowbp.bench.ablations import render_ablations, run_ablations, selected, settings_for
from flowbp.bench.context import FULL, QUICK, SECTIONS, Bench, Settings
from flowbp.bench.cost import run_cost, write_cost, write_headline
from flowbp.bench.deviation import run_deviation, write_deviation
from flowbp.bench.explosion import write_explosion
from flowbp.bench.fidelity import run_gradients, write_fidelity
from flowbp.bench.training import run_training, write_training


def training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The training section's sizes given on the command line (each must be >= 1), as Settings fields."""
    out: dict[str, Any] = {}
    for flag, key in (("train_steps", "train_steps"), ("train_batch_size", "train_batch_size"),
                      ("train_num_steps", "train_num_steps"), ("train_eval_samples", "train_eval_samples")):
        value = getattr(args, flag, None)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{flag.replace('_', '-')}: must be >= 1, got {value}")
            out[key] = value
    methods = getattr(args, "train_methods", None)
    if methods:
        from flowbp.methods import available_methods

        names = tuple(m.strip() for m in methods.split(",") if m.strip())
        bad = [m for m in names if m not in available_methods() or m == "custom"]
        if bad or not names:
            raise ValueError(f"--train-methods: unknown method(s) {bad}; allowed: "
                             f"{', '.join(m for m in available_methods() if m != 'custom')}")
        out["train_methods"] = names
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    if getattr(args, "render", False):
        return render(args)
    if args.seeds < 1:
        raise ValueError(f"--seeds: must be >= 1, got {args.seeds}")
    only = set(args.only or SECTIONS)
    allowed = (*SECTIONS, "ablations", *ABLATIONS)
    unknown = only - set(allowed)
    if unknown:
        raise ValueError(f"--only: unknown section(s) {sorted(unknown)}; allowed: {', '.join(allowed)}")
    ablations = selected(only)
    if ablations:
        settings_for(args)  # bad ablation options fail before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.device != "cuda":
        # The digits model is tiny: a call is dominated by per-op overhead, so one thread is as fast as two on an
        # idle machine, and on a shared one two spinning OpenMP threads measured 3-10x slower (and erratic).
        torch.set_num_threads(1)
    settings = dataclasses.replace(QUICK if args.quick else FULL, **training_overrides(args))
    bench = Bench(args, settings)
    timings: dict[str, float] = {}
    fid = cost = None
    if only & {"fidelity", "explosion"}:
        t = time.perf_counter()
        fid = run_gradients(bench)
        if "fidelity" in only:
            write_fidelity(bench, fid)
        if "explosion" in only:
            write_explosion(bench, fid)
        timings["fidelity+explosion"] = time.perf_counter() - t
    if "deviation" in only:
        t = time.perf_counter()
        write_deviation(bench, run_deviation(bench))
        timings["deviation"] = time.perf_counter() - t
    if "cost" in only:
        t = time.perf_counter()
        cost = run_cost(bench)
        write_cost(bench, cost)
        timings["cost"] = time.perf_counter() - t
    write_headline(bench, fid if "fidelity" in only else None, cost)
    if "training" in only:
        t = time.perf_counter()
        write_training(bench, run_training(bench))
        timings["training"] = time.perf_counter() - t
    if ablations:
        timings.update(run_ablations(bench, ablations, command_line()))
    total = time.perf_counter() - bench.t0
    meta = {
        "command": command_line(),
        "mode": "quick" if args.quick else "full",
        "device": str(bench.device),
        "threads": torch.get_num_threads(),
        "sections": sorted(only),
        "section_seconds": timings,
        "total_seconds": total,
        "settings": dataclasses.asdict(settings),
    }
    (bench.out / "bench.json").write_text(json.dumps(meta, indent=2) + "\n")
    bench.log(f"done in {total:.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return 0


def command_line() -> str:
    return "flowbp bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])


class ReportContext:
    """What the writers need from a :class:`Bench` (settings, output folder, options, log) without a model."""

    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.args, self.settings = args, settings
        self.out = Path(args.out)
        self.t0 = time.perf_counter()

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {message}", flush=True)

    def write(self, name: str, data: Any, markdown: str | None = None) -> None:
        Bench.write(self, name, data, markdown)  # type: ignore[arg-type]


def settings_from_json(raw: dict[str, Any]) -> Settings:
    """Settings as a section's JSON stored them (lists back to tuples)."""
    known = {f.name for f in dataclasses.fields(Settings)}
    return Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known})


def render(args: argparse.Namespace) -> int:
    """Re-write every table and plot from the JSON a bench run left in ``--out``: nothing is recomputed.

    The statistics (t intervals, paired differences, per-trajectory grouping) are derived from the stored
    per-batch / per-seed / per-plan values, so a run's tables can be regenerated after the reporting code changes.
    """
    out = Path(args.out)

    def load(name: str) -> dict[str, Any] | None:
        path = out / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    fid, explosion, deviation, cost = load("fidelity"), load("explosion"), load("deviation"), load("cost")
    if fid is None and explosion is None and (partial := load("fidelity-partial")) is not None:
        ctx_note = f"fidelity-partial.json (N = {sorted({r['num_steps'] for r in partial['rows']})})"
        print(f"rendering the interrupted gradient sections from {ctx_note}", flush=True)
        fid, explosion = partial, {"per_step": partial["per_step"], "settings": partial["settings"]}
    training = load("training-runs")
    found = [n for n, d in (("fidelity", fid), ("explosion", explosion), ("deviation", deviation), ("cost", cost),
                            ("training-runs", training)) if d is not None]
    merging = bool(getattr(args, "merge_from", None))
    ablations = render_ablations(ReportContext(args, QUICK)) if out.is_dir() or merging else []
    if not found and not ablations:
        raise ValueError(f"--out: no bench JSON (fidelity, explosion, deviation, cost, training-runs, "
                         f"ablation-*) in {out}")
    if not found:
        return 0
    stored = [d["settings"] for d in (fid, explosion, cost, training) if d is not None and "settings" in d]
    ctx = ReportContext(args, settings_from_json(stored[0] if stored else {}))
    ctx.log(f"rendering {', '.join(found)} from {out}")
    if fid is not None:
        if explosion is not None:
            fid = {**fid, "per_step": explosion["per_step"]}
        write_fidelity(ctx, fid)  # type: ignore[arg-type]
    if explosion is not None and fid is not None:
        write_explosion(ctx, fid)  # type: ignore[arg-type]
    if deviation is not None:
        write_deviation(ctx, deviation)  # type: ignore[arg-type]
    if cost is not None:
        write_cost(ctx, cost)  # type: ignore[arg-type]
    write_headline(ctx, fid, cost)  # type: ignore[arg-type]
    if training is not None:
        ctx.settings = settings_from_json(training["settings"])
        write_training(ctx, training)  # type: ignore[arg-type]
    return 0
