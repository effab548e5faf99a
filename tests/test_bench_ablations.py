"""The ablations of ``flowbp bench``: the verdict rule on constructed data, the sweeps' pairing, and a tiny run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest

from flowbp.bench.ablation_common import (
    ABLATION_FULL,
    FAILS,
    HOLDS,
    UNRESOLVED,
    AblationSettings,
    alpha_configs,
    claim_difference,
    combine,
    input_configs,
    intermediate_optimum,
    k_configs,
    linear_fit,
    linear_verdict,
    restrict_methods,
    verdict,
)
from flowbp.methods import make_plan
from flowbp.trajectory import training_sigmas

SIGMAS = training_sigmas(25)


# ---------------------------------------------------------------------------------------------- the rule
def test_verdict_is_decided_by_the_paired_t_interval_computed_by_hand() -> None:
    b = [0.50, 0.90, 0.20, 0.70, 0.40]  # units far apart: unpaired intervals would overlap wildly
    d = [0.10, 0.12, 0.08, 0.11, 0.09]
    a = [x + y for x, y in zip(b, d, strict=True)]
    res = claim_difference(a, b)
    # mean 0.1, sd sqrt(0.001 / 4) = 0.0158114, t(0.975, 4) = 2.7764451: half-width 0.0196324
    assert res["mean"] == pytest.approx(0.1)
    assert res["ci95_low"] == pytest.approx(0.1 - 0.0196324, abs=1e-6)
    assert res["ci95_high"] == pytest.approx(0.1 + 0.0196324, abs=1e-6)
    assert res["verdict"] == HOLDS
    assert claim_difference(b, a)["verdict"] == FAILS
    # lower is better (e.g. FD): a lower than b supports "a is better"
    assert claim_difference(b, a, higher_is_better=False)["verdict"] == HOLDS
    # differences of both signs: the interval contains 0
    noisy = [x + s for x, s in zip(b, [0.05, -0.04, 0.03, -0.05, 0.01], strict=True)]
    assert claim_difference(noisy, b)["verdict"] == UNRESOLVED
    assert verdict({"ci95_low": 0.0, "ci95_high": 0.2}) == UNRESOLVED  # touching 0 is not excluding it
    assert combine([HOLDS, HOLDS]) == HOLDS
    assert combine([HOLDS, UNRESOLVED]) == UNRESOLVED
    assert combine([HOLDS, FAILS, UNRESOLVED]) == FAILS
    assert combine([]) == UNRESOLVED


def _curve(means: dict[float, float]) -> dict[float, list[float]]:
    """Five paired units: a shared unit effect plus the α effect plus a little per-cell noise."""
    unit = [0.0, 0.3, -0.2, 0.5, -0.4]
    noise = [0.002, -0.001, 0.0, 0.001, -0.002]
    return {a: [m + u + noise[(i + k) % 5] for i, u in enumerate(unit)] for k, (a, m) in enumerate(means.items())}


def test_intermediate_optimum_rule_on_constructed_sweeps() -> None:
    peak = intermediate_optimum(_curve({0.0: 0.50, 0.1: 0.55, 0.5: 0.60, 1.0: 0.52}))
    assert peak["verdict"] == HOLDS and peak["best"] == 0.5 and peak["best_intermediate"] == 0.5
    assert peak["vs_low"]["mean"] == pytest.approx(0.10, abs=0.005)
    assert peak["vs_high"]["mean"] == pytest.approx(0.08, abs=0.005)
    # monotone: α = 1 beats every intermediate α (the claim's opposite is resolved)
    mono = intermediate_optimum(_curve({0.0: 0.50, 0.1: 0.55, 0.5: 0.60, 1.0: 0.70}))
    assert mono["verdict"] == FAILS and mono["best"] == 1.0
    assert mono["best_vs_other_end"]["verdict"] == HOLDS
    # an intermediate α is best, but indistinguishable from α = 1: not resolved
    flat = intermediate_optimum(_curve({0.0: 0.50, 0.1: 0.601, 0.5: 0.55, 1.0: 0.600}))
    assert flat["verdict"] == UNRESOLVED and flat["best_intermediate"] == 0.1
    # lower is better: the same peak turned upside down
    low = intermediate_optimum(_curve({0.0: -0.50, 0.1: -0.55, 0.5: -0.60, 1.0: -0.52}), higher_is_better=False)
    assert low["verdict"] == HOLDS and low["best"] == 0.5


def test_linear_memory_rule() -> None:
    exact = linear_fit([1, 2, 3, 5, 8], [100 + 50 * k for k in (1, 2, 3, 5, 8)])
    assert exact["slope"] == pytest.approx(50) and exact["intercept"] == pytest.approx(100)
    assert exact["max_rel_residual"] == pytest.approx(0, abs=1e-12) and linear_verdict(exact) == HOLDS
    quadratic = linear_fit([1, 2, 3, 5, 8], [10 * k * k for k in (1, 2, 3, 5, 8)])
    assert quadratic["max_rel_residual"] > 0.01 and linear_verdict(quadratic) == FAILS


# ---------------------------------------------------------------------------------------------- the sweeps
def _same_draw(a, b) -> bool:
    return (a.anchors, a.segments, a.active, a.grad_scale) == (b.anchors, b.segments, b.active, b.grad_scale)


def test_input_sweep_pairs_each_draw_with_its_endpoint_faithful_twin() -> None:
    configs = input_configs(ABLATION_FULL)
    assert [c.label for c in configs] == [
        "refl (reward_input=posterior_mean)", "refl (reward_input=endpoint)",
        "drtune (reward_input=posterior_mean)", "drtune (reward_input=endpoint)",
    ]
    assert [c.default for c in configs] == [True, False, True, False]
    for pm, ep in (configs[:2], configs[2:]):
        for seed in range(20):
            p = make_plan(pm.method, SIGMAS, seed, **pm.overrides)
            e = make_plan(ep.method, SIGMAS, seed, **ep.overrides)
            assert _same_draw(p, e)  # the same τ / m and active set: only the reward input differs
            assert (p.reward_input, p.final_connector) == ("posterior_mean", False)
            assert (e.reward_input, e.final_connector) == ("endpoint", True)
            # DESIGN 3.2: endpoint on a ReFL/DRTune plan = the same leap plus the final connector
            twin = dataclasses.replace(p, final_connector=True, reward_input="endpoint", params=e.params)
            assert twin == e


def test_k_sweep_values_and_lagrange_supports_match_the_paper_rule() -> None:
    pairs = k_configs(ABLATION_FULL)
    by: dict[str, list[int]] = {}
    for c, k in pairs:
        by.setdefault(c.method, []).append(k)
    assert by == {"flowbp-sparse": [1, 2, 3, 5, 8], "flowbp-bridge": [2, 3, 5, 8], "flowbp-lagrange": [1, 2, 3]}
    assert sorted(c.method for c, _ in pairs if c.default) == ["flowbp-bridge", "flowbp-lagrange", "flowbp-sparse"]
    for c, k in pairs:
        for seed in range(10):
            plan = c.plan_fn(SIGMAS)(seed)
            if c.method == "flowbp-lagrange":
                # support_mode=all with 1 or 2 active supports is exactly the paper's midpoint rule
                if k <= 2:
                    ref = make_plan("flowbp-lagrange", SIGMAS, seed, max_active=k)
                    assert _same_draw(plan, ref)
                per_segment = [len([i for i in plan.active if i in s.support]) for s in plan.segments]
                assert all(n == min(k, len(s.support)) for n, s in zip(per_segment, plan.segments, strict=True))
            else:
                assert len(plan.active) == k
    only = restrict_methods(ABLATION_FULL, ["flowbp-bridge"])
    assert {c.method for c, _ in k_configs(only)} == {"flowbp-bridge"} and only.input_methods == ()
    with pytest.raises(ValueError, match="--ablation-methods"):
        restrict_methods(ABLATION_FULL, ["nope"])


def test_alpha_sweep_shares_the_draw_and_changes_only_the_coupling() -> None:
    pairs = alpha_configs(ABLATION_FULL)
    assert [a for c, a in pairs if c.method == "flowbp-bridge"] == [0.0, 0.05, 0.1, 0.3, 0.5, 1.0]
    for method in ("flowbp-bridge", "flowbp-lagrange"):
        for seed in range(10):
            plans = [(a, c.plan_fn(SIGMAS)(seed)) for c, a in pairs if c.method == method]
            for a, plan in plans:
                assert _same_draw(plan, plans[0][1])
                assert plan.coupling == {plan.anchors[1]: a}


# ---------------------------------------------------------------------------------------------- a tiny run
TINY = AblationSettings(num_steps=4, batch_size=2, batches=2, draws=1, cost_repeats=1, leap_batches=1,
                        input_methods=("refl",), k_values=(1, 2), lagrange_max_active=(1,),
                        alphas=(0.0, 0.5, 1.0), alpha_methods=("flowbp-bridge",), seeds=2, train_steps=1,
                        train_batch_size=2, train_num_steps=3, train_eval_samples=2)


def _args(out: str, **extra: object) -> argparse.Namespace:
    base = dict(out=out, device="cpu", reward=None, backbone_path=None, quick=True, seeds=1, reference="leapalign",
                train_reward=None)
    base.update(extra)
    return argparse.Namespace(**base)


@pytest.fixture
def one_thread():
    """As ``flowbp bench`` on CPU: one thread (two spinning OpenMP threads are several times slower when shared)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_ablations_write_json_tables_plots_and_render_reproduces_them(tmp_path, one_thread) -> None:
    from flowbp.bench import ablation_alpha, ablation_input, ablation_k, ablation_leap
    from flowbp.bench.ablations import render_ablations, write_summary
    from flowbp.bench.context import Bench
    from flowbp.bench.runner import render

    bench = Bench(_args(str(tmp_path)), None)  # type: ignore[arg-type]
    no_train = dataclasses.replace(TINY, train=False)
    for module, s in ((ablation_input, TINY), (ablation_k, no_train), (ablation_alpha, no_train),
                      (ablation_leap, no_train)):
        data = module.run(bench, s)
        data["seconds"], data["command"] = 1.0, "test"
        module.write(bench, data)
    write_summary(bench)
    names = ("ablation-input", "ablation-k", "ablation-alpha", "ablation-leap")
    for name in names:
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    summary = json.loads((tmp_path / "ablations.json").read_text())
    assert set(summary["ablations"]) == set(names)
    assert all(c["verdict"] in (HOLDS, FAILS, UNRESOLVED) for c in summary["claims"])
    inp = summary["ablations"]["ablation-input"]
    # two seeds per configuration, both variants trained on the same seeds
    assert [r["seed"] for r in inp["training"]["runs"]["refl (reward_input=endpoint)"]] == [0, 1]
    assert inp["analysis"]["refl"]["training_seeds"] == 2
    k = summary["ablations"]["ablation-k"]
    # bytes saved for backward: one network call's activations per grad forward, whatever the method
    per_call = {r["saved_bytes_surrogate"] / r["grad_forwards"] for r in k["cost"]["rows"].values()}
    assert max(per_call) == pytest.approx(min(per_call), rel=1e-9)
    leap = summary["ablations"]["ablation-leap"]
    one = next(p for p in leap["analysis"]["d_0"]["per_length"] if p["length"] == 1)
    assert one["leap"]["mean"] == pytest.approx(one["lagrange"]["mean"]) and one["leap"]["mean"] < 1e-6
    assert all(math.isfinite(v) for p in leap["sweep"]["leap"]["d_0"] for v in p["values"])
    before = {p.name: p.read_text() for p in tmp_path.glob("*.md")}
    for p in tmp_path.glob("*.md"):
        p.unlink()
    assert render(_args(str(tmp_path), render=True)) == 0
    assert {p.name: p.read_text() for p in tmp_path.glob("*.md")} == before
    # a run split by method merges back into one ablation
    split = tmp_path / "split"
    split.mkdir()
    alpha = json.loads((tmp_path / "ablation-alpha.json").read_text())
    label = "flowbp-bridge (alpha=1.0)"
    part = {**alpha, "knob": {label: alpha["knob"].pop(label)},
            "gradients": {**alpha["gradients"], "rows": {label: alpha["gradients"]["rows"].pop(label)}},
            "settings": {**alpha["settings"], "alpha_methods": ["flowbp-lagrange"]}}
    (tmp_path / "ablation-alpha.json").write_text(json.dumps(alpha))
    (split / "ablation-alpha.json").write_text(json.dumps(part))
    render_ablations(argparse.Namespace(out=tmp_path, args=_args(str(tmp_path), merge_from=[str(split)]),
                                        write=bench.write, log=bench.log))
    merged = json.loads((tmp_path / "ablation-alpha.json").read_text())
    assert set(merged["knob"]) == {"flowbp-bridge (alpha=0.0)", "flowbp-bridge (alpha=0.5)", label}
    assert merged["settings"]["alpha_methods"] == ["flowbp-bridge", "flowbp-lagrange"]
    with pytest.raises(ValueError, match="appear in two parts"):
        render_ablations(argparse.Namespace(out=tmp_path, args=_args(str(tmp_path), merge_from=[str(split)]),
                                            write=bench.write, log=bench.log))
