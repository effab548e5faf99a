"""``flowbp bench``: gradient fidelity, explosion, connector deviation, cost and sample efficiency of every method.

On the digits testbed the exact full-backprop gradient is cheap, so every registered method (at the paper's
defaults, plus active-set sweeps) is measured against the truth on the same batches:

- ``fidelity``  cosine of a single draw and of the mean over R draws (bias), norm ratio ‖ĝ‖/‖g‖, 95% CIs over
  batches, for N ∈ {10, 25, 50} sampling steps;
- ``explosion`` the exact gradient split by step (the part entering through each velocity call) and every
  method's gradient norm as N grows (computed in the same pass as ``fidelity``);
- ``deviation`` connector deviations d_j and d_0 of LeapAlign and FlowBP-Lagrange against the leap length;
- ``cost``      grad forwards, Jacobian chain depth, bytes saved for backward, and the wall time of a training
  step divided by that of the no-grad rollout (interleaved, same run);
- ``training``  training reward and held-out metrics of short training runs per method over several seeds.

Every table is written as Markdown and JSON, every figure as PNG, into ``--out``; ``headline.md`` holds the
fidelity + cost table at N = 25. ``--quick`` shrinks everything to run in minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECTIONS = ("fidelity", "explosion", "deviation", "cost", "training")
#: methods whose connectors are leaps / quadratures (the paper's Figure 7)
DEVIATION_METHODS = ("leapalign", "flowbp-lagrange")
#: the sweeps of the active-set size, on top of every method's paper defaults
SWEEPS: dict[str, tuple[str, tuple[int, ...]]] = {
    "draft-k": ("k", (1, 3, 5)),
    "flowbp-sparse": ("num_active", (1, 3, 5)),
    "flowbp-bridge": ("num_active", (1, 3, 5)),
}


@dataclass(frozen=True)
class Settings:
    """Sizes of one bench run (``QUICK`` and ``FULL`` below)."""

    num_steps: tuple[int, ...] = (10, 25, 50)
    headline_steps: int = 25
    batch_size: int = 8
    batches: int = 8  # i.i.d. batches: the unit of every confidence interval
    draws: int = 8  # R draws of a random method's plan per batch
    sweeps: bool = True  # the active-set sweeps (else paper defaults only)
    deviation_batches: int = 8
    deviation_draws: int = 256  # plans drawn per batch and method (no model call: cheap)
    cost_steps: tuple[int, ...] = (10, 25, 50)
    cost_repeats: int = 5
    cost_sweeps: bool = True
    train_methods: tuple[str, ...] | None = None  # None: every method at its paper defaults
    train_steps: int = 100
    train_batch_size: int = 16
    train_num_steps: int = 25
    train_eval_samples: int = 20  # per prompt (10 prompts)
    seed: int = 0


QUICK = Settings(
    num_steps=(10, 25, 50),
    batch_size=4,
    batches=4,
    draws=4,
    deviation_batches=4,
    deviation_draws=64,
    cost_steps=(25,),
    cost_repeats=3,
    cost_sweeps=False,
    train_methods=("refl", "leapalign", "flowbp-sparse", "flowbp-lagrange"),
    train_steps=25,
    train_batch_size=8,
    train_num_steps=10,
    train_eval_samples=4,
)
FULL = Settings()


@dataclass(frozen=True)
class MethodConfig:
    """One row of the tables: a registered method with parameter overrides."""

    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    default: bool = True  # the paper's default configuration of the method

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.overrides.items())
        return f"{self.method} ({extra})" if extra else self.method

    def plan_fn(self, sigmas: Any) -> Callable[[Any], Any]:
        from flowbp.methods import make_plan

        return lambda generator: make_plan(self.method, sigmas, generator, **self.overrides)


def method_configs(sweeps: bool = True) -> list[MethodConfig]:
    """Every registered method except ``custom`` at its defaults, plus the active-set sweeps and the exact plan.

    The exact plan (AlignProp without checkpointing) is the reference row: fidelity 1 by construction, and the
    memory that full backprop needs without recomputation.
    """
    from flowbp.methods import available_methods, get_method

    configs: list[MethodConfig] = []
    for name in available_methods():
        if name == "custom":
            continue
        if sweeps and name in SWEEPS:
            key, values = SWEEPS[name]
            default = getattr(get_method(name).params_cls(), key)
            for value in values:
                configs.append(MethodConfig(name, {key: value}, default=value == default))
        else:
            configs.append(MethodConfig(name))
        if name == "alignprop":
            configs.append(MethodConfig(name, {"checkpoint": False}, default=False))
    return configs


def is_deterministic(config: MethodConfig, sigmas: Any) -> bool:
    """A method draws the same plan for every seed and has no renoised inputs: one draw is its gradient."""
    import torch

    plans = [config.plan_fn(sigmas)(torch.Generator().manual_seed(s)) for s in range(6)]
    return plans[0].renoised == 0 and all(p == plans[0] for p in plans[1:])


# ---------------------------------------------------------------------------------------------- context
class Bench:
    """Shared state of a bench run: the backbone, reward, output folder and progress log."""

    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        import torch

        from flowbp.backbones.digits import DigitsBackbone
        from flowbp.config import load_config
        from flowbp.rewards import load_reward

        self.args, self.settings = args, settings
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device: 'cuda' requested but no CUDA device is available")
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        defaults = load_config(None)
        self.default_reward = defaults.reward
        self.reward_spec = args.reward or defaults.reward
        self.guidance = defaults.guidance_scale
        self.detach_negative = defaults.detach_negative
        self.backbone_path = args.backbone_path
        try:
            self.backbone = DigitsBackbone.from_pretrained(self.backbone_path, device=self.device)
        except FileNotFoundError as exc:
            raise ValueError(f"--backbone-path: {exc}") from exc
        self.model = self.backbone.transformer
        # The gradient w.r.t. the full transformer: LoRA's B = 0 init would make every method's gradient reach
        # only the B matrices through the same A, a degenerate comparison.
        self.model.requires_grad_(True)
        self.model.eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.reward = load_reward(self.reward_spec).to(self.device)
        self.reward.requires_grad_(False)
        self.log(
            f"device {self.device}, backbone {self.backbone_path or 'shipped'}, reward {self.reward_spec}, "
            f"{sum(p.numel() for p in self.params):,} parameters, mode {'quick' if args.quick else 'full'}"
        )

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {message}", flush=True)

    def batch(self, size: int, seed: int) -> tuple[list[str], Any]:
        """Prompts (random digits) and x_0 of one batch, fixed by ``seed`` (the same batch for every N)."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        digits = torch.randint(10, (size,), generator=gen).tolist()
        prompts = [f"digit {d}" for d in digits]
        return prompts, self.backbone.initial_noise(size, gen)

    def velocity(self, prompts: list[str]) -> Callable:
        cond = self.backbone.encode_prompts(prompts)
        return self.backbone.velocity_fn(cond, self.guidance, detach_uncond=self.detach_negative)

    def loss_fn(self, prompts: list[str]) -> Callable:
        """−mean_b w_b r_b of the reward (for a log-probability reward ≤ 0 the default hinge has the same gradient)."""
        from flowbp.losses import reward_loss

        def loss(inputs: Sequence[Any], weights: Any) -> Any:
            rewards = [self.reward(self.backbone.decode(x), prompts) for x in inputs]
            return reward_loss(rewards, weights, kind="linear")

        return loss

    def problem(self, num_steps: int, size: int, seed: int) -> Any:
        from flowbp.diagnostics import GradientProblem
        from flowbp.trajectory import rollout

        prompts, noise = self.batch(size, seed)
        velocity = self.velocity(prompts)
        traj = rollout(velocity, noise, self.backbone.sigmas(num_steps))
        return GradientProblem(velocity, traj, self.params, self.loss_fn(prompts))

    def write(self, name: str, data: Any, markdown: str | None = None) -> None:
        (self.out / f"{name}.json").write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
        if markdown is not None:
            (self.out / f"{name}.md").write_text(markdown.rstrip() + "\n")
        self.log(f"wrote {self.out / name}.json" + (" and .md" if markdown is not None else ""))


