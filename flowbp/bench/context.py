"""Shared state of a bench run: sizes (QUICK / FULL), the method rows, the backbone, reward and batches."""

from __future__ import annotations

import argparse
import json
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
    "flowbp-bridge": ("num_active", (2, 3, 5)),  # K >= 2: one active node on each side of j
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

    def true_problem(self, problem: Any, num_steps: int, size: int, seed: int) -> Any:
        """The same batch and cached rollout with nothing detached: the plain sampler's true gradient.

        Forward values are bit-identical with and without the CFG detach, so the cached trajectory is shared.
        """
        from flowbp.diagnostics import GradientProblem

        prompts, _ = self.batch(size, seed)
        cond = self.backbone.encode_prompts(prompts)
        velocity = self.backbone.velocity_fn(cond, self.guidance, detach_uncond=False)
        return GradientProblem(velocity, problem.trajectory, self.params, problem.loss_fn)

    def write(self, name: str, data: Any, markdown: str | None = None) -> None:
        (self.out / f"{name}.json").write_text(json.dumps(data, indent=2, default=jsonable) + "\n")
        if markdown is not None:
            (self.out / f"{name}.md").write_text(markdown.rstrip() + "\n")
        self.log(f"wrote {self.out / name}.json" + (" and .md" if markdown is not None else ""))


def jsonable(value: Any) -> Any:
    return str(value)  # anything json cannot encode natively (paths, dtypes) is stored as its text


def seed_of(*parts: Any) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF
