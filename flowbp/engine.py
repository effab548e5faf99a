"""Executes a plan on a cached trajectory: the only place where gradients are routed (DESIGN.md 3.2).

Semantics (sg = detach, scale(v, g) = sg(v) + g·(v − sg(v))):

    x̃_{a_0} = sg(x_{a_0})
    x̂_{a_l} = x̃_{a_{l-1}} + Σ_{i∈S_l} w_i · ṽ_i
    x̃_{a_l} = x̂_{a_l} + sg(x_{a_l} − x̂_{a_l})           connector: forward value = cached latent
    ṽ_i = sg(v_i)                          i not active
    ṽ_i = scale(v_θ(u_i, σ_i), g_i)         i active
    u_i = sg(x_i) + α_i · (x̃_i − sg(x̃_i))  (α_i > 0 only at anchors; otherwise u_i = sg(x_i))

Every operation here is linear with scalar coefficients, so the engine itself saves no tensor for
backward: activation memory is exactly that of the grad forwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from flowbp.plan import Plan
from flowbp.trajectory import Trajectory

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass
class SurrogateOutput:
    """What the reward sees and how the loss is weighted.

    ``reward_input``: forward value = cached sample (endpoint) or posterior mean; gradient = the plan's.
    ``extra_inputs``: DRaFT-LV's renoised inputs, each scored and averaged with the base input.
    ``sample_weights``: per-sample loss weights (float64, detached; ones unless ``similarity``).
    ``deviations``: connector deviation d_a = mean |x_a − x̂_a| per sample, for each applied connector.
    """

    plan: Plan
    reward_input: torch.Tensor
    extra_inputs: tuple[torch.Tensor, ...]
    sample_weights: torch.Tensor
    deviations: dict[int, torch.Tensor]

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.reward_input, *self.extra_inputs)


def _scale_backward(v: torch.Tensor, g: float) -> torch.Tensor:
    """scale(v, g) = sg(v) + g·(v − sg(v)): same value, gradient × g (a hook: no extra forward work)."""
    if g != 1.0 and v.requires_grad:
        v = v.view_as(v)  # a fresh node, so the hook cannot touch another use of the same tensor
        v.register_hook(lambda grad: grad * g)
    return v


def _weighted_sum(stack: torch.Tensor, nodes: list[int], weights: list[float]) -> torch.Tensor | None:
    """Σ_i w_i · stack[i] over the cached (constant) velocities of a segment, as one fused reduction.

    An Euler segment has up to N cached terms: one tensordot reads them once instead of building N
    intermediate tensors (and N autograd-free adds). Accumulates in at least float32.
    """
    if not nodes:
        return None
    if len(nodes) == 1:
        return weights[0] * stack[nodes[0]].detach()
    first = nodes[0]
    contiguous = nodes == list(range(first, first + len(nodes)))
    terms = stack[first : first + len(nodes)] if contiguous else stack[nodes]
    acc_dtype = torch.promote_types(terms.dtype, torch.float32)
    w = torch.tensor(weights, dtype=acc_dtype, device=terms.device)
    return torch.tensordot(w, terms.detach().to(acc_dtype), dims=1).to(terms.dtype)


def _connector_gap(cached: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """mean |x − x̂| over all but the batch axis, float64, detached."""
    diff = (cached.detach().to(torch.float64) - estimate.detach().to(torch.float64)).abs()
    return diff.flatten(1).mean(1) if diff.dim() > 1 else diff


def check_compatible(plan: Plan, trajectory: Trajectory) -> None:
    if plan.num_steps != trajectory.num_steps:
        raise ValueError(
            f"trajectory: has N={trajectory.num_steps} steps but the plan was built for N={plan.num_steps}"
        )
    plan_sigmas = torch.tensor(plan.sigmas, dtype=torch.float64)
    if not torch.allclose(plan_sigmas, trajectory.sigmas.to(torch.float64), rtol=0, atol=1e-9):
        raise ValueError("trajectory: its sigma grid differs from the plan's (build the plan from trajectory.sigmas)")


def surrogate(
    plan: Plan,
    trajectory: Trajectory,
    velocity: VelocityFn,
    generator: torch.Generator | None = None,
) -> SurrogateOutput:
    """Build the differentiable surrogate of ``trajectory`` described by ``plan``.

    ``velocity(x, sigma)`` must be the same function the rollout used, now with gradients enabled
    for the parameters being trained. ``generator`` draws the noise of renoised inputs (DRaFT-LV).
    """
    check_compatible(plan, trajectory)
    lat, vel, sig = trajectory.latents, trajectory.velocities, plan.sigmas
    active = set(plan.active)

    def call(u: torch.Tensor, sigma: float) -> torch.Tensor:
        if plan.checkpoint and torch.is_grad_enabled():
            return _checkpoint(velocity, u, sigma, use_reentrant=False)
        return velocity(u, sigma)

    x_tilde: dict[int, torch.Tensor] = {plan.anchors[0]: lat[plan.anchors[0]].detach()}
    deviations: dict[int, torch.Tensor] = {}
    out = x_tilde[plan.anchors[0]]
    last = len(plan.segments) - 1
    for k, seg in enumerate(plan.segments):
        x_hat = x_tilde[seg.start]
        cached = [(i, w) for i, w in zip(seg.support, seg.weights, strict=True) if i not in active]
        constant = _weighted_sum(vel, [i for i, _ in cached], [w for _, w in cached])
        if constant is not None:
            x_hat = x_hat + constant
        for i, w in zip(seg.support, seg.weights, strict=True):
            if i not in active:
                continue
            u = lat[i].detach()
            alpha = plan.alpha(i)
            if alpha > 0 and i in x_tilde and x_tilde[i].requires_grad:
                # Forward value stays x_i; backward sends α·(∂v/∂x)ᵀ into x̃_i.
                u = u + alpha * (x_tilde[i] - x_tilde[i].detach())
            x_hat = x_hat + w * _scale_backward(call(u, float(sig[i])), plan.grad_scale[i])
        if k == last and not plan.final_connector:
            out = x_hat
            break
        target = lat[seg.end].detach()
        deviations[seg.end] = _connector_gap(target, x_hat)
        x_tilde[seg.end] = x_hat + (target - x_hat).detach()
        out = x_tilde[seg.end]

    extra: list[torch.Tensor] = []
    if plan.renoised:
        # DRaFT-LV: re-noise the sample to σ_{N-1} and take a fresh one-step denoise from there.
        s = float(sig[-2])
        base = lat[-1].detach()
        for _ in range(plan.renoised):
            eps = torch.randn(base.shape, generator=generator, dtype=base.dtype, device="cpu").to(base.device)
            x_noisy = (1.0 - s) * base + s * eps
            extra.append(x_noisy - s * call(x_noisy, s))

    weights = torch.ones(out.shape[0], dtype=torch.float64, device=out.device)
    if plan.sample_weight == "similarity":
        tau = plan.similarity_tau
        if not deviations:
            raise ValueError("sample_weight: 'similarity' needs at least one connector in the plan")
        # w_b = 1 / Σ_connectors max(d, τ): for the two connectors of LeapAlign / Lagrange this is
        # 1 / (max(d_j, τ) + max(d_0, τ)).
        weights = 1.0 / sum(d.clamp(min=tau) for d in deviations.values())
    return SurrogateOutput(plan, out, tuple(extra), weights.detach(), deviations)
