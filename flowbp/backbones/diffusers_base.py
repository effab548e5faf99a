"""Shared machinery of the diffusers backbones (SD3/SD3.5, FLUX.1, FLUX.2-Klein).

A family adapter subclasses :class:`DiffusersBackbone` and supplies only what differs between
pipelines: how prompts are encoded (:meth:`~DiffusersBackbone._encode_batch`), the latent layout
(:meth:`~DiffusersBackbone.latent_shape`, :meth:`~DiffusersBackbone.latents_to_vae`), the shift of
the sigma grid (:meth:`~DiffusersBackbone.scheduler_shift`) and the guided velocity
(:meth:`~DiffusersBackbone.velocity_fn`). Everything else lives here, once:

- loading a pipeline folder or a hub id already in the user's cache (never a download unless
  ``local_files_only=False``), with one-line errors for a folder of the wrong architecture, a missing
  component and a resolution the latent grid cannot represent;
- device / dtype: frozen weights in ``dtype``, the transformer optionally in its own
  ``transformer_dtype`` (full fine-tuning keeps fp32 master weights), LoRA parameters always fp32;
  mixed-precision autocast is accelerate's job (``mixed_precision: bf16``);
- a prompt-embedding cache: each prompt is encoded once, kept on the CPU, and the text encoders
  visit the accelerator only while encoding (:meth:`~DiffusersBackbone.free_text_encoders` drops
  them once every prompt is cached);
- the paper's sigma grid (:func:`flowbp.trajectory.training_sigmas` with the family's shift);
- differentiable VAE decoding to [0, 1] (the pipelines' ``output_type="pt"`` post-processing) with
  optional VAE gradient checkpointing, and transformer gradient checkpointing;
- LoRA through peft with per-family default targets (a list of suffixes or one regex), saved as the
  raw peft state dict through ``PipelineClass.save_lora_weights`` so that ``pipe.load_lora_weights``
  restores it exactly; full fine-tuning saved as ``<dir>/transformer`` for ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from flowbp.backbones.base import VelocityFn
from flowbp.trajectory import training_sigmas

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: Bundled evaluation prompt set (HPDv2 test split, 400 prompts), the paper's.
DEFAULT_PROMPTS_FILE = Path(__file__).resolve().parent.parent / "assets" / "prompts" / "hpdv2_test_400.txt"
#: Transformer class -> flowbp backbone name, to tell a user which backbone a folder needs.
TRANSFORMER_TO_BACKBONE: dict[str, str] = {
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux1",
    "Flux2Transformer2DModel": "flux2-klein",
    "QwenImageTransformer2DModel": "qwen-image",
    "ZImageTransformer2DModel": "z-image",
}
#: Pipeline class -> backbone, where one transformer class serves several families (FLUX.2-dev and
#: FLUX.2-Klein share ``Flux2Transformer2DModel``): the folder's ``_class_name`` tells them apart.
PIPELINE_TO_BACKBONE: dict[str, str] = {
    "Flux2Pipeline": "flux2",
    "Flux2KleinPipeline": "flux2-klein",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def default_eval_prompts() -> list[str]:
    """The 400 HPDv2 test prompts shipped with the package (the paper's evaluation set)."""
    return [line.strip() for line in DEFAULT_PROMPTS_FILE.read_text().splitlines() if line.strip()]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def resolve_pipeline_dir(path: str | Path, local_files_only: bool = True) -> Path:
    """A local pipeline folder, or the cached snapshot of a hub id (downloaded only if allowed)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if not _HUB_ID.match(str(path)):
        raise ValueError(f"backbone_path: {path} is neither a directory nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), local_files_only=local_files_only))
    except Exception as exc:  # LocalEntryNotFoundError, gated / offline errors, ...
        hint = " (not in the local hub cache; download it first or pass a folder)" if local_files_only else ""
        raise ValueError(f"backbone_path: cannot find {path}{hint}: {_first_line(exc)}") from exc


def read_model_index(folder: Path) -> dict[str, Any]:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"backbone_path: {folder} is not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"backbone_path: {index_file} is not valid JSON: {exc}") from exc
    if not isinstance(index, dict):
        raise ValueError(f"backbone_path: {index_file} must hold a JSON object")
    return index


def _component_class(index: dict[str, Any], name: str) -> str | None:
    entry = index.get(name)
    if isinstance(entry, list) and len(entry) == 2 and entry[1] is not None:
        return str(entry[1])
    return None


@dataclass
class PromptCondition:
    """Encoded prompts, batch-first tensors on the backbone's device.

    ``tensors`` holds the positive branch as the transformer's keyword arguments (e.g.
    ``encoder_hidden_states``, ``pooled_projections``); ``negative`` the same for the negative
    prompt, batch-aligned, or ``None`` for a family without a negative branch.
    """

    prompts: list[str]
    tensors: dict[str, torch.Tensor]
    negative: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.prompts)


class DiffusersBackbone:
    """Base adapter over a diffusers pipeline; implements :class:`flowbp.backbones.base.Backbone`.

    Subclasses set the class attributes and implement the abstract hooks below.
    """

    #: Registry name ("sd3", "flux1", "flux2-klein").
    name: ClassVar[str] = ""
    #: The default prompts are the HPDv2 test prompts: an evaluation set, never trained on by default.
    trains_on_default_prompts: ClassVar[bool] = False
    #: diffusers pipeline class name, e.g. "StableDiffusion3Pipeline" (used to load and to save LoRA).
    pipeline_class_name: ClassVar[str] = ""
    #: The transformer class a folder must hold for this backbone.
    transformer_class_name: ClassVar[str] = ""
    #: Components that must be present (model_index entry + sub-folder) to train.
    required_components: ClassVar[tuple[str, ...]] = ("transformer", "vae", "scheduler")
    #: peft target modules: a list of name suffixes or a single full-match regex.
    default_lora_targets: ClassVar[Sequence[str] | str] = ()
    default_guidance_scale: ClassVar[float] = 1.0
    default_resolution: ClassVar[int] = 512
    #: Default negative prompt (real-CFG families); None: no negative branch.
    negative_prompt: ClassVar[str | None] = None

    def __init__(
        self,
        pipe: Any,
        resolution: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
        vae_gradient_checkpointing: bool = False,
        max_sequence_length: int | None = None,
    ) -> None:
        """Wrap an already-built pipeline (tests, dry-runs); users call :meth:`from_pretrained`."""
        self.pipe = pipe
        self.device = torch.device(device)
        self.dtype = dtype
        self.resolution = int(self.default_resolution if resolution is None else resolution)
        self.max_sequence_length = max_sequence_length
        self.transformer: nn.Module = pipe.transformer
        self.vae: nn.Module | None = getattr(pipe, "vae", None)
        self.scheduler = getattr(pipe, "scheduler", None)
        self.check_resolution(self.resolution)
        self.transformer.requires_grad_(False).eval().to(self.device)
        self._model_dtype = next(self.transformer.parameters()).dtype
        if self.vae is not None:
            self.vae.requires_grad_(False).eval().to(self.device)
            if vae_gradient_checkpointing:
                self.vae.enable_gradient_checkpointing()
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        for encoder in self.text_encoders():
            encoder.requires_grad_(False).eval()  # kept off the accelerator until needed
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        resolution: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        transformer_dtype: torch.dtype | None = None,
        local_files_only: bool = True,
        **kwargs: Any,
    ) -> DiffusersBackbone:
        """Load a pipeline folder or cached hub id; every failure is a one-line ``ValueError``.

        ``dtype`` is the dtype of the frozen components (VAE, text encoders, a LoRA-trained
        transformer's base weights); ``transformer_dtype`` overrides it for the transformer (fp32
        master weights for full fine-tuning under bf16 autocast). Other keyword arguments go to
        ``__init__`` (``gradient_checkpointing``, ``vae_gradient_checkpointing``,
        ``max_sequence_length``).
        """
        if path is None:
            raise ValueError(f"backbone_path: the {cls.name} backbone needs a pipeline folder or hub id")
        if resolution is not None:
            cls.check_resolution_value(resolution)
        folder = resolve_pipeline_dir(path, local_files_only)
        index = read_model_index(folder)
        found = _component_class(index, "transformer")
        pipeline_found = str(index.get("_class_name", "?"))
        owner = PIPELINE_TO_BACKBONE.get(pipeline_found) or TRANSFORMER_TO_BACKBONE.get(found or "")
        if found != cls.transformer_class_name:
            hint = f" (use backbone={owner})" if owner else ""
            raise ValueError(
                f"backbone_path: {path} holds a {pipeline_found} with transformer {found}; "
                f"backbone {cls.name!r} needs {cls.transformer_class_name}{hint}"
            )
        if PIPELINE_TO_BACKBONE.get(pipeline_found, cls.name) != cls.name:
            raise ValueError(
                f"backbone_path: {path} holds a {pipeline_found}; backbone {cls.name!r} needs a "
                f"{cls.pipeline_class_name} (use backbone={owner})"
            )
        for component in cls.required_components:
            if _component_class(index, component) is None:
                raise ValueError(f"backbone_path: {path} has no {component!r} component in model_index.json")
            if not (folder / component).is_dir():
                raise ValueError(f"backbone_path: {path} lacks the {component}/ folder of component {component!r}")
        import diffusers

        from flowbp.quiet import quiet_third_party, shorten_prompt_truncation

        quiet_third_party()  # before the pipeline class is resolved: transformers warns while it is
        pipeline_cls = getattr(diffusers, cls.pipeline_class_name)
        shorten_prompt_truncation(pipeline_cls.__module__)
        dtypes: dict[str, torch.dtype] = {"default": dtype}
        if transformer_dtype is not None:
            dtypes["transformer"] = transformer_dtype
        try:
            with _quiet_loading():  # errors must stay one line; no progress bars around them
                pipe = pipeline_cls.from_pretrained(str(folder), dtype=dtypes, local_files_only=True)
        except Exception as exc:
            raise ValueError(
                f"backbone_path: cannot load {path} as {cls.pipeline_class_name}: {_first_line(exc)}"
            ) from exc
        return cls(pipe, resolution=resolution, device=device, dtype=dtype, **kwargs)

    # ------------------------------------------------------------------ geometry
    @classmethod
    def check_resolution_value(cls, resolution: int) -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution: must be a positive integer, got {resolution!r}")

    @property
    def vae_scale_factor(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", 8))

    def spatial_multiple(self) -> int:
        """Pixels per latent token side: VAE factor × the family's patch (override per family)."""
        return self.vae_scale_factor * int(getattr(self.transformer.config, "patch_size", 1))

    def check_resolution(self, resolution: int) -> None:
        self.check_resolution_value(resolution)
        multiple = self.spatial_multiple()
        if resolution % multiple:
            raise ValueError(
                f"resolution: {resolution} is not divisible by {multiple} (VAE factor {self.vae_scale_factor} × "
                f"patch {multiple // self.vae_scale_factor}) for this {self.name} model"
            )

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """Shape of x (the layout the pipeline's ``latents=`` argument takes)."""
        raise NotImplementedError

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_0 ~ N(0, I) in the pipeline's ``latents=`` layout, float32 (drawn on the generator's device)."""
        gen_device = generator.device if generator is not None else self.device
        noise = torch.randn(self.latent_shape(batch_size), generator=generator, device=gen_device)
        return noise.to(self.device, torch.float32)

    # ------------------------------------------------------------------ sigmas
    def scheduler_shift(self, num_steps: int) -> float:
        """S of σ = S·s / (1 + (S − 1)·s): the static shift, or e^μ for dynamic exponential shifting."""
        config = self.scheduler.config
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
            if config.get(key, False):
                raise ValueError(f"scheduler: {key}=True is not supported (the training grid is the shifted linspace)")
        if config.get("use_dynamic_shifting", False):
            mu = self.dynamic_mu(num_steps)
            if config.get("time_shift_type", "exponential") == "linear":
                return float(mu)
            return math.exp(mu)
        return float(config.get("shift", 1.0))

    def dynamic_mu(self, num_steps: int) -> float:
        """μ for dynamic shifting; families override (FLUX.1: from the sequence length; FLUX.2: also from N)."""
        raise ValueError(f"scheduler: dynamic shifting is not supported by the {self.name} backbone")

    def sequence_length_mu(self) -> float:
        """diffusers' ``calculate_shift`` (one function, copied verbatim into the FLUX.1, Qwen-Image and Z-Image
        pipelines) on the family's ``image_seq_len()``, with the scheduler config's bounds."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.scheduler.config
        return float(calculate_shift(
            self.image_seq_len(),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        ))

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The paper's grid: ``linspace(1, 1/N, N)`` shifted by the scheduler's shift, then 0 (float64).

        A scheduler with ``shift_terminal`` (Qwen-Image: 0.02) then stretches the shifted grid so that
        its last nonzero σ is that value, ``σ'' = 1 − (1 − σ')(1 − terminal)/(1 − σ'_N)``, as its
        ``set_timesteps(sigmas=…)`` does; the others end at shift(1/N).
        """
        grid = training_sigmas(num_steps, self.scheduler_shift(num_steps))
        terminal = self.scheduler.config.get("shift_terminal", None)
        if terminal:
            if not 0 < float(terminal) < 1:
                raise ValueError(f"scheduler: shift_terminal must be in (0, 1), got {terminal}")
            if num_steps > 1:  # at N = 1, 1 − σ'_N is 0 (the scheduler yields NaN); the step stays 1 → 0
                one_minus = 1 - grid[:-1]
                grid[:-1] = 1 - one_minus * (1 - float(terminal)) / one_minus[-1]
        return grid

    def pipeline_sigmas(self, num_steps: int) -> list[float]:
        """What to pass to the pipeline's ``sigmas=`` to get :meth:`sigmas` (without the final 0)."""
        return torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64).tolist()

    # ------------------------------------------------------------------ prompts
    def text_encoders(self) -> list[nn.Module]:
        return [
            m for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if isinstance(m := getattr(self.pipe, name, None), nn.Module)
        ]

    def _encode_batch(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Encode prompts with the pipeline's own encoder code -> transformer kwargs, batch-first."""
        raise NotImplementedError

    def _move_text_encoders(self, device: torch.device) -> None:
        for encoder in self.text_encoders():
            encoder.to(device)

    def cache_prompts(self, prompts: Sequence[str]) -> None:
        """Encode every prompt not yet cached (in chunks), keeping the embeddings on the CPU."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if not todo:
            return
        if not self.text_encoders():
            raise ValueError(f"prompts: {todo[0]!r} is not cached and the text encoders were freed")
        on_accelerator = self.device.type != "cpu"
        if on_accelerator:
            self._move_text_encoders(self.device)
        try:
            with torch.no_grad():
                for start in range(0, len(todo), 32):
                    chunk = todo[start : start + 32]
                    encoded = self._encode_batch(chunk, self.device)
                    for i, prompt in enumerate(chunk):
                        self._cache[prompt] = {k: v[i : i + 1].detach().to("cpu") for k, v in encoded.items()}
        finally:
            if on_accelerator:  # the text encoders must not occupy accelerator memory during training
                self._move_text_encoders(torch.device("cpu"))

    def free_text_encoders(self) -> None:
        """Drop the text encoders (and tokenizers) once every needed prompt is cached."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)

    def _gather(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        keys = self._cache[prompts[0]].keys()
        out = {}
        for k in keys:
            t = torch.cat([self._cache[p][k] for p in prompts]).to(self.device)
            out[k] = t.to(self._model_dtype) if t.is_floating_point() else t
        return out

    def encode_prompts(self, prompts: Sequence[str]) -> PromptCondition:
        """Cached embeddings of ``prompts`` (and of the negative prompt for real-CFG families)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts: need a non-empty list of strings, got {prompts!r}")
        needed = prompts + ([self.negative_prompt] if self.negative_prompt is not None else [])
        self.cache_prompts(needed)
        negative = None
        if self.negative_prompt is not None:
            neg = self._gather([self.negative_prompt])
            negative = {k: v.expand(len(prompts), *v.shape[1:]) for k, v in neg.items()}
        return PromptCondition(prompts, self._gather(prompts), negative)

    def default_prompts(self) -> list[str]:
        """The 400 HPDv2 test prompts (the paper's evaluation set)."""
        return default_eval_prompts()

    # ------------------------------------------------------------------ velocity
    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """Latents in the transformer's weight dtype (autocast, when on, handles the compute dtype)."""
        return x.to(self._model_dtype)

    def velocity_fn(
        self, condition: PromptCondition, guidance_scale: float | None = None, detach_uncond: bool = False
    ) -> VelocityFn:
        raise NotImplementedError

    # ------------------------------------------------------------------ decoding
    def latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampler latents -> the VAE decoder's input (unpack, un-normalise). SD3/FLUX.1 scaling by default."""
        config = self.vae.config
        shift = config.get("shift_factor", None) or 0.0
        return latents / config.scaling_factor + shift

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], B×3×H×W float32, differentiable (``output_type="pt"``)."""
        if self.vae is None:
            raise ValueError(f"the {self.name} backbone was built without a VAE")
        z = self.latents_to_vae(latents)
        vae_dtype = next(self.vae.parameters()).dtype
        image = self.vae.decode(z.to(vae_dtype), return_dict=False)[0]
        return (image.float() * 0.5 + 0.5).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ LoRA / full weights
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def add_lora(
        self, rank: int, alpha: float | None = None, target_modules: Sequence[str] | str | None = None
    ) -> None:
        """Freeze the transformer and attach a peft LoRA adapter ``default`` (B = 0: starts as the base).

        ``target_modules``: a list of module-name suffixes or one regex matched against full names
        (peft semantics); ``None`` uses the family's default. LoRA parameters are kept in fp32
        whatever the base weights' dtype.
        """
        from peft import LoraConfig

        targets = self.default_lora_targets if target_modules is None else target_modules
        if isinstance(targets, list | tuple) and len(targets) == 1 and _looks_like_regex(targets[0]):
            targets = targets[0]
        self.transformer.requires_grad_(False)
        config = LoraConfig(
            r=rank,
            lora_alpha=float(rank if alpha is None else alpha),
            target_modules=targets if isinstance(targets, str) else list(targets),
            init_lora_weights=True,
        )
        try:
            self.transformer.add_adapter(config)
        except ValueError as exc:
            raise ValueError(
                f"lora_targets: {targets!r} do not fit the {self.name} transformer: {_first_line(exc)}"
            ) from exc
        for p in self.trainable_parameters():
            if p.dtype != torch.float32:
                p.data = p.data.float()

    def save_lora(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Save the adapter as ``<path>/pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights``.

        The raw peft state dict goes through the pipeline's own ``save_lora_weights`` (keys
        ``transformer.…`` plus the peft config as metadata). It is deliberately not converted with
        ``convert_state_dict_to_diffusers``: for FLUX.2 that silently drops adapters on load.
        """
        import diffusers
        from peft.utils import get_peft_model_state_dict

        transformer = _unwrap(self.transformer)
        pipeline_cls = getattr(diffusers, self.pipeline_class_name)
        pipeline_cls.save_lora_weights(
            str(path),
            transformer_lora_layers=get_peft_model_state_dict(transformer, state_dict=state_dict),
            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
            weight_name=LORA_WEIGHT_NAME,
        )

    def load_lora(self, path: str | Path) -> None:
        """Load an adapter saved by :meth:`save_lora` (directory or file), replacing any current one."""
        path = Path(path)
        directory, weight_name = (path.parent, path.name) if path.is_file() else (path, LORA_WEIGHT_NAME)
        transformer = _unwrap(self.transformer)
        if getattr(transformer, "peft_config", None) and "default" in transformer.peft_config:
            transformer.delete_adapters("default")
        transformer.load_lora_adapter(
            str(directory), weight_name=weight_name, prefix="transformer", adapter_name="default"
        )

    def save_full(self, path: str | Path) -> Path:
        """Save the (fully fine-tuned) transformer to ``<path>/transformer``.

        Load it with ``<TransformerClass>.from_pretrained(path, subfolder="transformer")`` and hand it to
        the pipeline: ``Pipeline.from_pretrained(base, transformer=...)``.
        """
        target = Path(path) / "transformer"
        _unwrap(self.transformer).save_pretrained(str(target))
        return target

    # ------------------------------------------------------------------ convenience
    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        num_steps: int = 25,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Plain Euler sampling on the training grid without gradient; images B×3×H×W in [0, 1]."""
        from flowbp.trajectory import rollout

        cond = self.encode_prompts(prompts)
        x0 = self.initial_noise(len(cond), generator) if noise is None else noise.to(self.device, torch.float32)
        traj = rollout(self.velocity_fn(cond, guidance_scale), x0, self.sigmas(num_steps))
        return self.decode(traj.sample)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence diffusers' and transformers' loading progress bars (restored afterwards)."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    d_was, t_was = d_logging.is_progress_bar_enabled(), t_logging.is_progress_bar_enabled()
    d_logging.disable_progress_bar()
    t_logging.disable_progress_bar()
    try:
        yield
    finally:
        if d_was:
            d_logging.enable_progress_bar()
        if t_was:
            t_logging.enable_progress_bar()


def _looks_like_regex(text: str) -> bool:
    return any(c in text for c in "*()|[]\\$^")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
