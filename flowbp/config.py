"""The training configuration: one flat, typed, validated YAML schema.

Every key is checked before anything is written: an unknown key, a wrong type, a missing file, a
negative learning rate or a method override that cannot produce a plan (K larger than the number
of steps, α outside [0, 1], …) is one clear ``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from flowbp.typecheck import build_dataclass

PRESETS_DIR = Path(__file__).resolve().parent / "configs"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: accelerate ``log_with`` names -> the package each needs (not dependencies of flowbp: install to use).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
#: diffusers.optimization.SchedulerType values (kept here so validating a config imports nothing heavy).
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)


@dataclass(frozen=True)
class TrainConfig:
    # --- what is trained, on what
    backbone: str = "digits"
    backbone_path: str | None = None  # weights directory or cached hub id; None: the default (shipped for digits)
    # extra keyword arguments of the backbone's loader, e.g. {max_sequence_length: 512}
    backbone_args: dict[str, Any] = field(default_factory=dict)
    resolution: int | None = None  # image side in pixels; None: the backbone's default (512 real, 16 digits)
    # weights of the frozen parts; auto: float32 on CPU, bfloat16 on GPU (full fine-tuning keeps fp32 masters)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gradient_checkpointing: bool = False  # transformer blocks recompute their activations in backward
    vae_gradient_checkpointing: bool = False
    method: str = "flowbp-lagrange"
    method_args: dict[str, Any] = field(default_factory=dict)  # overrides of the method's parameters
    # a reward spec: "name", "a+0.5*b" or a mapping; default: the digits preference-style trade-off
    reward: str = "digit-alignment+5*digit-contrast"
    # reward name -> weights location (file or folder) for real reward models, e.g. {hpsv2: /ckpt/hps};
    # unlisted rewards use $FLOWBP_REWARD_DIR/<name> or the hub cache (see README, Rewards)
    reward_paths: dict[str, str] = field(default_factory=dict)
    prompts: list[str] | None = None  # training prompts; None: the backbone's prompt set
    prompts_file: str | None = None  # one prompt per line (overrides `prompts`)
    # --- sampling
    num_inference_steps: int = 25
    guidance_scale: float | None = None  # None: the backbone's default
    detach_negative: bool = True  # stop the gradient through the unconditional CFG branch
    # divide the backward loss by the CFG scale g (the paper's cfg_grad_norm_compensate): a detached
    # negative branch multiplies the gradient by g; this undoes it. Forward values are unchanged.
    cfg_grad_compensate: bool = False
    # --- objective
    loss: Literal["hinge", "linear"] = "hinge"
    loss_margin: float = 0.55  # λ of the hinge ReLU(λ − r)
    # --- optimisation
    steps: int = 30
    batch_size: int = 16
    finetune: Literal["lora", "full"] = "lora"
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_targets: list[str] | str | None = None  # module-name suffixes or one regex; None: the backbone's
    # frozen-base memory modes (flowbp.memory_modes; `--dry-run --gpu-memory GIB` picks them for a GPU):
    # the LoRA's frozen transformer stored weight-only quantized (torchao), and 8-bit AdamW moments
    base_quantization: Literal["none", "int8", "float8", "nf4"] = "none"
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    # frozen linear weights kept on the CPU and streamed to the GPU per layer (flowbp.offload): the LoRA's
    # frozen transformer (base), the reward model (reward), or both (all)
    offload: Literal["none", "reward", "base", "all"] = "none"
    # regional torch.compile of the transformer's repeated blocks (rollout and grad forwards; flowbp.compiling)
    compile: bool = False
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    ema: bool = True
    ema_decay: float = 0.9
    # --- randomness: plans use their own seed so every rank draws the same plan (DESIGN 3.5.7)
    seed: int = 42
    plan_seed: int = 114
    # --- evaluation, logging, outputs
    # The evaluation before and after training (and every eval_every steps): eval_max_prompts prompts ×
    # eval_samples_per_prompt images. None: the backbone's default size (flowbp.evaluate.eval_size): digits
    # 10 prompts × 20; a real backbone 8 prompts × 2, small enough to start training within a minute; the paper
    # presets set the paper's protocol, 400 prompts × 1.
    eval_samples_per_prompt: int | None = None
    eval_prompts_file: str | None = None  # None: digits prompts / the 400 HPDv2 test prompts for real backbones
    eval_max_prompts: int | None = None  # use only the first N evaluation prompts (None: the backbone's default)
    eval_at_start: bool = True  # false: no evaluation (nor sample grid) before step 1; the summary has no "before"
    eval_seed: int = 2024
    eval_batch_size: int = 128  # samples per evaluation / grid rollout batch
    # periodic held-out evaluation (flowbp.evaluate.periodic_eval), the same code as `flowbp eval`:
    eval_every: int = 0  # evaluate every N steps (0: off)
    eval_metrics: list[str] | None = None  # None: the training reward + the backbone's held-out metrics
    # reward-hacking guard (flowbp.guard): [{metric, tolerance, action: warn|stop}], judged at its own looks
    guard: list[dict[str, Any]] = field(default_factory=list)
    # its cadence (flowbp.guard.Schedule; null: the default): a look every guard_every steps (max(1, eval_every
    # // 5)) at guard_samples_per_prompt images per prompt (the evaluation's); on alert (a quarter of a tolerance
    # used up) every guard_alert_every steps (max(1, guard_every // 5)) at guard_alert_samples_per_prompt (5×)
    guard_every: int | None = None
    guard_samples_per_prompt: int | None = None
    guard_alert_every: int | None = None
    guard_alert_samples_per_prompt: int | None = None
    # a look past a tolerance that its bound does not exclude yet is extended, at the same step, to this many
    # images per prompt (2× the alert set's); the step-0 baseline is sampled at this size
    guard_confirm_samples_per_prompt: int | None = None
    guard_confidence: float = 0.99  # one-sided confidence of each look's bound
    sample_every: int = 50  # sample grid every N steps (0: only at start and end)
    checkpoint_every: int = 50  # 0: only at the end
    output_dir: str | None = None  # None: runs/<backbone>-<method>-<timestamp>
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    progress: bool = True
    # --- scale-out and reliability (batch_size above is the GLOBAL batch per optimizer step: it is split
    # into num_processes × gradient_accumulation_steps micro-batches, so one config gives the same run
    # on any number of processes)
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "constant"  # any name of diffusers.optimization.get_scheduler
    lr_warmup_steps: int = 0
    log_with: str = "tensorboard"  # accelerate trackers: tensorboard, wandb, mlflow (comma-separated), or none
    checkpoint_keep_last: int = 3  # keep the newest N checkpoints (0: keep all)
    max_consecutive_skips: int = 5  # stop (with a checkpoint) after this many non-finite steps in a row

    def check(self) -> None:
        # method, reward and backbone names first, read from the registries' source without importing
        # torch: a typo fails in milliseconds, before any model loads (the registries check the rest)
        from flowbp.names import check_names

        check_names(self.method, self.reward, self.backbone)
        positive_ints = (
            "num_inference_steps",
            "steps",
            "batch_size",
            "lora_rank",
            "eval_samples_per_prompt",
            "eval_batch_size",
            "gradient_accumulation_steps",
            "max_consecutive_skips",
        )
        for name in positive_ints:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("sample_every", "checkpoint_every", "eval_every", "lr_warmup_steps", "checkpoint_keep_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")
        for name in ("weight_decay", "max_grad_norm", "adam_eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.guidance_scale is not None and self.guidance_scale < 1:
            raise ValueError(f"guidance_scale: must be >= 1 (or null for the default), got {self.guidance_scale}")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"resolution: must be >= 1 (or null for the backbone's default), got {self.resolution}")
        if self.eval_max_prompts is not None and self.eval_max_prompts < 1:
            raise ValueError(f"eval_max_prompts: must be >= 1 (or null for all), got {self.eval_max_prompts}")
        for name, value in self.reward_paths.items():
            if not Path(value).expanduser().exists():
                raise ValueError(f"reward_paths.{name}: file or directory not found: {value}")
        for name in ("prompts_file", "eval_prompts_file"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"{name}: file or directory not found: {value}")
        # a hub id (owner/name) is resolved from the local cache by the backbone, with its own error
        path = self.backbone_path
        if path is not None and not Path(path).exists() and not _HUB_ID.match(path):
            raise ValueError(f"backbone_path: file or directory not found: {path}")
        if self.prompts is not None and not self.prompts:
            raise ValueError("prompts: must be a non-empty list (or null for the backbone's prompt set)")
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"batch_size: {self.batch_size} is not divisible by gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}); batch_size is the global batch per optimizer step"
            )
        self.trackers()  # validates log_with
        if self.base_quantization != "none" and self.finetune != "lora":
            raise ValueError(
                f"base_quantization: {self.base_quantization!r} quantizes the frozen base under a LoRA; "
                "with finetune: full the transformer trains (use none, or finetune: lora)"
            )
        if self.offload in ("base", "all") and self.finetune != "lora":
            raise ValueError(
                f"offload: {self.offload!r} streams the frozen base under a LoRA; with finetune: full the "
                "transformer trains (use none or reward, or finetune: lora)"
            )
        for name, value in (("base_quantization", self.base_quantization), ("optimizer", self.optimizer)):
            if value not in ("none", "adamw") and importlib.util.find_spec("torchao") is None:
                raise ValueError(f"{name}: {value!r} needs the torchao package (pip install 'flowbp[quant]')")
        from flowbp.guard import parse_rules

        parse_rules(self.guard)  # the structure of each entry (the metric names are checked with the components)
        from flowbp.guard import check_schedule

        check_schedule(self)
        if self.lr_scheduler not in LR_SCHEDULERS:
            allowed = ", ".join(LR_SCHEDULERS)
            raise ValueError(f"lr_scheduler: unknown schedule {self.lr_scheduler!r}; allowed: {allowed}")
        if self.lr_scheduler == "constant" and self.lr_warmup_steps > 0:
            raise ValueError(
                f"lr_warmup_steps: {self.lr_warmup_steps} has no effect with lr_scheduler 'constant'; "
                "use 'constant_with_warmup' (or another schedule)"
            )

    def trackers(self) -> list[str]:
        """The accelerate ``log_with`` list; a tracker whose package is missing is a config error."""
        import importlib.util

        names = [n.strip() for n in self.log_with.split(",") if n.strip()]
        if names == ["none"]:
            return []
        for name in names:
            if name not in TRACKER_PACKAGES:
                allowed = ", ".join([*TRACKER_PACKAGES, "none"])
                raise ValueError(f"log_with: unknown tracker {name!r}; allowed: {allowed} (comma-separated)")
            if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
                raise ValueError(
                    f"log_with: {name!r} needs the {TRACKER_PACKAGES[name]} package (pip install "
                    f"{TRACKER_PACKAGES[name]}), or choose another tracker"
                )
        if not names:
            raise ValueError("log_with: empty; name a tracker or 'none'")
        return names

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (``None``: the defaults), apply ``overrides`` and validate everything.

    ``path`` may name a shipped preset (e.g. ``digits-hacking``) as well as a file.
    """
    values: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            preset = PRESETS_DIR / f"{path}.yaml"
            if not preset.is_file():
                presets = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
                raise ValueError(f"config: file not found: {path} (shipped presets: {presets})")
            file = preset
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"config: {file} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config: {file} must hold a mapping of key: value, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    return build_dataclass(TrainConfig, values, "config")