def _jsonable(value: Any) -> Any:
    return str(value)  # anything json cannot encode natively (paths, dtypes) is stored as its text


def _seed(*parts: Any) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _fmt(ci: dict[str, float], digits: int = 3) -> str:
    """``mean ± half-width`` of a mean_ci dict."""
    half = (ci["ci95_high"] - ci["ci95_low"]) / 2
    if not math.isfinite(half):
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} ± {half:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------- fidelity + explosion
def run_gradients(bench: Bench) -> dict[str, Any]:
    """Exact gradient, per-step contributions and every method's fidelity on the same batches, for each N."""
    import torch

    from flowbp.diagnostics import exact_gradient, fidelity, per_step_contributions, summarize, summarize_fidelity

    s = bench.settings
    configs = method_configs(s.sweeps)
    rows: list[dict[str, Any]] = []
    steps_rows: list[dict[str, Any]] = []
    for n in s.num_steps:
        sigmas = bench.backbone.sigmas(n)
        deterministic = {c.label: is_deterministic(c, sigmas) for c in configs}
        per_config: dict[str, list[Any]] = {c.label: [] for c in configs}
        plan_stats: dict[str, list[tuple[int, int]]] = {c.label: [] for c in configs}
        contributions, exact_norms, sum_errors = [], [], []
        for b in range(s.batches):
            t = time.perf_counter()
            problem = bench.problem(n, s.batch_size, _seed("batch", s.seed, b))
            exact = exact_gradient(problem)
            parts = per_step_contributions(problem, reference=exact)
            sum_errors.append(float((parts.total - exact).norm() / exact.norm()))
            contributions.append(parts)
            exact_norms.append(float(exact.norm()))
            for c in configs:
                gen = torch.Generator().manual_seed(_seed("draws", s.seed, n, b, c.label))
                draws = 1 if deterministic[c.label] else s.draws
                plan_fn = c.plan_fn(sigmas)
                recorded: list[tuple[int, int]] = []

                def recording(g: Any, plan_fn: Callable = plan_fn, recorded: list = recorded) -> Any:
                    plan = plan_fn(g)
                    recorded.append((plan.grad_forwards, plan.chain_depth))
                    return plan

                per_config[c.label].append(fidelity(problem, exact, recording, draws, gen))
                plan_stats[c.label].extend(recorded)
            bench.log(
                f"gradients N={n} batch {b + 1}/{s.batches}: ‖g‖={exact_norms[-1]:.3g}, "
                f"Σ per-step vs exact rel. err {sum_errors[-1]:.1e} ({time.perf_counter() - t:.1f}s)"
            )
        for c in configs:
            stats = plan_stats[c.label]
            rows.append(
                {
                    "num_steps": n,
                    "label": c.label,
                    "method": c.method,
                    "overrides": c.overrides,
                    "default": c.default,
                    "deterministic": deterministic[c.label],
                    "draws": 1 if deterministic[c.label] else s.draws,
                    "grad_forwards": statistics.fmean(f for f, _ in stats),
                    "chain_depth": statistics.fmean(d for _, d in stats),
                    **summarize_fidelity(per_config[c.label]),
                    "per_batch": [dataclasses.asdict(r) for r in per_config[c.label]],
                }
            )
        norms = torch.tensor([p.norms for p in contributions], dtype=torch.float64)  # batches × N
        coss = torch.tensor([p.cosines for p in contributions], dtype=torch.float64)
        share = norms / norms.sum(1, keepdim=True)
        steps_rows.append(
            {
                "num_steps": n,
                "exact_norm": summarize(exact_norms),
                "sum_rel_error_max": max(sum_errors),
                "step_norm": [summarize(norms[:, i].tolist()) for i in range(n)],
                "step_cosine": [summarize(coss[:, i].tolist()) for i in range(n)],
                "step_norm_share": [summarize(share[:, i].tolist()) for i in range(n)],
            }
        )
    return {
        "settings": dataclasses.asdict(s),
        "reward": bench.reward_spec,
        "loss": "linear (−mean w·r)",
        "rows": rows,
        "per_step": steps_rows,
    }


def write_fidelity(bench: Bench, data: dict[str, Any]) -> None:
    s = bench.settings
    parts = [
        "# Gradient fidelity against exact backprop (digits testbed)",
        "",
        f"Reward `{data['reward']}`, loss {data['loss']} with each plan's sample weights; gradient w.r.t. all "
        f"transformer parameters. Exact = full backprop through all N steps (alignprop plan, no checkpointing). "
        f"Batch {s.batch_size}, {s.batches} batches (95% CI over batches), R = {s.draws} draws per batch for "
        "random methods (1 for deterministic ones). cos = mean single-draw cosine; cos(mean) = cosine of the "
        "mean over the R draws (the method's expected direction, i.e. its bias, up to 1/R variance); ratio = "
        "‖ĝ‖/‖g‖ per draw; w = mean sample weight.",
    ]
    for n in s.num_steps:
        rows = [r for r in data["rows"] if r["num_steps"] == n]
        table = [
            [
                ("**" + r["label"] + "**") if r["default"] else r["label"],
                f"{r['grad_forwards']:.3g}",
                f"{r['chain_depth']:.3g}",
                _fmt(r["cosine"]),
                _fmt(r["cosine_of_mean"]),
                _fmt(r["norm_ratio"]),
                f"{r['sample_weight']['mean']:.2f}",
            ]
            for r in rows
        ]
        parts += [
            "",
            f"## N = {n}",
            "",
            _table(["method (bold: paper default)", "grad fwd", "depth", "cos", "cos(mean)", "ratio", "w"], table),
        ]
    bench.write("fidelity", {k: v for k, v in data.items() if k != "per_step"}, "\n".join(parts))
    plot_fidelity(bench, data)


def plot_fidelity(bench: Bench, data: dict[str, Any]) -> None:
    plt = _plt()
    s = bench.settings
    n_head = s.headline_steps if s.headline_steps in s.num_steps else s.num_steps[-1]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    for k, r in enumerate(r for r in data["rows"] if r["num_steps"] == n_head):
        c = r["cosine"]
        err = [[c["mean"] - c["ci95_low"]], [c["ci95_high"] - c["mean"]]] if math.isfinite(c["ci95_low"]) else None
        ax.errorbar(r["grad_forwards"], c["mean"], yerr=err, fmt="o", color=f"C{k % 10}", capsize=3)
        ax.annotate(r["label"], (r["grad_forwards"], c["mean"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("grad forwards per step (log)")
    ax.set_ylabel("cosine to exact gradient (single draw)")
    ax.set_title(f"fidelity vs cost, N = {n_head}")
    ax.grid(alpha=0.3)
    ax = axes[1]
    defaults = [r["label"] for r in data["rows"] if r["default"] and r["num_steps"] == s.num_steps[0]]
    for k, label in enumerate(defaults):
        pts = [(r["num_steps"], r["cosine"]) for r in data["rows"] if r["label"] == label]
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1]["mean"] for p in pts], "o-", color=f"C{k % 10}", label=label)
        lo = [p[1]["ci95_low"] for p in pts]
        hi = [p[1]["ci95_high"] for p in pts]
        if all(math.isfinite(v) for v in lo + hi):
            ax.fill_between(xs, lo, hi, color=f"C{k % 10}", alpha=0.12)
    ax.set_xlabel("sampling steps N")
    ax.set_ylabel("cosine to exact gradient")
    ax.set_title("paper defaults as N grows")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(bench.out / "fidelity.png", dpi=110)
    plt.close(fig)


def write_explosion(bench: Bench, data: dict[str, Any]) -> None:
    s = bench.settings
    per_step = data["per_step"]
    defaults = [r for r in data["rows"] if r["default"]]
    labels = list(dict.fromkeys(r["label"] for r in defaults))
    header = ["N", "exact ‖g‖", "late 20% share", "early 20% share", "max/min step"]
    rows = []
    for p in per_step:
        n = p["num_steps"]
        share = [x["mean"] for x in p["step_norm_share"]]
        norms = [x["mean"] for x in p["step_norm"]]
        k = max(1, round(0.2 * n))
        rows.append(
            [
                n,
                _fmt(p["exact_norm"], 4),
                f"{sum(share[-k:]):.2f}",
                f"{sum(share[:k]):.2f}",
                f"{max(norms) / max(min(norms), 1e-30):.3g}",
            ]
        )
    norm_rows = []
    for label in labels:
        cells = [label]
        for n in s.num_steps:
            r = next((r for r in data["rows"] if r["label"] == label and r["num_steps"] == n), None)
            cells.append(_fmt(r["grad_norm"], 4) if r else "")
        norm_rows.append(cells)
    exact_cells = ["**exact**", *[_fmt(p["exact_norm"], 4) for p in per_step]]
    text = "\n".join(
        [
            "# Gradient explosion: where the exact gradient comes from, and how norms grow with N",
            "",
            "g_i = the part of ∂L/∂θ that enters through the θ-dependence of velocity call i, with the full x-chain "
            "kept (Σ_i g_i = exact gradient; largest relative error of that identity here: "
            f"{max(p['sum_rel_error_max'] for p in per_step):.1e}). Share = ‖g_i‖ / Σ_k ‖g_k‖ summed over the "
            "first / last 20% of steps (step 0 = pure noise).",
            "",
            _table(header, rows),
            "",
            "## Gradient norm ‖ĝ‖ by N (paper defaults; mean ± 95% CI over batches)",
            "",
            _table(["method", *[f"N = {n}" for n in s.num_steps]], [exact_cells, *norm_rows]),
        ]
    )
    bench.write("explosion", {"per_step": per_step, "settings": data["settings"]}, text)
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for k, p in enumerate(per_step):
        n = p["num_steps"]
        xs = [(i + 0.5) / n for i in range(n)]
        axes[0].plot(xs, [x["mean"] for x in p["step_norm"]], "o-", ms=3, color=f"C{k}", label=f"N = {n}")
        axes[1].plot(xs, [x["mean"] for x in p["step_cosine"]], "o-", ms=3, color=f"C{k}", label=f"N = {n}")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step position i/N (0 = noise, 1 = image)")
    axes[0].set_ylabel("‖g_i‖ (contribution of call i)")
    axes[0].set_title("exact gradient by step")
    axes[1].set_xlabel("step position i/N")
    axes[1].set_ylabel("cos(g_i, g)")
    axes[1].set_title("direction of each step's contribution")
    for ax in axes[:2]:
        ax.legend()
        ax.grid(alpha=0.3)
    ax = axes[2]
    ax.plot(s.num_steps, [p["exact_norm"]["mean"] for p in per_step], "k*-", ms=10, label="exact")
    for k, label in enumerate(labels):
        pts = [r for r in data["rows"] if r["label"] == label]
        ax.plot([r["num_steps"] for r in pts], [r["grad_norm"]["mean"] for r in pts], "o-", color=f"C{k % 10}",
                label=label)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps N")
    ax.set_ylabel("gradient norm")
    ax.set_title("gradient norm as N grows")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(bench.out / "explosion.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- deviation
def run_deviation(bench: Bench) -> dict[str, Any]:
    """Connector deviations of drawn LeapAlign / Lagrange plans, and a controlled sweep of the leap length."""
    import torch

    from flowbp.diagnostics import connector_deviations, summarize
    from flowbp.methods import make_plan

    s = bench.settings
    n = s.headline_steps
    sigmas = bench.backbone.sigmas(n)
    trajs = []
    with torch.no_grad():
        for b in range(s.deviation_batches):
            prompts, noise = bench.batch(s.batch_size, _seed("deviation", s.seed, b))
            from flowbp.trajectory import rollout

            trajs.append(rollout(bench.velocity(prompts), noise, sigmas))
    drawn: dict[str, list[dict[str, float]]] = {m: [] for m in DEVIATION_METHODS}
    for method in DEVIATION_METHODS:
        gen = torch.Generator().manual_seed(_seed("deviation-plans", s.seed, method))
        for traj in trajs:
            for _ in range(s.deviation_draws):
                plan = make_plan(method, sigmas, gen)
                k, j, end = plan.anchors
                dev = connector_deviations(plan, traj)
                tau = plan.similarity_tau
                weight = 1.0 / (dev[j].clamp(min=tau) + dev[end].clamp(min=tau))
                drawn[method].append(
                    {
                        "k": k, "j": j, "leap_kj": j - k, "leap_jN": end - j,
                        "d_j": float(dev[j].mean()), "d_0": float(dev[end].mean()),
                        "sample_weight": float(weight.mean()),
                    }
                )
    # Controlled sweep: a single connector of length L ending at the endpoint (d_0) or at a fixed bridge node j
    # (d_j), with the leap (LeapAlign's rule) or lagrange(3) (FlowBP-Lagrange's rule).
    j_fixed = n - max(1, round(0.24 * n))  # where Lagrange's Dirichlet(2.5, 6, 2) places j on average
    sweep: dict[str, dict[str, list[dict[str, float]]]] = {}
    for rule in ("leap", "lagrange"):
        sweep[rule] = {"d_0": [], "d_j": []}
        for which, end in (("d_0", n), ("d_j", j_fixed)):
            for length in range(1, end + 1):
                per_batch = []
                for traj in trajs:
                    plan = make_plan(
                        "custom", sigmas, 0, start=end - length, anchors=() if end == n else (end,),
                        weights=(rule,) if end == n else (rule, "leap"), order=3,
                    )
                    per_batch.append(float(connector_deviations(plan, traj)[end].mean()))
                sweep[rule][which].append({"length": length, **summarize(per_batch)})
    summary = {}
    for method, recs in drawn.items():
        summary[method] = {
            key: summarize(r[key] for r in recs) for key in ("d_j", "d_0", "leap_kj", "leap_jN", "sample_weight")
        }
    bench.log(f"deviation: {len(trajs)} trajectories, {s.deviation_draws} plans each per method")
    return {"num_steps": n, "j_fixed": j_fixed, "drawn": drawn, "summary": summary, "sweep": sweep}


def write_deviation(bench: Bench, data: dict[str, Any]) -> None:
    n = data["num_steps"]
    rows = []
    for method, summ in data["summary"].items():
        rows.append([method, _fmt(summ["leap_kj"], 1), _fmt(summ["d_j"], 4), _fmt(summ["leap_jN"], 1),
                     _fmt(summ["d_0"], 4), _fmt(summ["sample_weight"], 2)])
    sweep_rows = []
    by_len = {(rule, which): {p["length"]: p for p in data["sweep"][rule][which]} for rule in data["sweep"]
              for which in ("d_0", "d_j")}
    lengths = sorted({p["length"] for p in data["sweep"]["leap"]["d_0"]})
    shown = [L for L in lengths if L in (1, 2, 3, 4, 6, 8, 10, 12, 15, 20) or L == lengths[-1]]
    for length in shown:
        cells = [length]
        for rule in ("leap", "lagrange"):
            for which in ("d_j", "d_0"):
                p = by_len[(rule, which)].get(length)
                cells.append(f"{p['mean']:.4f}" if p else "")
        sweep_rows.append(cells)
    text = "\n".join(
        [
            f"# Connector deviation (the paper's Figure 7), N = {n}",
            "",
            "d_a = mean |x_a − x̂_a| of the surrogate's connector estimate against the cached latent. d_j: the "
            "connector k → j; d_0: j → N (the clean endpoint, reverse index 0). Drawn plans at the methods' "
            "defaults (mean ± 95% CI over plans × trajectories):",
            "",
            _table(["method", "j − k", "d_j", "N − j", "d_0", "sample weight"], rows),
            "",
            f"Controlled sweep: one connector of length L ending at N (d_0) or at j = {data['j_fixed']} (d_j), mean "
            "over trajectories:",
            "",
            _table(["L", "leap d_j", "leap d_0", "lagrange(3) d_j", "lagrange(3) d_0"], sweep_rows),
        ]
    )
    bench.write("deviation", data, text)
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for k, (rule, name) in enumerate((("leap", "leap (LeapAlign)"), ("lagrange", "lagrange(3) (FlowBP-Lagrange)"))):
        for ax, which in zip(axes[:2], ("d_j", "d_0"), strict=True):
            pts = data["sweep"][rule][which]
            xs = [p["length"] for p in pts]
            ax.plot(xs, [p["mean"] for p in pts], "o-", ms=3, color=f"C{k}", label=name)
            lo, hi = [p["ci95_low"] for p in pts], [p["ci95_high"] for p in pts]
            if all(math.isfinite(v) for v in lo + hi):
                ax.fill_between(xs, lo, hi, color=f"C{k}", alpha=0.15)
    axes[0].set_title(f"d_j: connector of length L ending at j = {data['j_fixed']}")
    axes[1].set_title(f"d_0: connector of length L ending at N = {n}")
    for ax in axes[:2]:
        ax.set_xlabel("leap length L (steps)")
        ax.set_ylabel("mean |x − x̂|")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
    ax = axes[2]
    for k, (method, recs) in enumerate(data["drawn"].items()):
        ax.scatter([r["leap_kj"] for r in recs], [r["d_j"] for r in recs], s=6, alpha=0.3, color=f"C{k}",
                   label=f"{method}: d_j vs j − k")
        ax.scatter([r["leap_jN"] for r in recs], [r["d_0"] for r in recs], s=6, alpha=0.3, marker="x",
                   color=f"C{k + 2}", label=f"{method}: d_0 vs N − j")
    ax.set_xlabel("leap length (steps)")
    ax.set_ylabel("deviation")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-4)  # a one-step leap is exact Euler: d ≈ 1e-10 would squash the axis
    ax.set_title("drawn plans (method defaults)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(bench.out / "deviation.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- cost
def run_cost(bench: Bench) -> dict[str, Any]:
    """Grad forwards, chain depth, bytes saved for backward and step / rollout wall time, per method and N."""
    import torch

    from flowbp.diagnostics import saved_bytes, time_step_vs_rollout

    s = bench.settings
    # Same rows and labels as the fidelity tables (so the headline can join them); without sweeps only the paper
    # defaults and the exact reference.
    configs = [c for c in method_configs(True) if s.cost_sweeps or c.default or c.overrides == {"checkpoint": False}]
    rows = []
    prompts, noise = bench.batch(s.batch_size, _seed("cost", s.seed))
    velocity, loss_fn = bench.velocity(prompts), bench.loss_fn(prompts)
    for n in s.cost_steps:
        sigmas = bench.backbone.sigmas(n)
        problem = bench.problem(n, s.batch_size, _seed("cost", s.seed))
        # one untimed step first: allocator and kernel caches warm up before any timing
        time_step_vs_rollout(velocity, noise, sigmas, bench.params, loss_fn, configs[0].plan_fn(sigmas),
                             torch.Generator().manual_seed(0), repeats=0, warmup=1)
        for c in configs:
            gen = torch.Generator().manual_seed(_seed("cost-plans", s.seed, n, c.label))
            plans = [c.plan_fn(sigmas)(gen) for _ in range(4)]
            memory = [saved_bytes(problem, p, torch.Generator().manual_seed(0)) for p in plans[:2]]
            timing = time_step_vs_rollout(velocity, noise, sigmas, bench.params, loss_fn, c.plan_fn(sigmas), gen,
                                          repeats=s.cost_repeats, warmup=0)
            rows.append(
                {
                    "num_steps": n,
                    "label": c.label,
                    "method": c.method,
                    "default": c.default,
                    "grad_forwards": statistics.fmean(p.grad_forwards for p in plans),
                    "chain_depth": statistics.fmean(p.chain_depth for p in plans),
                    "checkpoint": any(p.checkpoint for p in plans),
                    "saved_bytes_surrogate": statistics.fmean(m["surrogate"] for m in memory),
                    "saved_bytes_step": statistics.fmean(m["step"] for m in memory),
                    **timing.summary(),
                    "rollout_s_all": timing.rollout_s,
                    "step_s_all": timing.step_s,
                }
            )
            bench.log(
                f"cost N={n} {c.label}: ratio {rows[-1]['ratio_median']:.2f} "
                f"(step {rows[-1]['step_s']:.2f}s / rollout {rows[-1]['rollout_s']:.2f}s), "
                f"{rows[-1]['saved_bytes_surrogate'] / 2**20:.1f} MiB"
            )
    return {"settings": dataclasses.asdict(s), "batch_size": s.batch_size, "device": str(bench.device), "rows": rows}


def write_cost(bench: Bench, data: dict[str, Any]) -> None:
    s = bench.settings
    parts = [
        "# Cost per training step",
        "",
        f"Batch {s.batch_size} (×2 for CFG), device {data['device']}. Saved = bytes autograd saves for backward "
        "(parameters and cached trajectory excluded): the surrogate's re-forwards, and the whole step (+ decode, "
        "reward, loss). With gradient checkpointing (†) only the calls' inputs count, plus one call recomputed "
        "at a time during backward. Time ratio = wall time of one training step (rollout + surrogate + reward + "
        "backward, no optimiser) / wall time of the no-grad rollout, measured alternately in the same run "
        f"({s.cost_repeats} pairs; median, and mean ± 95% CI).",
    ]
    for n in s.cost_steps:
        rows = []
        for r in (r for r in data["rows"] if r["num_steps"] == n):
            ci = {"mean": r["ratio_mean"], "ci95_low": r["ratio_ci95_low"], "ci95_high": r["ratio_ci95_high"]}
            rows.append(
                [
                    ("**" + r["label"] + "**") if r["default"] else r["label"],
                    f"{r['grad_forwards']:.3g}",
                    f"{r['chain_depth']:.3g}",
                    f"{r['saved_bytes_surrogate'] / 2**20:.2f}" + (" †" if r["checkpoint"] else ""),
                    f"{r['saved_bytes_step'] / 2**20:.2f}",
                    f"{r['ratio_median']:.2f}",
                    _fmt(ci, 2),
                ]
            )
        parts += ["", f"## N = {n}", "",
                  _table(["method", "grad fwd", "depth", "saved MiB (surrogate)", "saved MiB (step)",
                          "time ratio (median)", "time ratio (mean ± CI)"], rows)]
    bench.write("cost", data, "\n".join(parts))


def write_headline(bench: Bench, fid: dict[str, Any] | None, cost: dict[str, Any] | None) -> None:
    """Fidelity + cost of the paper defaults at the headline N (needs both sections)."""
    if fid is None or cost is None:
        return
    n = bench.settings.headline_steps
    frows = {r["label"]: r for r in fid["rows"] if r["num_steps"] == n}
    crows = {r["label"]: r for r in cost["rows"] if r["num_steps"] == n}
    labels = [label for label in frows if label in crows]
    if not labels:
        return
    rows = []
    for label in labels:
        f, c = frows[label], crows[label]
        rows.append(
            [
                ("**" + label + "**") if f["default"] else label,
                f"{c['grad_forwards']:.3g}",
                f"{c['chain_depth']:.3g}",
                _fmt(f["cosine"]),
                _fmt(f["cosine_of_mean"]),
                _fmt(f["norm_ratio"], 2),
                f"{f['sample_weight']['mean']:.2f}",
                f"{c['saved_bytes_surrogate'] / 2**20:.2f}" + (" †" if c["checkpoint"] else ""),
                f"{c['ratio_median']:.2f}",
            ]
        )
    s = bench.settings
    text = "\n".join(
        [
            f"# Headline: fidelity and cost at N = {n} (digits testbed)",
            "",
            f"cos / cos(mean) / ratio against the exact full-backprop gradient of the same loss on the same batch "
            f"(mean ± 95% CI over {s.batches} batches of {s.batch_size}; R = {s.draws}); saved = activation MiB of "
            "the surrogate († gradient checkpointing: inputs only); time = training step / no-grad rollout; w = mean "
            "sample weight (similarity weights scale ‖ĝ‖ by about w).",
            "",
            _table(["method", "grad fwd", "depth", "cos", "cos(mean)", "‖ĝ‖/‖g‖", "w", "saved MiB", "time ×rollout"],
                   rows),
        ]
    )
    bench.write("headline", {"num_steps": n, "labels": labels}, text)


# ---------------------------------------------------------------------------------------------- training
def run_training(bench: Bench) -> dict[str, Any]:
    """Short training runs with ``flowbp.train.train`` per method and seed (same budget for every method)."""
    from flowbp.config import load_config
    from flowbp.train import train

    s = bench.settings
    methods = list(s.train_methods) if s.train_methods else [c.method for c in method_configs(sweeps=False)]
    seeds = list(range(bench.args.seeds))
    runs: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        for seed in seeds:
            run_dir = bench.out / "training" / method / f"seed{seed}"
            if run_dir.exists():
                shutil.rmtree(run_dir)  # one command regenerates everything: never mix with an old run
            overrides: dict[str, Any] = {
                "method": method,
                "steps": s.train_steps,
                "batch_size": s.train_batch_size,
                "num_inference_steps": s.train_num_steps,
                "eval_samples_per_prompt": s.train_eval_samples,
                "sample_every": 0,
                "checkpoint_every": 0,
                "output_dir": str(run_dir),
                "device": bench.device.type,
                "progress": False,
                "seed": 42 + seed,
                "plan_seed": 114 + seed,
            }
            if bench.args.train_reward:
                overrides["reward"] = bench.args.train_reward
            if bench.backbone_path:
                overrides["backbone_path"] = str(bench.backbone_path)
            t = time.perf_counter()
            summary = train(load_config(None, overrides))
            history = json.loads((run_dir / "history.json").read_text())
            runs.setdefault(method, []).append({"seed": seed, "summary": summary, "history": history})
            after = summary["after"]
            bench.log(
                f"training {method} seed {seed}: eval reward {summary['before']['reward']:.3f} -> "
                f"{after['reward']:.3f}, held-out acc {after.get('heldout_accuracy', float('nan')):.3f} "
                f"({time.perf_counter() - t:.1f}s)"
            )
    return {
        "settings": dataclasses.asdict(s),
        "seeds": seeds,
        "reward": bench.args.train_reward or bench.default_reward,
        "runs": runs,
    }


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def write_training(bench: Bench, data: dict[str, Any]) -> None:
    from flowbp.diagnostics import summarize

    s = bench.settings
    window = max(1, min(10, s.train_steps // 4))
    curves: dict[str, dict[str, list[Any]]] = {}
    rows = []
    metric_keys = ("heldout_accuracy", "frechet_distance", "diversity")
    for method, runs in data["runs"].items():
        smoothed = [_smooth([h["reward"] for h in r["history"]], window) for r in runs]
        steps = [h["step"] for h in runs[0]["history"]]
        per_step = [summarize(col) for col in zip(*smoothed, strict=True)]
        curves[method] = {"step": steps, "reward": per_step}
        last = summarize(sm[-1] for sm in smoothed)
        after = {
            k: summarize(r["summary"]["after"].get(k, float("nan")) for r in runs) for k in ("reward", *metric_keys)
        }
        before = {k: statistics.fmean(r["summary"]["before"].get(k, float("nan")) for r in runs)
                  for k in ("reward", *metric_keys)}
        gain = summarize(r["summary"]["after"]["reward"] - r["summary"]["before"]["reward"] for r in runs)
        sec = summarize(statistics.fmean(h["seconds"] for h in r["history"]) for r in runs)
        rows.append(
            [method, _fmt(last), _fmt(after["reward"]), _fmt(gain), _fmt(after["heldout_accuracy"]),
             _fmt(after["frechet_distance"], 2), _fmt(after["diversity"]), f"{sec['mean']:.2f}"]
        )
        curves[method]["before"] = before
        curves[method]["after"] = after
    first = next(iter(curves.values()))
    text = "\n".join(
        [
            "# Sample efficiency: short training runs, same budget per method",
            "",
            f"`flowbp.train.train` with the default config except: {s.train_steps} steps, batch "
            f"{s.train_batch_size}, N = {s.train_num_steps}, reward `{data['reward']}`; seeds {data['seeds']} "
            f"(mean ± 95% CI over seeds). Evaluation (EMA weights, {s.train_eval_samples} samples × 10 prompts, "
            "fixed noise) before and after training; train reward = moving average of the last "
            f"{window} steps' batch reward at the end. Before training: eval reward "
            f"{first['before']['reward']:.3f}, held-out accuracy {first['before']['heldout_accuracy']:.3f}, "
            f"Fréchet distance {first['before']['frechet_distance']:.2f}, diversity "
            f"{first['before']['diversity']:.3f}.",
            "",
            _table(["method", "train reward (end)", "eval reward", "Δ eval reward", "held-out acc", "FD ↓",
                    "diversity", "s/step"], rows),
        ]
    )
    bench.write("training", {"curves": curves, **data}, text)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for k, (method, cv) in enumerate(curves.items()):
        xs = cv["step"]
        axes[0].plot(xs, [p["mean"] for p in cv["reward"]], color=f"C{k % 10}", label=method)
        lo, hi = [p["ci95_low"] for p in cv["reward"]], [p["ci95_high"] for p in cv["reward"]]
        if all(math.isfinite(v) for v in lo + hi):
            axes[0].fill_between(xs, lo, hi, color=f"C{k % 10}", alpha=0.15)
        a = cv["after"]
        axes[1].errorbar(
            a["reward"]["mean"], a["heldout_accuracy"]["mean"],
            xerr=_half(a["reward"]), yerr=_half(a["heldout_accuracy"]), fmt="o", color=f"C{k % 10}", label=method,
            capsize=3,
        )
    axes[1].plot(first["before"]["reward"], first["before"]["heldout_accuracy"], "k*", ms=12, label="before")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel(f"training reward (moving average of {window})")
    axes[0].set_title("training reward (mean ± 95% CI over seeds)")
    axes[1].set_xlabel("eval reward (in-domain)")
    axes[1].set_ylabel("held-out accuracy (independent classifier)")
    axes[1].set_title("after training: reward vs held-out quality")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(bench.out / "training.png", dpi=110)
    plt.close(fig)


def _half(ci: dict[str, float]) -> float | None:
    half = (ci["ci95_high"] - ci["ci95_low"]) / 2
    return half if math.isfinite(half) else None


# ---------------------------------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    import torch

    if args.seeds < 1:
        raise ValueError(f"--seeds: must be >= 1, got {args.seeds}")
    only = set(args.only or SECTIONS)
    unknown = only - set(SECTIONS)
    if unknown:
        raise ValueError(f"--only: unknown section(s) {sorted(unknown)}; allowed: {', '.join(SECTIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.device != "cuda":
        # The digits model is tiny: a call is dominated by per-op overhead, so one thread is as fast as two on an
        # idle machine, and on a shared one two spinning OpenMP threads measured 3-10x slower (and erratic).
        torch.set_num_threads(1)
    settings = QUICK if args.quick else FULL
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
    total = time.perf_counter() - bench.t0
    meta = {
        "command": "flowbp bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes on two CPU cores")
    p.add_argument("--out", default="bench-results", help="output folder for tables and plots (default bench-results)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per method (default 3)")
    p.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                   help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    p.add_argument("--reward", default=None,
                   help="reward of the gradient sections (default: the training config's default reward)")
    p.add_argument("--train-reward", default=None,
                   help="reward of the training section (default: the training config's default reward; note that "
                   "digit-alignment alone has no headroom on the shipped model)")
    p.add_argument("--backbone-path", default=None,
                   help="digits flow-model directory (default: the weights shipped with flowbp)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU: fastest and stable for this tiny model)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="gradient fidelity, memory and cost of every method vs exact backprop",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """Entry point without the ``flowbp`` CLI (``benchmarks/bench.py``)."""
    parser = argparse.ArgumentParser(prog="bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
