"""The measurement code of flowbp.diagnostics, checked against known cases and hand-derived values."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from conftest import MLPField, a_of, c_of, shifted
from torch import nn

import flowbp
from flowbp import diagnostics as dg

B, D = 3, 4


def e_of(sigma: float) -> float:
    """∂v/∂φ of the two-parameter linear field: a different σ-profile from c, so gradients are not parallel."""
    return sigma


class TwoParamLinearField(nn.Module):
    """v(x, σ) = a(σ)·x + c(σ)·θ + e(σ)·φ: dx_N/dθ = s_θ·I and dx_N/dφ = s_φ·I with s known by hand."""

    def __init__(self, dim: int = D) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.linspace(-1.0, 1.0, dim, dtype=torch.float64))
        self.phi = nn.Parameter(torch.linspace(0.5, -0.5, dim, dtype=torch.float64))

    def forward(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return a_of(sigma) * x + c_of(sigma) * self.theta + e_of(sigma) * self.phi


def _linear_loss(u: torch.Tensor) -> dg.LossFn:
    """The linear loss −mean_b w_b·r_b with r_b = <u_b, x_b> (φ averaged over the reward inputs)."""

    def loss_fn(inputs, weights):
        rewards = [(u * x).sum(1) for x in inputs]
        return flowbp.reward_loss(rewards, weights, kind="linear")

    return loss_fn


def _problem(field: nn.Module, n: int = 10, seed: int = 1) -> dg.GradientProblem:
    sigmas = shifted(n)
    noise = torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = torch.randn(B, D, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    traj = flowbp.rollout(field, noise, sigmas)
    return dg.GradientProblem(field, traj, list(field.parameters()), _linear_loss(u))


def _exact_coefficients(sigmas: list[float], start: int = 0) -> tuple[float, float]:
    """dx_N/d(θ, φ) of Euler from node ``start`` with x_start constant: s_{i+1} = (1 + Δ_i a_i)·s_i + Δ_i·c_i."""
    s_t = s_p = 0.0
    for i in range(start, len(sigmas) - 1):
        d = sigmas[i + 1] - sigmas[i]
        s_t = (1 + d * a_of(sigmas[i])) * s_t + d * c_of(sigmas[i])
        s_p = (1 + d * a_of(sigmas[i])) * s_p + d * e_of(sigmas[i])
    return s_t, s_p


def _cos2(a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] * b[0] + a[1] * b[1]) / (math.hypot(*a) * math.hypot(*b))


# ---------------------------------------------------------------------------------------------- vector metrics
def test_cosine_and_norm_ratio_of_known_vectors() -> None:
    g = torch.tensor([3.0, -4.0, 0.0])
    assert dg.cosine(2.5 * g, g) == pytest.approx(1.0)
    assert dg.norm_ratio(2.5 * g, g) == pytest.approx(2.5)
    assert dg.norm_ratio(g, 2.5 * g) == pytest.approx(0.4)
    assert dg.cosine(-g, g) == pytest.approx(-1.0)
    assert dg.cosine(torch.tensor([4.0, 3.0, 0.0]), g) == pytest.approx(0.0)
    assert dg.cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert dg.cosine(torch.zeros(3), g) == 0.0
    assert dg.norm_ratio(torch.zeros(3), torch.zeros(3)) == 0.0


def test_flatten_grads_orders_parameters_and_fills_unused_with_zeros() -> None:
    params = [torch.zeros(2, 2), torch.zeros(3), torch.zeros(1)]
    flat = dg.flatten_grads([torch.ones(2, 2), None, torch.full((1,), 7.0)], params)
    assert flat.dtype == torch.float64
    assert flat.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 7.0]
    with pytest.raises(ValueError, match="grads"):
        dg.flatten_grads([None], params)


def test_confidence_interval_of_a_known_sample() -> None:
    # mean 2.5, sample sd sqrt(5/3), half-width t_{0.975, 3}·sd/√4 = 3.182446·sd/2 (Student t, 4 batches)
    ci = dg.summarize([1.0, 2.0, 3.0, 4.0])
    half = 3.182446 * math.sqrt(5 / 3) / 2
    assert ci["mean"] == pytest.approx(2.5)
    assert ci["ci95_low"] == pytest.approx(2.5 - half, rel=1e-6)
    assert ci["ci95_high"] == pytest.approx(2.5 + half, rel=1e-6)
    assert ci["n"] == 4
    assert dg.summarize([5.0])["ci95_high"] == math.inf  # one batch: no interval


# ---------------------------------------------------------------------------------------------- two references
def test_fidelity_against_a_second_reference() -> None:
    """``true_exact`` fills the *_true fields against that vector: with −g the cosines flip sign, the ratios stay."""
    problem = _problem(MLPField(D, seed=3))
    exact = dg.exact_gradient(problem)
    result = dg.fidelity(
        problem, exact, lambda g: flowbp.make_plan("flowbp-sparse", problem.sigmas, g), 3,
        torch.Generator().manual_seed(0), true_exact=-exact,
    )
    assert result.cosines_true == pytest.approx([-c for c in result.cosines], abs=1e-12)
    assert result.norm_ratios_true == pytest.approx(result.norm_ratios, rel=1e-12)
    assert result.cosine_of_mean_true == pytest.approx(-result.cosine_of_mean, abs=1e-12)
    assert all(abs(c) < 1 - 1e-6 for c in result.cosines)  # not trivially parallel
    summary = dg.summarize_fidelity([result, result])
    assert summary["cosine_true"]["mean"] == pytest.approx(-summary["cosine"]["mean"], abs=1e-12)


def test_exact_gradient_is_autograd_through_the_plain_sampler() -> None:
    field = MLPField(D, seed=4)
    problem = _problem(field, n=7)
    sig = problem.sigmas.tolist()
    x = problem.trajectory.latents[0]
    for i in range(7):
        x = x + (sig[i + 1] - sig[i]) * field(x, sig[i])
    ones = torch.ones(B, dtype=torch.float64)
    expected = dg.gradient(problem.loss_fn((x,), ones), problem.params)
    torch.testing.assert_close(dg.exact_gradient(problem), expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- explosion
@pytest.mark.parametrize("field", [MLPField(D, seed=5), TwoParamLinearField()], ids=["mlp", "linear"])
def test_per_step_contributions_sum_to_the_exact_gradient(field: nn.Module) -> None:
    problem = _problem(field, n=9)
    exact = dg.exact_gradient(problem)
    parts = dg.per_step_contributions(problem, keep_vectors=True)
    assert parts.vectors is not None and parts.vectors.shape == (9, exact.numel())
    torch.testing.assert_close(parts.total, exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts.vectors.sum(0), exact, rtol=1e-10, atol=1e-12)
    assert parts.norms == pytest.approx([float(v.norm()) for v in parts.vectors])
    streamed = dg.per_step_contributions(problem, reference=exact)
    assert streamed.cosines == pytest.approx(parts.cosines, abs=1e-10)
    assert streamed.vectors is None


def test_per_step_contribution_matches_hand_formula_on_linear_field() -> None:
    """g_i = Δ_i·(c_i, e_i)·Π_{k>i}(1 + Δ_k a_k) ⊗ (−ū): the θ-dependence of call i carried through the x-chain."""
    n = 6
    problem = _problem(TwoParamLinearField(), n=n)
    sig = problem.sigmas.tolist()
    u = torch.randn(B, D, generator=torch.Generator().manual_seed(101), dtype=torch.float64)
    parts = dg.per_step_contributions(problem, keep_vectors=True)
    for i in range(n):
        carry = math.prod(1 + (sig[k + 1] - sig[k]) * a_of(sig[k]) for k in range(i + 1, n))
        d = sig[i + 1] - sig[i]
        expected = torch.cat([d * c_of(sig[i]) * carry * -u.mean(0), d * e_of(sig[i]) * carry * -u.mean(0)])
        torch.testing.assert_close(parts.vectors[i], expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- fidelity by hand
def test_draft_k_fidelity_matches_hand_computed_value_on_linear_field() -> None:
    """DRaFT-K = exact Euler over the last K steps: (ŝ_θ, ŝ_φ) is the exact recursion started at N − K."""
    n = 10
    problem = _problem(TwoParamLinearField(), n=n)
    sig = problem.sigmas.tolist()
    exact = dg.exact_gradient(problem)
    s_exact = _exact_coefficients(sig)
    for k in (1, 2, 4, n):
        result = dg.fidelity(
            problem, exact, lambda g, k=k: flowbp.make_plan("draft-k", problem.sigmas, g, k=k), 1,
            torch.Generator().manual_seed(0),
        )
        s_hat = _exact_coefficients(sig, start=n - k)
        assert result.cosines[0] == pytest.approx(_cos2(s_hat, s_exact), abs=1e-10)
        assert result.norm_ratios[0] == pytest.approx(math.hypot(*s_hat) / math.hypot(*s_exact), rel=1e-10)
    assert result.cosines[0] == pytest.approx(1.0) and result.norm_ratios[0] == pytest.approx(1.0)  # K = N


def test_sparse_fidelity_and_bias_match_hand_computed_values_on_linear_field() -> None:
    """Sparse: ŝ = Σ_{i∈A} g_i Δ_i (c_i, e_i) per draw; the bias is the cosine of the mean over draws."""
    n, draws = 10, 5
    problem = _problem(TwoParamLinearField(), n=n)
    sig = problem.sigmas.tolist()
    exact = dg.exact_gradient(problem)
    s_exact = _exact_coefficients(sig)

    def plan_fn(g: torch.Generator) -> flowbp.Plan:
        return flowbp.make_plan("flowbp-sparse", problem.sigmas, g)

    result = dg.fidelity(problem, exact, plan_fn, draws, torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)  # the same plan draws, replayed by hand
    hand = []
    for _ in range(draws):
        plan = plan_fn(replay)
        s_hat = tuple(
            sum(plan.grad_scale[i] * (sig[i + 1] - sig[i]) * f(sig[i]) for i in plan.active) for f in (c_of, e_of)
        )
        hand.append(s_hat)
    assert result.cosines == pytest.approx([_cos2(s, s_exact) for s in hand], abs=1e-10)
    assert result.norm_ratios == pytest.approx([math.hypot(*s) / math.hypot(*s_exact) for s in hand], rel=1e-10)
    mean = (sum(s[0] for s in hand) / draws, sum(s[1] for s in hand) / draws)
    assert result.cosine_of_mean == pytest.approx(_cos2(mean, s_exact), abs=1e-10)
    assert all(c < 1 - 1e-6 for c in result.cosines)  # not trivially parallel: the test has teeth


# ---------------------------------------------------------------------------------------------- connectors, cost
def test_connector_deviations_need_no_model_and_equal_the_engines() -> None:
    field = MLPField(D, seed=6)
    problem = _problem(field, n=12)
    for seed in range(3):
        for method in ("leapalign", "flowbp-lagrange", "flowbp-bridge"):
            plan = flowbp.make_plan(method, problem.sigmas, seed)
            expected = flowbp.surrogate(plan, problem.trajectory, field).deviations
            got = dg.connector_deviations(plan, problem.trajectory)
            assert got.keys() == expected.keys()
            for a in got:
                torch.testing.assert_close(got[a], expected[a])
    # euler connectors are exact: zero deviation
    sparse = flowbp.make_plan("flowbp-sparse", problem.sigmas, 0)
    assert float(dg.connector_deviations(sparse, problem.trajectory)[12].abs().max()) < 1e-12


def test_saved_bytes_and_timing_smoke() -> None:
    field = MLPField(16, hidden=32, dtype=torch.float32)
    sigmas = shifted(8)
    noise = torch.randn(4, 16)
    u = torch.randn(4, 16)
    traj = flowbp.rollout(field, noise, sigmas)
    problem = dg.GradientProblem(field, traj, list(field.parameters()), _linear_loss(u))
    one = dg.saved_bytes(problem, flowbp.make_plan("flowbp-sparse", sigmas, 0, num_active=1))
    three = dg.saved_bytes(problem, flowbp.make_plan("flowbp-sparse", sigmas, 0, num_active=3))
    assert 0 < one["surrogate"] and three["surrogate"] == 3 * one["surrogate"]
    assert three["step"] >= three["surrogate"]
    timing = dg.time_step_vs_rollout(
        field, noise, sigmas, list(field.parameters()), _linear_loss(u),
        lambda g: flowbp.make_plan("flowbp-sparse", sigmas, g), torch.Generator().manual_seed(0), repeats=2,
    )
    assert len(timing.rollout_s) == len(timing.step_s) == 2
    assert timing.ratios == pytest.approx([st / ro for st, ro in zip(timing.step_s, timing.rollout_s, strict=True)])
    assert timing.summary()["ratio_median"] == pytest.approx(statistics.median(timing.ratios))


# ---------------------------------------------------------------------------------------------- the bench command
def test_bench_covers_every_method_and_parses_its_arguments() -> None:
    import argparse

    from flowbp.bench import context as bench
    from flowbp.commands.bench import register

    configs = bench.method_configs(sweeps=True)
    methods = {c.method for c in configs}
    assert methods == set(flowbp.available_methods()) - {"custom"}
    # exactly one paper-default row per method, and the sweeps of the active-set size
    defaults = [c.method for c in configs if c.default]
    assert sorted(defaults) == sorted(methods)
    assert {c.overrides["num_active"] for c in configs if c.method == "flowbp-sparse"} == {1, 3, 5}
    assert {c.overrides["k"] for c in configs if c.method == "draft-k"} == {1, 3, 5}
    assert {c.overrides["num_active"] for c in configs if c.method == "flowbp-bridge"} == {2, 3, 5}
    sigmas = shifted(10)
    assert bench.is_deterministic(bench.MethodConfig("draft-k", {"k": 3}), sigmas)
    assert not bench.is_deterministic(bench.MethodConfig("flowbp-sparse"), sigmas)
    assert not bench.is_deterministic(bench.MethodConfig("draft-lv"), sigmas)  # renoise noise is random
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--quick", "--out", "x", "--only", "cost", "--only", "deviation"])
    assert args.quick and args.only == ["cost", "deviation"] and args.seeds == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--only", "nonsense"])


# ---------------------------------------------------------------------------------------------- bench statistics
def test_paired_comparisons_rank_only_where_the_paired_interval_excludes_zero() -> None:
    from flowbp.bench.report import paired_comparisons

    # b = a + 0.10 ± tiny per-unit noise: paired differences are tight although a and b overlap wildly
    a = [0.1, 0.9, 0.4, 0.7, 0.2]
    b = [x + 0.10 + e for x, e in zip(a, [0.01, -0.01, 0.0, 0.005, -0.005], strict=True)]
    c = [x + d for x, d in zip(a, [0.3, -0.3, 0.2, -0.2, 0.0], strict=True)]  # mean difference 0, noisy
    rows = paired_comparisons({"a": a, "b": b, "c": c}, reference="a")
    by = {(r["a"], r["b"]): r for r in rows}
    assert by[("b", "a")]["mean"] == pytest.approx(0.10)
    # hand: differences 0.11, 0.09, 0.10, 0.105, 0.095 -> sd = 0.0079057, t_{0.975,4} = 2.776445
    half = 2.776445 * 0.0079057 / math.sqrt(5)
    assert by[("b", "a")]["ci95_high"] - 0.10 == pytest.approx(half, rel=1e-4)
    assert by[("b", "a")]["verdict"] == "b better"
    assert by[("c", "a")]["verdict"] == "not resolved"
    lower = paired_comparisons({"a": a, "b": b}, reference="a", higher_is_better=False)
    assert lower[0]["verdict"] == "a better"  # FD-like metric: lower wins


def test_deviation_intervals_average_each_trajectory_first() -> None:
    from flowbp.bench.deviation import deviation_summary

    recs = [{"trajectory": t, "d_j": v, "d_0": v, "leap_kj": 1.0, "leap_jN": 1.0, "sample_weight": 1.0}
            for t, vals in ((0, [1.0, 3.0, 2.0]), (1, [5.0, 7.0, 6.0])) for v in vals]
    ci = deviation_summary({"leapalign": recs})["leapalign"]["d_j"]
    # two units (trajectory means 2 and 6), not six plans: half-width t_{0.975,1}·sd/√2 = 12.7062·2.8284/1.4142
    assert ci["n"] == 2 and ci["mean"] == pytest.approx(4.0)
    assert ci["ci95_high"] - 4.0 == pytest.approx(12.7062 * 2.0, rel=1e-4)
