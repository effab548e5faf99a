"""The surrogate contract of DESIGN.md 3.5, checked for every method."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import LinearField, MLPField, a_of, c_of, shifted

import flowbp
from flowbp.memory import saved_tensor_bytes
from flowbp.plan import Plan

METHODS = flowbp.available_methods()
RANDOM_METHODS = ["refl", "drtune", "leapalign", "flowbp-sparse", "flowbp-bridge", "flowbp-lagrange"]
B, D = 3, 4


def _noise(dtype=torch.float64, seed=1) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _plans(sigmas: torch.Tensor, seeds=(0, 1, 2)) -> list[Plan]:
    plans = []
    for m in METHODS:
        for s in seeds:
            plans.append(flowbp.make_plan(m, sigmas, s))
    # ablations on the axes: endpoint-faithful ReFL, uniform weights, blended Lagrange, rescaled Sparse
    plans.append(flowbp.make_plan("refl", sigmas, 0, reward_input="endpoint"))
    plans.append(
        flowbp.make_plan("flowbp-lagrange", sigmas, 3, weights="uniform", support_mode="all", max_active=0)
    )
    plans.append(flowbp.make_plan("flowbp-lagrange", sigmas, 4, anchor_lambda=0.4, alpha=0.7))
    plans.append(flowbp.make_plan("flowbp-bridge", sigmas, 5, alpha=1.0, grad_rescale=0.5))
    plans.append(flowbp.make_plan("draft-k", sigmas, 0, k=4))
    plans.append(flowbp.make_plan("alignprop", sigmas, 0, checkpoint=False))
    return plans


def _plan_id(p: Plan) -> str:
    return f"{p.method}:{'-'.join(map(str, p.anchors))}:{'-'.join(map(str, p.active))}"


SIGMAS = shifted(10)
PLANS = _plans(SIGMAS)


# ---------------------------------------------------------------------------- 1. forward value
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("plan", PLANS, ids=_plan_id)
def test_forward_value_is_sample_or_posterior_mean(plan: Plan, dtype, tol) -> None:
    field = MLPField(D, dtype=dtype)
    traj = flowbp.rollout(field, _noise(dtype), SIGMAS)
    out = flowbp.surrogate(plan, traj, field, generator=torch.Generator().manual_seed(0))
    if plan.reward_input == "endpoint":
        expected = traj.sample
    else:
        expected = traj.posterior_mean(plan.segments[-1].start)
    torch.testing.assert_close(out.reward_input, expected, rtol=tol, atol=tol)
    assert out.reward_input.requires_grad


# ---------------------------------------------------------------------------- 2. closed forms
def closed_form_coefficient(plan: Plan) -> float:
    """d(reward input)/dθ for the linear field, derived by hand: a scalar s with d out_b / dθ = s·I.

    Along the plan: s(x̃_{a_0}) = 0;  s(x̂_end) = s(x̃_start) + Σ_{i active} w_i g_i [c(σ_i) + α_i a(σ_i) s(x̃_i)],
    where the α-term exists only at anchors (u_i = sg(x_i) + α_i(x̃_i − sg(x̃_i)) ⇒ ∂u_i/∂θ = α_i s(x̃_i)).
    Connectors add a constant, so s passes through them unchanged.
    """
    s_at = {plan.anchors[0]: 0.0}
    s_out = 0.0
    for seg in plan.segments:
        s_hat = s_at[seg.start]
        for i, w in zip(seg.support, seg.weights, strict=True):
            if i in plan.active:
                sig = plan.sigmas[i]
                coupled = plan.alpha(i) * a_of(sig) * s_at[i] if i in s_at else 0.0
                s_hat += w * plan.grad_scale[i] * (c_of(sig) + coupled)
        s_at[seg.end] = s_out = s_hat
    return s_out


@pytest.mark.parametrize("plan", PLANS, ids=_plan_id)
def test_gradient_matches_hand_derived_closed_form_on_linear_field(plan: Plan) -> None:
    field = LinearField(D)
    traj = flowbp.rollout(field, _noise(), SIGMAS)
    weights = torch.randn(B, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out = flowbp.surrogate(plan, traj, field)
    (grad,) = torch.autograd.grad((weights * out.reward_input).sum(), [field.theta])
    expected = closed_form_coefficient(plan) * weights.sum(0)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_sparse_closed_form_is_sum_of_active_steps() -> None:
    """∂x_N/∂θ = Σ_{i∈A} g_i Δ_i ∂_θ v(x_i): written out for one concrete plan, with grad_rescale."""
    plan = flowbp.make_plan("flowbp-sparse", SIGMAS, 0, num_active=3, grad_rescale=1.0)
    s = SIGMAS.tolist()
    delta = [s[i + 1] - s[i] for i in range(10)]
    f = sum(abs(d) for d in delta) / sum(abs(delta[i]) for i in plan.active)  # gr = 1: full rescale
    assert all(plan.grad_scale[i] == pytest.approx(f) for i in plan.active)
    field = LinearField(D)
    traj = flowbp.rollout(field, _noise(), SIGMAS)
    out = flowbp.surrogate(plan, traj, field)
    (grad,) = torch.autograd.grad(out.reward_input.sum(), [field.theta])
    expected = B * f * sum(delta[i] * c_of(s[i]) for i in plan.active)
    torch.testing.assert_close(grad, torch.full((D,), expected, dtype=torch.float64))
    # gr = 1 makes the active nodes carry the whole interval's magnitude: Σ g_i |Δ_i| = Σ |Δ|
    assert sum(f * abs(delta[i]) for i in plan.active) == pytest.approx(1.0)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
def test_bridge_nested_term_scales_with_alpha(alpha: float) -> None:
    """direct terms + α_j · w_j · g_j · a(σ_j) · Σ_{i active before j} g_i w_i c(σ_i)."""
    plan = flowbp.make_plan("flowbp-bridge", SIGMAS, 11, num_active=4, alpha=alpha, grad_rescale=0.0)
    j = plan.anchors[1]
    s = SIGMAS.tolist()
    w = {i: s[i + 1] - s[i] for i in range(10)}  # Euler weights, from the sigmas alone
    direct = sum(w[i] * c_of(s[i]) for i in plan.active)
    nested = alpha * w[j] * a_of(s[j]) * sum(w[i] * c_of(s[i]) for i in plan.active if i < j)
    field = LinearField(D)
    traj = flowbp.rollout(field, _noise(), SIGMAS)
    out = flowbp.surrogate(plan, traj, field)
    (grad,) = torch.autograd.grad(out.reward_input.sum(), [field.theta])
    torch.testing.assert_close(grad, torch.full((D,), B * (direct + nested), dtype=torch.float64))
    assert any(i < j for i in plan.active)  # the sampler guarantees a node before j ...
    if alpha > 0:
        assert nested != 0.0  # ... so the nested term is really tested


def test_leapalign_and_lagrange_single_nested_term() -> None:
    """Two-leap LeapAlign: ∂/∂θ = w_j c_j + w_k c_k + α w_j a_j w_k c_k, written out by hand."""
    plan = flowbp.make_plan("leapalign", SIGMAS, 3)
    k, j, n = plan.anchors
    s = SIGMAS.tolist()
    wk, wj = s[j] - s[k], s[n] - s[j]
    expected = wj * c_of(s[j]) + wk * c_of(s[k]) + plan.alpha(j) * wj * a_of(s[j]) * wk * c_of(s[k])
    field = LinearField(D)
    traj = flowbp.rollout(field, _noise(), SIGMAS)
    (grad,) = torch.autograd.grad(flowbp.surrogate(plan, traj, field).reward_input.sum(), [field.theta])
    torch.testing.assert_close(grad, torch.full((D,), B * expected, dtype=torch.float64))



def _lagrange_weights_by_polyfit(s: list[float], nodes: list[int], start: int, end: int) -> list[float]:
    """∫_{σ_start}^{σ_end} of each Lagrange basis polynomial on the support sigmas (numpy, not flowbp)."""
    out = []
    for i in range(len(nodes)):
        basis = np.polynomial.Polynomial.fit([s[k] for k in nodes], np.eye(len(nodes))[i], len(nodes) - 1)
        prim = basis.integ()
        out.append(float(prim(s[end]) - prim(s[start])))
    return out


def _rescale(weights: list[float], active_positions: list[int], strength: float) -> float:
    return 1 + strength * (sum(map(abs, weights)) / sum(abs(weights[p]) for p in active_positions) - 1)


def test_default_lagrange_plan_gradient_derived_from_the_sigmas_alone() -> None:
    """One default FlowBP-Lagrange plan at N = 25, SD3 shift: supports, weights, scales and the nested term by hand.

    Defaults: lagrange(3) supports = start, the middle node, the last node of [start, end) (np.rint of
    linspace(0, L−1, 3)); active = start + the interior node (support_mode midpoint, max 2); interior backward
    × support_scale 0.25; grad_rescale 0.5 per segment; α_j = 0.1. Only k and j are read from the plan.
    """
    sigmas = shifted(25)
    s = sigmas.tolist()
    plan = flowbp.make_plan("flowbp-lagrange", sigmas, torch.Generator().manual_seed(114))
    k, j, n = plan.anchors
    total = 0.0
    s_j = 0.0
    for start, end in ((k, j), (j, n)):
        length = end - start
        nodes = list(range(start, end)) if length <= 3 else [start, start + int(np.rint((length - 1) / 2)), end - 1]
        w = _lagrange_weights_by_polyfit(s, nodes, start, end)
        act = [0, 1][: len(nodes)]
        f = _rescale(w, act, 0.5)
        coeff = {nodes[0]: f * w[0]}
        if len(nodes) > 1:
            coeff[nodes[1]] = f * 0.25 * w[1]
        assert sorted(coeff) == [i for i in plan.active if start <= i < end]
        seg_sum = sum(c * c_of(s[i]) for i, c in coeff.items())
        if start == k:
            s_j = seg_sum
            total += seg_sum
        else:  # v_j sees x̃_j with α = 0.1: its input carries s_j, multiplied by a(σ_j)
            total += seg_sum + 0.1 * coeff[j] * a_of(s[j]) * s_j
    field = LinearField(D)
    traj = flowbp.rollout(field, _noise(), sigmas)
    (grad,) = torch.autograd.grad(flowbp.surrogate(plan, traj, field).reward_input.sum(), [field.theta])
    torch.testing.assert_close(grad, torch.full((D,), B * total, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_default_bridge_plan_gradient_derived_from_the_sigmas_alone() -> None:
    """One default FlowBP-Bridge plan at N = 25, SD3 shift: K = 5, grad_rescale 1, α_j = 0.1, Euler weights.

    g = Σ_i |Δ_i| / Σ_{i active} |Δ_i| (one factor over the whole window = 1 / Σ_active |Δ_i|);
    ∂x_N/∂θ = Σ_{i active} g Δ_i c(σ_i) + α g Δ_j a(σ_j) · Σ_{i active, i < j} g Δ_i c(σ_i).
    Only j and the active set are read from the plan.
    """
    sigmas = shifted(25)
    s = sigmas.tolist()
    plan = flowbp.make_plan("flowbp-bridge", sigmas, torch.Generator().manual_seed(114))
    j, active = plan.anchors[1], plan.active
    delta = [s[i + 1] - s[i] for i in range(25)]
    g = sum(abs(d) for d in delta) / sum(abs(delta[i]) for i in active)
    direct = sum(g * delta[i] * c_of(s[i]) for i in active)
    before = [i for i in active if i < j]
    assert before and j in active and len(active) == 5
    nested = 0.1 * g * delta[j] * a_of(s[j]) * sum(g * delta[i] * c_of(s[i]) for i in before)
    field = LinearField(D)
    traj = flowbp.rollout(field, _noise(), sigmas)
    (grad,) = torch.autograd.grad(flowbp.surrogate(plan, traj, field).reward_input.sum(), [field.theta])
    torch.testing.assert_close(grad, torch.full((D,), B * (direct + nested), dtype=torch.float64), rtol=1e-9,
                               atol=1e-12)


def test_renoised_inputs_value_and_gradient() -> None:
    """DRaFT-LV's extra input x' − σ_{N−1} v(x'): d/dθ = −σ_{N−1} c(σ_{N−1}) on the linear field."""
    plan = flowbp.make_plan("draft-lv", SIGMAS, 0, num_noised=2)
    field = LinearField(D)
    traj = flowbp.rollout(field, _noise(), SIGMAS)
    out = flowbp.surrogate(plan, traj, field, generator=torch.Generator().manual_seed(5))
    assert len(out.inputs) == 3
    s = float(SIGMAS[-2])
    eps = torch.randn(B, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_noisy = (1 - s) * traj.sample + s * eps
    torch.testing.assert_close(out.extra_inputs[0], x_noisy - s * field(x_noisy, s))
    (grad,) = torch.autograd.grad(out.extra_inputs[1].sum(), [field.theta])
    torch.testing.assert_close(grad, torch.full((D,), -B * s * c_of(s), dtype=torch.float64))


def _functional_surrogate(plan: Plan, traj, field: MLPField, params: dict[str, torch.Tensor]):
    """The surrogate written as an ordinary function of θ (stop-gradients frozen at θ_0's values).

    Independent of the engine's detach tricks: sg(·) terms are constants taken from the cached rollout,
    so a finite difference of this function is the gradient the engine must produce.
    """
    lat, vel, sig = traj.latents, traj.velocities, plan.sigmas

    def v(x, s):
        return torch.func.functional_call(field, params, (x, s))

    x_tilde = {plan.anchors[0]: lat[plan.anchors[0]]}  # value-offset form: x̃(θ) = x + (x̂(θ) − x̂(θ_0))
    x_hat_0 = {}
    for seg_idx, seg in enumerate(plan.segments):
        x_hat = x_tilde[seg.start]
        base = lat[seg.start]
        for i, w in zip(seg.support, seg.weights, strict=True):
            if i in plan.active:
                u = lat[i] + plan.alpha(i) * (x_tilde[i] - lat[i]) if i in x_tilde else lat[i]
                vi = vel[i] + plan.grad_scale[i] * (v(u, sig[i]) - vel[i])
            else:
                vi = vel[i]
            x_hat = x_hat + w * vi
            base = base + w * vel[i]
        x_hat_0[seg.end] = base
        if seg_idx == len(plan.segments) - 1 and not plan.final_connector:
            return x_hat
        x_tilde[seg.end] = lat[seg.end] + (x_hat - base)
    return x_tilde[plan.anchors[-1]]


@pytest.mark.parametrize("plan", PLANS, ids=_plan_id)
def test_gradient_matches_finite_differences_on_nonlinear_field(plan: Plan) -> None:
    field = MLPField(D)
    traj = flowbp.rollout(field, _noise(), SIGMAS)
    weights = torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    plan = dataclasses.replace(plan, renoised=0)
    out = flowbp.surrogate(plan, traj, field)
    grads = torch.autograd.grad((weights * out.reward_input).sum(), list(field.parameters()))
    params = dict(field.named_parameters())
    directions = {
        k: torch.randn(p.shape, generator=torch.Generator().manual_seed(9), dtype=p.dtype)
        for k, p in params.items()
    }
    eps = 1e-6
    with torch.no_grad():
        plus = {k: p + eps * directions[k] for k, p in params.items()}
        minus = {k: p - eps * directions[k] for k, p in params.items()}
        f_plus = (weights * _functional_surrogate(plan, traj, field, plus)).sum()
        f_minus = (weights * _functional_surrogate(plan, traj, field, minus)).sum()
    fd = float((f_plus - f_minus) / (2 * eps))
    analytic = sum(float((g * directions[k]).sum()) for g, k in zip(grads, params, strict=True))
    assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------------------- 3. exact backprop
def _plain_sampler(field, noise, sigmas):
    x = noise
    for i in range(len(sigmas) - 1):
        x = x + float(sigmas[i + 1] - sigmas[i]) * field(x, float(sigmas[i]))
    return x


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("n", [5, 12])
def test_all_nodes_alpha_one_equals_autograd_through_sampler(checkpoint: bool, n: int) -> None:
    sigmas = shifted(n)
    field = MLPField(D, seed=2)
    noise = _noise()
    weights = torch.randn(B, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = torch.autograd.grad(
        (weights * _plain_sampler(field, noise, sigmas)).sum(), list(field.parameters())
    )
    plan = flowbp.make_plan("alignprop", sigmas, 0, checkpoint=checkpoint)
    assert plan.grad_forwards == n and plan.chain_depth == n - 1
    traj = flowbp.rollout(field, noise, sigmas)
    out = flowbp.surrogate(plan, traj, field)
    got = torch.autograd.grad((weights * out.reward_input).sum(), list(field.parameters()))
    for g, e in zip(got, exact, strict=True):
        assert (g - e).norm() / e.norm() <= 1e-6
    # DRaFT-K with K = N is the same plan
    draft = flowbp.make_plan("draft-k", sigmas, 0, k=n)
    assert (draft.anchors, draft.active, draft.coupling) == (plan.anchors, plan.active, plan.coupling)


@pytest.mark.parametrize("seed", range(4))
def test_truncated_alignprop_equals_autograd_through_the_truncated_sampler(seed: int) -> None:
    """Random truncation K: the gradient is autograd through the last K sampler steps from the detached x_{N−K}."""
    field = MLPField(D, seed=3)
    noise = _noise()
    weights = torch.randn(B, D, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    plan = flowbp.make_plan("alignprop", SIGMAS, seed, truncation=True, checkpoint=seed % 2 == 0)
    k = len(plan.active)
    assert plan.active == tuple(range(10 - k, 10)) and plan.chain_depth == k - 1
    traj = flowbp.rollout(field, noise, SIGMAS)
    x = traj.latents[10 - k].detach()
    for i in range(10 - k, 10):
        x = x + float(SIGMAS[i + 1] - SIGMAS[i]) * field(x, float(SIGMAS[i]))
    exact = torch.autograd.grad((weights * x).sum(), list(field.parameters()))
    out = flowbp.surrogate(plan, traj, field)
    got = torch.autograd.grad((weights * out.reward_input).sum(), list(field.parameters()))
    for g, e in zip(got, exact, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- 4. memory
def _saved_bytes(plan: Plan, n: int, dim: int = 64) -> int:
    sigmas = shifted(n)
    field = MLPField(dim, hidden=128, dtype=torch.float32)
    traj = flowbp.rollout(field, torch.randn(8, dim), sigmas)
    exclude = [*field.parameters(), traj.latents, traj.velocities]
    with saved_tensor_bytes(exclude=exclude) as meter:
        out = flowbp.surrogate(plan, traj, field, generator=torch.Generator().manual_seed(0))
    out.reward_input.sum().backward()
    return meter.total


@pytest.mark.parametrize(
    "method", ["flowbp-sparse", "flowbp-bridge", "flowbp-lagrange", "leapalign", "refl", "drtune", "draft-lv"]
)
def test_saved_bytes_independent_of_num_steps(method: str) -> None:
    sizes = []
    for n in (10, 25, 50):
        overrides = {"num_active": 3} if method in ("flowbp-sparse", "flowbp-bridge") else {}
        plan = flowbp.make_plan(method, shifted(n), 0, **overrides)
        sizes.append((plan.grad_forwards, _saved_bytes(plan, n)))
    assert len({fwd for fwd, _ in sizes}) == 1
    assert len({b for _, b in sizes}) == 1, sizes
    assert sizes[0][1] > 0


def test_saved_bytes_proportional_to_grad_forwards() -> None:
    unit = _saved_bytes(flowbp.make_plan("flowbp-sparse", shifted(25), 0, num_active=1), 25)
    for k in (2, 4, 8):
        plan = flowbp.make_plan("flowbp-sparse", shifted(25), 0, num_active=k)
        assert _saved_bytes(plan, 25) == k * unit
    # full backprop without checkpointing grows with N; with checkpointing each call keeps only its input
    # (every coupled call also keeps its input u = x + α(x̃ − sg x̃), a new 8×64 float32 tensor)
    coupled_input = 8 * 64 * 4
    for n in (10, 20):
        full = _saved_bytes(flowbp.make_plan("alignprop", shifted(n), 0, checkpoint=False), n)
        assert full == n * unit + (n - 1) * coupled_input
    ckpt = _saved_bytes(flowbp.make_plan("alignprop", shifted(10), 0, checkpoint=True), 10)
    assert ckpt == 9 * coupled_input  # only the (new) inputs of the checkpointed calls


# ---------------------------------------------------------------------------- 5. chain depth
@pytest.mark.parametrize("seed", range(5))
def test_chain_depth(seed: int) -> None:
    for method in ("flowbp-sparse", "flowbp-bridge", "flowbp-lagrange", "leapalign"):
        assert flowbp.make_plan(method, shifted(25), seed).chain_depth <= 1
    for k in range(1, 7):
        assert flowbp.make_plan("draft-k", shifted(25), seed, k=k).chain_depth == k - 1
    assert flowbp.make_plan("alignprop", shifted(25), seed).chain_depth == 24
    assert flowbp.make_plan("flowbp-bridge", shifted(25), seed, alpha=0.0).chain_depth == 0


class ScaledLinearField(LinearField):
    """v = λ·a(σ)·x + c(σ)·θ: each Jacobian ∂v/∂x on a gradient path contributes one factor λ."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.lam = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.lam * a_of(sigma) * x + c_of(sigma) * self.theta


def _jacobian_power(plan: Plan) -> int:
    """The degree in λ of ∂L/∂θ, counted on the engine's actual autograd graph (the longest Jacobian chain).

    ∂L/∂θ is a polynomial in λ whose degree is the number of ∂v/∂x factors on the longest path: differentiate
    it w.r.t. λ until the result is identically zero (or no longer depends on λ at all).
    """
    field = ScaledLinearField(D)
    traj = flowbp.rollout(field, _noise(), plan.sigmas)
    out = flowbp.surrogate(plan, traj, field, generator=torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad(out.reward_input.sum(), [field.theta], create_graph=True)
    value = g.sum()
    for power in range(plan.num_steps + 1):
        if not value.requires_grad:
            return power
        (d,) = torch.autograd.grad(value, [field.lam], create_graph=True, allow_unused=True)
        if d is None or float(d.detach().abs()) < 1e-13:
            return power
        value = d
    raise AssertionError("degree above N")


@pytest.mark.parametrize("seed", range(3))
def test_chain_depth_equals_jacobian_powers_in_the_autograd_graph(seed: int) -> None:
    sigmas = shifted(8)
    cases = [
        flowbp.make_plan("flowbp-sparse", sigmas, seed),
        flowbp.make_plan("flowbp-bridge", sigmas, seed),
        flowbp.make_plan("flowbp-bridge", sigmas, seed, alpha=0.0),
        flowbp.make_plan("flowbp-lagrange", sigmas, seed),
        flowbp.make_plan("leapalign", sigmas, seed),
        flowbp.make_plan("drtune", sigmas, seed),
        flowbp.make_plan("refl", sigmas, seed),
        flowbp.make_plan("alignprop", sigmas, seed, checkpoint=False),
        flowbp.make_plan("alignprop", sigmas, seed, truncation=True),
        *[flowbp.make_plan("draft-k", sigmas, seed, k=k) for k in (1, 3, 5)],
    ]
    for plan in cases:
        assert _jacobian_power(plan) == plan.chain_depth, (plan.method, plan.anchors, plan.coupling)
    assert _jacobian_power(cases[-1]) == 4 and _jacobian_power(cases[7]) == 7


# ---------------------------------------------------------------------------- 7. determinism
@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_plan(method: str) -> None:
    a = flowbp.make_plan(method, shifted(25), torch.Generator().manual_seed(114))
    b = flowbp.make_plan(method, shifted(25), torch.Generator().manual_seed(114))
    assert a == b and a.describe() == b.describe()


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_different_seeds_differ(method: str) -> None:
    plans = {_plan_id(flowbp.make_plan(method, shifted(25), seed)) for seed in range(8)}
    assert len(plans) > 1


def test_generator_stream_gives_fresh_plans_each_step() -> None:
    g = torch.Generator().manual_seed(0)
    ids = [_plan_id(flowbp.make_plan("leapalign", shifted(25), g)) for _ in range(6)]
    assert len(set(ids)) > 1
    g2 = torch.Generator().manual_seed(0)
    assert ids == [_plan_id(flowbp.make_plan("leapalign", shifted(25), g2)) for _ in range(6)]


# ---------------------------------------------------------------------------- misc semantics
def test_euler_segments_reproduce_cached_latents_and_similarity_weight() -> None:
    field = MLPField(D)
    traj = flowbp.rollout(field, _noise(), SIGMAS)
    out = flowbp.surrogate(flowbp.make_plan("flowbp-bridge", SIGMAS, 0), traj, field)
    for d in out.deviations.values():
        assert float(d.max()) < 1e-12
    la = flowbp.make_plan("leapalign", SIGMAS, 2, tau=1e-4)
    out = flowbp.surrogate(la, traj, field)
    j = la.anchors[1]
    d_j = (
        traj.latents[j]
        - traj.latents[la.anchors[0]]
        - la.segments[0].weights[0] * traj.velocities[la.anchors[0]]
    )
    d_0 = traj.sample - traj.latents[j] - la.segments[1].weights[0] * traj.velocities[j]
    d_j, d_0 = d_j.abs().mean(1), d_0.abs().mean(1)
    torch.testing.assert_close(out.deviations[j], d_j)
    torch.testing.assert_close(out.sample_weights, 1.0 / (d_j.clamp(min=1e-4) + d_0.clamp(min=1e-4)))
    big_tau = flowbp.surrogate(dataclasses.replace(la, similarity_tau=100.0), traj, field)
    torch.testing.assert_close(big_tau.sample_weights, torch.full((B,), 1 / 200.0, dtype=torch.float64))


def test_coupled_nodes() -> None:
    la = flowbp.make_plan("leapalign", shifted(25), 0)
    assert la.coupled_nodes == {la.anchors[1]}
    assert flowbp.make_plan("leapalign", shifted(25), 0, alpha=0.0).coupled_nodes == frozenset()
    assert flowbp.make_plan("alignprop", shifted(25), 0).coupled_nodes == frozenset(range(1, 25))
    assert flowbp.make_plan("flowbp-sparse", shifted(25), 0).coupled_nodes == frozenset()


# ---------------------------------------------------------------------------- coarse-leap (beyond the paper)
@pytest.mark.parametrize("placement", ["sigma", "index", "stratified"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_coarse_leap_is_autograd_through_the_coarse_euler_sampler_on_a_linear_field(placement: str, k: int) -> None:
    """Coarse-leap's gradient is that of a K-step Euler sampler over its anchors, written as a plain loop.

    On v = a(σ)x + c(σ)θ the θ-gradient of any sampler depends only on the σ's it visits (∂v/∂x = a, ∂v/∂θ = c),
    so the coarse sampler x_{l+1} = x_l + (σ_{a_{l+1}} − σ_{a_l})·v(x_l, σ_{a_l}), run from x_{a_0} with
    autograd, is an independent reference.
    """
    sigmas = shifted(12)
    plan = flowbp.make_plan("coarse-leap", sigmas, 3, num_active=k, placement=placement)
    assert plan.grad_forwards == k and plan.chain_depth == k - 1
    field = LinearField(D)
    traj = flowbp.rollout(field, _noise(), sigmas)
    weights = torch.randn(B, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out = flowbp.surrogate(plan, traj, field)
    torch.testing.assert_close(out.reward_input, traj.sample)  # forward value: the cached sample
    (grad,) = torch.autograd.grad((weights * out.reward_input).sum(), [field.theta])
    s = sigmas.tolist()
    x = traj.latents[plan.anchors[0]].detach()
    for a, b in zip(plan.anchors, plan.anchors[1:], strict=False):
        x = x + (s[b] - s[a]) * field(x, s[a])
    (expected,) = torch.autograd.grad((weights * x).sum(), [field.theta])
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert _jacobian_power(plan) == plan.chain_depth


def test_coarse_leap_placement_saved_bytes_and_determinism() -> None:
    sizes = set()
    for n in (10, 25, 50):
        plan = flowbp.make_plan("coarse-leap", shifted(n, 1.0), 0)
        # equal σ-length strata on a linear grid: anchors at σ = 1, ¾, ½, ¼ (to the grid), all active
        assert [round(plan.sigmas[a] * 4) / 4 for a in plan.anchors[:-1]] == [1.0, 0.75, 0.5, 0.25]
        assert plan.active == plan.anchors[:-1] and set(plan.coupling) == set(plan.anchors[1:-1])
        assert plan == flowbp.make_plan("coarse-leap", shifted(n, 1.0), 99)  # deterministic: no draw variance
        sizes.add(_saved_bytes(flowbp.make_plan("coarse-leap", shifted(n), 0), n))
    assert len(sizes) == 1  # activation memory of K = 4 grad forwards, whatever N
    unit = _saved_bytes(flowbp.make_plan("flowbp-sparse", shifted(25), 0, num_active=1), 25)
    coupled_input = 8 * 64 * 4  # each coupled call keeps its new input u (as in the alignprop check above)
    assert sizes == {4 * unit + 3 * coupled_input}
    with pytest.raises(ValueError, match="placement: got 'middle'; allowed: sigma, index, stratified"):
        flowbp.make_plan("coarse-leap", shifted(25), 0, placement="middle")