def validate_against_components(config: TrainConfig) -> None:
    """Checks that need the registries: the method and its overrides, the reward spec, the backbone name."""
    from flowbp.backbones import available_backbones
    from flowbp.methods import make_plan
    from flowbp.rewards import parse_reward_spec
    from flowbp.trajectory import training_sigmas

    if config.backbone not in available_backbones():
        raise ValueError(f"backbone: unknown backbone {config.backbone!r}; known: {', '.join(available_backbones())}")
    try:
        parse_reward_spec(config.reward)
    except ValueError as exc:
        raise ValueError(f"reward: {exc}") from exc
    if config.reward_paths:
        try:
            for name in config.reward_paths:  # a judge's weights (evaluation only) may be listed too
                parse_reward_spec(name, allow_judges=True)
        except ValueError as exc:
            raise ValueError(f"reward_paths: {exc}") from exc
    if config.eval_metrics is not None:
        from flowbp.evaluate import parse_metrics

        try:
            parse_metrics(config.eval_metrics)
        except ValueError as exc:
            raise ValueError(f"eval_metrics: {str(exc).removeprefix('--metrics: ')}") from exc
    from flowbp.guard import check_config

    check_config(config)  # guarded metrics must be evaluated for this backbone; needs eval_every
    # Draw one plan on the training grid of the configured length: catches unknown methods, unknown or
    # mistyped overrides and K larger than the number of steps before any output exists.
    try:
        make_plan(config.method, training_sigmas(config.num_inference_steps), 0, **config.method_args)
    except ValueError as exc:
        message = str(exc)
        prefix = "method" if message.startswith("method:") else "method_args"
        raise ValueError(f"{prefix}: {message.removeprefix('method: ')}") from exc


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
