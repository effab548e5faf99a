"""How good is a surrogate gradient? Fidelity, explosion, connector deviation and cost against exact backprop.

Everything here works on one *gradient problem*: a velocity function whose parameters we differentiate, a cached
trajectory of it, and a loss of the reward input(s). On it:

- :func:`exact_gradient` is ∂L/∂θ through all N Euler steps — the ``alignprop`` plan without checkpointing
  (α = 1 everywhere), which the engine tests prove equals autograd through the plain sampler;
- :func:`surrogate_gradient` is the gradient a method's plan produces on the *same* batch and loss;
- :func:`fidelity` compares the two over R draws of the method's randomness: the cosine of a single draw, the
  cosine of the mean over draws (the method's bias) and the norm ratio ‖ĝ‖/‖g‖;
- :func:`per_step_contributions` splits the exact gradient into the part that flows through each velocity call
  (the gradient-explosion picture: where the exact gradient's mass sits along the trajectory);
- :func:`connector_deviations` gives d_a = mean |x_a − x̂_a| of a plan's connectors without a single model call;
- :func:`saved_bytes` and :func:`time_step_vs_rollout` measure activation memory and the cost of a training step.

The code is device-agnostic (CPU or CUDA): flattened gradients are float64 on the parameters' device. Results are
plain Python numbers so that benchmarks can dump them as JSON; confidence intervals reuse
:func:`flowbp.stats.mean_ci` (Student-t over i.i.d. batches).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from flowbp.engine import SurrogateOutput, VelocityFn, surrogate
from flowbp.memory import saved_tensor_bytes
from flowbp.methods import make_plan
from flowbp.plan import Plan
from flowbp.stats import mean_ci
from flowbp.trajectory import Trajectory, rollout

#: ``loss_fn(reward_inputs, sample_weights) -> scalar``. ``reward_inputs`` is the surrogate's base input followed
#: by any extra (renoised) inputs; ``sample_weights`` the plan's per-sample weights (float64, detached).
LossFn = Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor]

#: ``plan_fn(generator) -> Plan``: one draw of a method's plan (the generator carries its randomness).
PlanFn = Callable[[torch.Generator], Plan]


# ---------------------------------------------------------------------------------------------- vector metrics
def flatten_grads(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    """One float64 vector of all gradients, in parameter order; a ``None`` (unused parameter) counts as zeros.

    Float64 because cosines between nearly parallel vectors of ~10⁵–10⁶ entries lose digits in float32.
    """
    if len(grads) != len(params):
        raise ValueError(f"grads: got {len(grads)} gradients for {len(params)} parameters")
    parts = [
        (torch.zeros(p.numel(), dtype=torch.float64, device=p.device) if g is None else g.detach().double().flatten())
        for g, p in zip(grads, params, strict=True)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def gradient(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """∂loss/∂params as one flat float64 vector (parameters the loss does not reach get zeros)."""
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return flatten_grads(grads, params)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos∠(a, b) of two flat vectors; 0 when either is zero (no direction to agree with)."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(torch.dot(a, b)) / (na * nb)


def norm_ratio(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """‖estimate‖ / ‖reference‖ (inf when the reference is zero and the estimate is not)."""
    ne, nr = float(estimate.double().norm()), float(reference.double().norm())
    if nr == 0.0:
        return 0.0 if ne == 0.0 else math.inf
    return ne / nr


# ---------------------------------------------------------------------------------------------- the problem
@dataclass
class GradientProblem:
    """One batch: what is differentiated (``params``), along which cached rollout, with which loss.

    ``velocity`` must be the function that produced ``trajectory`` (a backbone's ``velocity_fn`` with prompts and
    guidance bound in); ``params`` are the tensors the gradient is taken with respect to (they must require grad).
    """

    velocity: VelocityFn
    trajectory: Trajectory
    params: list[torch.Tensor]
    loss_fn: LossFn

    @property
    def sigmas(self) -> torch.Tensor:
        return self.trajectory.sigmas

    @property
    def num_steps(self) -> int:
        return self.trajectory.num_steps

    def surrogate_loss(
        self, plan: Plan, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, SurrogateOutput]:
        out = surrogate(plan, self.trajectory, self.velocity, generator=generator)
        weights = out.sample_weights.to(out.reward_input.device)
        return self.loss_fn(out.inputs, weights), out


def surrogate_gradient(
    problem: GradientProblem, plan: Plan, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, SurrogateOutput]:
    """The method's gradient of the problem's loss (flat, float64) and the surrogate it came from."""
    loss, out = problem.surrogate_loss(plan, generator)
    return gradient(loss, problem.params), out


def exact_plan(sigmas: Sequence[float] | torch.Tensor) -> Plan:
    """Full backprop through all N steps: every node active, leap (= exact Euler) per step, α = 1 everywhere.

    Without checkpointing, so it is autograd through the plain sampler (DESIGN.md 3.5.3), and deterministic.
    """
    return make_plan("alignprop", sigmas, 0, checkpoint=False)


def exact_gradient(problem: GradientProblem) -> torch.Tensor:
    """The true ∂L/∂θ of the problem (no sample weights: the exact plan's are ones)."""
    grad, _ = surrogate_gradient(problem, exact_plan(problem.sigmas))
    return grad


# ---------------------------------------------------------------------------------------------- explosion
@dataclass
class StepContributions:
    """The exact gradient split by the velocity call it flows through: g = Σ_i g_i.

    ``norms[i]`` = ‖g_i‖, ``cosines[i]`` = cos(g_i, reference or g), ``total`` = Σ_i g_i (equals
    :func:`exact_gradient`), ``vectors`` the (N, P) stack of g_i when requested (P can be large: off by default).
    """

    norms: list[float]
    cosines: list[float]
    total: torch.Tensor
    vectors: torch.Tensor | None = None


def per_step_contributions(
    problem: GradientProblem, reference: torch.Tensor | None = None, keep_vectors: bool = False
) -> StepContributions:
    """Split the exact gradient into the part that enters through each step's θ-dependence.

    With x_{i+1} = x_i + Δ_i v_θ(x_i, σ_i) and λ_i = ∂L/∂x_i (the adjoint along the full x-chain),

        ∂L/∂θ = Σ_i g_i,   g_i = Δ_i · (∂v_θ(x_i, σ_i)/∂θ)ᵀ λ_{i+1}.

    g_i is what one gets by giving θ only to call i while keeping every other call's x-dependence (the chain of
    Jacobians (I + Δ_k ∂v/∂x), k > i, is inside λ_{i+1}). λ comes from one backward through the differentiable
    sampler; each g_i from one more forward + vector-Jacobian product at the cached x_i, so memory stays that of
    the exact gradient plus one call. Sample weights are ones, as for :func:`exact_gradient`.

    ``cosines`` are taken against ``reference`` (pass the exact gradient to stream them) or, without one, against
    Σ_i g_i — which then needs every g_i in memory until the end (N × P floats).
    """
    traj, sig, n = problem.trajectory, problem.sigmas.tolist(), problem.num_steps
    x = traj.latents[0].detach()
    chain: list[torch.Tensor] = []
    for i in range(n):
        x = x + (sig[i + 1] - sig[i]) * problem.velocity(x, float(sig[i]))
        chain.append(x)
    if not chain[-1].requires_grad:
        raise ValueError("params: the velocity does not depend on any parameter that requires grad")
    ones = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    loss = problem.loss_fn((chain[-1],), ones)
    # λ_{i+1} = ∂L/∂x_{i+1}: the gradient w.r.t. an intermediate tensor is its full adjoint (all downstream paths).
    adjoints = torch.autograd.grad(loss, chain, allow_unused=True)
    del chain, x, loss
    keep = keep_vectors or reference is None
    total: torch.Tensor | None = None
    norms: list[float] = []
    cosines: list[float] = []
    vectors: list[torch.Tensor] = []
    for i in range(n):
        lam = adjoints[i]
        if lam is None:  # the loss does not depend on x_{i+1}
            g_i = flatten_grads([None] * len(problem.params), problem.params)
        else:
            v = problem.velocity(traj.latents[i].detach(), float(sig[i]))
            grads = torch.autograd.grad(
                v, problem.params, grad_outputs=(sig[i + 1] - sig[i]) * lam.to(v.dtype), allow_unused=True
            )
            g_i = flatten_grads(grads, problem.params)
        norms.append(float(g_i.norm()))
        if reference is not None:
            cosines.append(cosine(g_i, reference))
        total = g_i.clone() if total is None else total + g_i
        if keep:
            vectors.append(g_i)
    assert total is not None
    if reference is None:
        cosines = [cosine(v, total) for v in vectors]
    return StepContributions(
        norms=norms, cosines=cosines, total=total, vectors=torch.stack(vectors) if keep_vectors else None
    )


# ---------------------------------------------------------------------------------------------- fidelity
@dataclass
class DrawFidelity:
    """Fidelity of one method on one batch over R draws of its randomness (plans, renoise noise)."""

    cosines: list[float]  # cos(ĝ_r, g) per draw
    norm_ratios: list[float]  # ‖ĝ_r‖ / ‖g‖ per draw
    cosine_of_mean: float  # cos(mean_r ĝ_r, g): the direction the method follows on average (its bias)
    norm_of_mean_ratio: float  # ‖mean_r ĝ_r‖ / ‖g‖
    grad_norms: list[float]  # ‖ĝ_r‖
    exact_norm: float  # ‖g‖
    sample_weight: list[float] = field(default_factory=list)  # mean per-sample weight of each draw
    # Against the sampler's true gradient (no stop-gradient on the unconditional CFG branch), when given:
    cosines_true: list[float] = field(default_factory=list)
    norm_ratios_true: list[float] = field(default_factory=list)
    cosine_of_mean_true: float | None = None

    @property
    def cosine(self) -> float:
        """Mean single-draw cosine."""
        return statistics.fmean(self.cosines)

    @property
    def norm_ratio(self) -> float:
        """Mean single-draw norm ratio."""
        return statistics.fmean(self.norm_ratios)


def fidelity(
    problem: GradientProblem,
    exact: torch.Tensor,
    plan_fn: PlanFn,
    draws: int,
    generator: torch.Generator,
    true_exact: torch.Tensor | None = None,
) -> DrawFidelity:
    """Compare ``draws`` surrogate gradients of ``plan_fn``'s plans with the exact gradient ``exact``.

    ``exact`` is the gradient of the training objective (for CFG: the unconditional branch detached, as the
    paper trains); ``true_exact``, when given, is a second reference — the plain sampler's true gradient with
    nothing detached — and fills the ``*_true`` fields. ``generator`` drives both the plan draw and the
    renoise noise (DRaFT-LV), so a seed reproduces the table. Deterministic methods need only ``draws=1``.
    """
    if draws < 1:
        raise ValueError(f"draws: must be >= 1, got {draws}")
    cosines, ratios, norms, weights = [], [], [], []
    cos_true: list[float] = []
    ratios_true: list[float] = []
    total: torch.Tensor | None = None
    for _ in range(draws):
        plan = plan_fn(generator)
        g_hat, out = surrogate_gradient(problem, plan, generator)
        cosines.append(cosine(g_hat, exact))
        ratios.append(norm_ratio(g_hat, exact))
        if true_exact is not None:
            cos_true.append(cosine(g_hat, true_exact))
            ratios_true.append(norm_ratio(g_hat, true_exact))
        norms.append(float(g_hat.norm()))
        weights.append(float(out.sample_weights.mean()))
        total = g_hat if total is None else total + g_hat
    assert total is not None
    mean_grad = total / draws
    return DrawFidelity(
        cosines=cosines,
        norm_ratios=ratios,
        cosine_of_mean=cosine(mean_grad, exact),
        norm_of_mean_ratio=norm_ratio(mean_grad, exact),
        grad_norms=norms,
        exact_norm=float(exact.norm()),
        sample_weight=weights,
        cosines_true=cos_true,
        norm_ratios_true=ratios_true,
        cosine_of_mean_true=None if true_exact is None else cosine(mean_grad, true_exact),
    )


def summarize(values: Iterable[float]) -> dict[str, float]:
    """Mean and 95% Student-t CI (``n`` = number of values, e.g. batches) via ``mean_ci``."""
    return mean_ci(torch.tensor(list(values), dtype=torch.float64))


def summarize_fidelity(per_batch: Sequence[DrawFidelity]) -> dict[str, dict[str, float]]:
    """Per-batch fidelity -> mean and 95% CI over batches of each metric (batches are the i.i.d. unit)."""
    out = {
        "cosine": summarize(b.cosine for b in per_batch),
        "cosine_of_mean": summarize(b.cosine_of_mean for b in per_batch),
        "norm_ratio": summarize(b.norm_ratio for b in per_batch),
        "grad_norm": summarize(statistics.fmean(b.grad_norms) for b in per_batch),
        "exact_norm": summarize(b.exact_norm for b in per_batch),
        "sample_weight": summarize(statistics.fmean(b.sample_weight) for b in per_batch),
    }
    if all(b.cosines_true for b in per_batch):
        out["cosine_true"] = summarize(statistics.fmean(b.cosines_true) for b in per_batch)
        out["cosine_of_mean_true"] = summarize(float(b.cosine_of_mean_true or 0.0) for b in per_batch)
        out["norm_ratio_true"] = summarize(statistics.fmean(b.norm_ratios_true) for b in per_batch)
    return out


# ---------------------------------------------------------------------------------------------- connectors
def cached_velocity(trajectory: Trajectory) -> VelocityFn:
    """A velocity function that returns the cached v_i for σ_i: runs a plan's forward with no model call.

    The surrogate's forward value never depends on the network beyond the cached velocities (a re-forwarded
    velocity equals the cached one in value), so deviations computed with it are exactly the training ones.
    """
    index = {float(s): i for i, s in enumerate(trajectory.sigmas.tolist()[:-1])}

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        if float(sigma) not in index:
            raise ValueError(f"sigma: {sigma} is not a node of the cached trajectory")
        return trajectory.velocities[index[float(sigma)]]

    return velocity


@torch.no_grad()
def connector_deviations(plan: Plan, trajectory: Trajectory) -> dict[int, torch.Tensor]:
    """d_a = mean |x_a − x̂_a| per sample (float64) for every connector of ``plan`` on ``trajectory``.

    Keys are anchor nodes: for a k → j → N plan, ``{j: d_j, N: d_0}`` (d_0 in the paper's reverse indexing is
    the deviation at the clean endpoint). Plans with renoised inputs are evaluated without them.
    """
    if plan.renoised:
        import dataclasses

        plan = dataclasses.replace(plan, renoised=0)
    return surrogate(plan, trajectory, cached_velocity(trajectory)).deviations


# ---------------------------------------------------------------------------------------------- cost
def saved_bytes(
    problem: GradientProblem, plan: Plan, generator: torch.Generator | None = None
) -> dict[str, int]:
    """Activation memory of one surrogate gradient: bytes autograd saves for backward.

    ``surrogate``: the engine's re-forwards alone; ``step``: plus decode, reward and loss (what a training step
    holds). Parameters and the cached trajectory are excluded (resident anyway). With gradient checkpointing
    (AlignProp's default) only the checkpointed calls' inputs are counted; the one call recomputed during
    backward is not.
    """
    exclude = [*problem.params, problem.trajectory.latents, problem.trajectory.velocities]
    with saved_tensor_bytes(exclude=exclude) as engine_meter:
        out = surrogate(plan, problem.trajectory, problem.velocity, generator=generator)
    with saved_tensor_bytes(exclude=exclude) as loss_meter:
        loss = problem.loss_fn(out.inputs, out.sample_weights.to(out.reward_input.device))
    torch.autograd.grad(loss, problem.params, allow_unused=True)  # frees the graph
    return {"surrogate": engine_meter.total, "step": engine_meter.total + loss_meter.total}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepTiming:
    """Wall times of ``repeats`` interleaved (rollout, training step) pairs on the same batch."""

    rollout_s: list[float]
    step_s: list[float]

    @property
    def ratios(self) -> list[float]:
        return [s / r for s, r in zip(self.step_s, self.rollout_s, strict=True)]

    def summary(self) -> dict[str, float]:
        return {
            "rollout_s": statistics.median(self.rollout_s),
            "step_s": statistics.median(self.step_s),
            "ratio_median": statistics.median(self.ratios),
            **{f"ratio_{k}": v for k, v in summarize(self.ratios).items()},
        }


def time_step_vs_rollout(
    velocity: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    params: Sequence[torch.Tensor],
    loss_fn: LossFn,
    plan_fn: PlanFn,
    generator: torch.Generator,
    repeats: int = 3,
    warmup: int = 1,
) -> StepTiming:
    """Time one training step (rollout + surrogate + reward + backward) against the no-grad rollout alone.

    The two are measured in the same process, alternately (rollout, step, rollout, step, …), so that drift of a
    shared machine hits both; the ratio of each pair is the cost of a step in units of one sampling pass. The
    optimiser update is left out (the same for every method).
    """
    device = noise.device

    def one_rollout() -> Trajectory:
        return rollout(velocity, noise, sigmas)

    def one_step() -> None:
        traj = rollout(velocity, noise, sigmas)
        problem = GradientProblem(velocity, traj, list(params), loss_fn)
        loss, _ = problem.surrogate_loss(plan_fn(generator), generator)
        torch.autograd.grad(loss, list(params), allow_unused=True)

    for _ in range(warmup):
        one_rollout()
        one_step()
    timing = StepTiming([], [])
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        one_rollout()
        _sync(device)
        t1 = time.perf_counter()
        one_step()
        _sync(device)
        t2 = time.perf_counter()
        timing.rollout_s.append(t1 - t0)
        timing.step_s.append(t2 - t1)
    return timing


__all__ = [
    "DrawFidelity",
    "GradientProblem",
    "LossFn",
    "PlanFn",
    "StepContributions",
    "StepTiming",
    "cached_velocity",
    "connector_deviations",
    "cosine",
    "exact_gradient",
    "exact_plan",
    "fidelity",
    "flatten_grads",
    "gradient",
    "norm_ratio",
    "per_step_contributions",
    "saved_bytes",
    "summarize",
    "summarize_fidelity",
    "surrogate_gradient",
    "time_step_vs_rollout",
]
