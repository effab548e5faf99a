"""``flowbp export RUN_DIR --out DIR``: a finished run as a folder ready to upload to the Hugging Face Hub.

    flowbp export runs/my-run --out my-lora                      # diffusers LoRA, config, model card
    flowbp export runs/my-run --out my-lora --format comfyui     # + the kohya/ComfyUI key layout
    flowbp export runs/my-run --out my-lora --push me/my-lora    # + upload (needs network and a login)

The folder holds the weights as training shipped them (``pytorch_lora_weights.safetensors``, which
``pipe.load_lora_weights(DIR)`` reads; or ``transformer/`` after full fine-tuning), ``config.yaml``,
``summary.json``, the before/after sample grids and ``README.md``: a model card with the base model, the
method, the reward, the steps and the evaluation table with 95% confidence intervals. It appears complete
or not at all; an existing non-empty ``--out`` is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

COMFYUI_FILE = "{name}_comfyui.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ------------------------------------------------------------------------------------------- reading the run
def _read_run(run: str) -> tuple[Any, Path, dict[str, Any]]:
    from flowbp.config import load_config

    run_dir = Path(run)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"RUN_DIR: {run} is not a run directory (no config.yaml)")
    if not (run_dir / "summary.json").is_file():
        raise ValueError(
            f"RUN_DIR: {run} has not finished (no summary.json); finish it with `flowbp train --resume {run}`"
        )
    try:
        config = load_config(run_dir / "config.yaml")
        summary = json.loads((run_dir / "summary.json").read_text())
    except (ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"RUN_DIR: {run}: {' '.join(str(exc).split())}") from None
    return config, run_dir, summary


def _weights(run_dir: Path) -> tuple[str, Path]:
    from flowbp.commands.sample import run_weights

    found = run_weights(run_dir)
    if found is None:
        raise ValueError(f"RUN_DIR: {run_dir} holds no trained weights (lora/ or transformer/)")
    return found


def _latest_eval(run_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """The last periodic evaluation's summary (RUN/eval/step-N/summary.json), if the run made any."""
    steps = sorted((run_dir / "eval").glob("step-*/summary.json"))
    if not steps:
        return None
    return steps[-1].parent.name, json.loads(steps[-1].read_text())


# ------------------------------------------------------------------------------------------- the model card
def _pipeline_class(backbone: str) -> str | None:
    import importlib

    from flowbp.backbones import BACKBONES

    module, _, attr = BACKBONES[backbone].partition(":")
    cls = getattr(importlib.import_module(module), attr.split(".")[0])
    return getattr(cls, "pipeline_class_name", None) or None


def _ci_cell(stats: dict[str, Any]) -> str:
    from flowbp.report import fmt, fmt_ci

    return f"{fmt(stats['mean'], True)} {fmt_ci(stats['ci95_low'], stats['ci95_high'], True)}"


def model_card(config: Any, summary: dict[str, Any], kind: str, files: list[str], name: str,
               latest_eval: tuple[str, dict[str, Any]] | None) -> str:
    """README.md: YAML front matter for the Hub, what was trained and how, the evaluation with CIs, samples."""
    from flowbp.report import fmt

    base = config.backbone_path
    hub_base = base if base and _HUB_ID.match(base) and not Path(base).exists() else None
    reward = config.reward
    if not isinstance(reward, str):
        reward = " + ".join(f"{w}·{n}" for n, w in reward.items())
    tags = ["flowbp", "reward-backpropagation", "flow-matching", "text-to-image", config.backbone]
    if kind == "lora":
        tags.append("lora")
    front = ["---"]
    if hub_base:
        front.append(f"base_model: {hub_base}")
    front += ["library_name: diffusers" if config.backbone != "digits" else "library_name: flowbp", "tags:"]
    front += [f"- {t}" for t in tags]
    front.append("---")
    guidance = "the backbone's default" if config.guidance_scale is None else f"{config.guidance_scale:g}"
    rows = [
        ("base model", f"`{base}`" if base else f"the shipped {config.backbone} weights"),
        ("backbone", config.backbone),
        ("method", f"{config.method}" + (f" ({json.dumps(config.method_args)})" if config.method_args else "")),
        ("reward", reward),
        ("training steps", str(summary.get("steps", config.steps))),
        ("global batch", str(config.batch_size)),
        ("learning rate", f"{config.learning_rate:g}"),
        ("fine-tuning", f"LoRA rank {config.lora_rank}, alpha {config.lora_alpha or config.lora_rank}"
         if kind == "lora" else "full"),
        ("sampling", f"{config.num_inference_steps} steps, guidance {guidance}, resolution "
         f"{config.resolution or 'the backbone default'}"),
        ("seed", str(config.seed)),
    ]
    lines = [*front, "", f"# {name}", ""]
    lines += [
        f"A {'LoRA' if kind == 'lora' else 'full fine-tune'} of {config.backbone} trained with flowbp "
        f"(reward backpropagation for flow-matching models): method "
        f"**{config.method}**, reward **{reward}**, {summary.get('steps', config.steps)} steps.",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Evaluation",
        "",
        f"The same {summary.get('eval_samples', '?')} samples (fixed prompts and seeds) before and after training; "
        "the change is paired per sample, with a 95% Student-t confidence interval.",
        "",
        "| metric | before | after | change [95% CI] |",
        "|---|---|---|---|",
    ]
    before, after = summary.get("before") or {}, summary.get("after") or {}  # no "before": eval_at_start false
    changes = {"reward": summary.get("reward_improvement")}
    changes.update({k.removesuffix("_change"): v for k, v in summary.items() if k.endswith("_change")})
    for key in after:
        change = changes.get(key)
        if not isinstance(after[key], int | float):
            continue
        cell = _ci_cell(change) if isinstance(change, dict) and "mean" in change else "—"
        prior = fmt(before[key]) if key in before else "—"
        lines.append(f"| {key} | {prior} | {fmt(after[key])} | {cell} |")
    if latest_eval is not None:
        step, ev = latest_eval
        lines += [
            "",
            f"Held-out evaluation at {step} ({ev.get('n_images', '?')} images of {ev.get('n_prompts', '?')} prompts; "
            "95% CI over prompts):",
            "",
            "| metric | mean | 95% CI |",
            "|---|---|---|",
        ]
        for metric, s in ev.get("metrics", {}).items():
            lines.append(f"| {metric} | {fmt(s['mean'])} | [{fmt(s['ci95_low'])}, {fmt(s['ci95_high'])}] |")
    if "samples/before.png" in files or "samples/after.png" in files:
        lines += ["", "## Samples", "", "The same prompts and seeds before and after training (EMA weights).", ""]
        for tag in ("before", "after"):
            if f"samples/{tag}.png" in files:
                lines += [f"**{tag}**", "", f"![{tag} training](samples/{tag}.png)", ""]
    lines += ["", "## Use", ""]
    pipeline = _pipeline_class(config.backbone)
    if kind == "lora" and pipeline:
        lines += [
            "```python",
            "import torch",
            f"from diffusers import {pipeline}",
            "",
            f"pipe = {pipeline}.from_pretrained({hub_base or '<base model folder>'!r}, torch_dtype=torch.bfloat16)",
            "pipe.load_lora_weights(\"<this repository or folder>\")",
            "```",
        ]
    elif kind == "lora":
        lines += ["```bash", "flowbp sample --backbone digits --lora <this folder> --out samples", "```"]
    else:
        lines += ["The fine-tuned transformer is in `transformer/` (load it with the transformer class's "
                  "`from_pretrained(<folder>, subfolder=\"transformer\")` and pass it to the pipeline)."]
    comfy = [f for f in files if f.endswith("_comfyui.safetensors")]
    if comfy:
        lines += ["", f"ComfyUI: put `{comfy[0]}` in `models/loras/` (kohya key layout)."]
    lines += ["", "## Files", "", *(f"- `{f}`" for f in files), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the Hub
def check_push(repo_id: str) -> None:
    """Everything ``--push`` needs that can be known offline, before anything is written: one line each."""
    if not _HUB_ID.match(repo_id):
        raise ValueError(f"--push: {repo_id!r} is not a Hub repository id (owner/name)")
    try:
        import huggingface_hub
    except ImportError:
        raise ValueError("--push: needs the huggingface_hub package (pip install huggingface_hub)") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    if offline or huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ValueError("--push: the Hub is switched off here (HF_HUB_OFFLINE is set); export without --push and "
                         "upload the folder later with `hf upload REPO_ID DIR`")
    if not huggingface_hub.get_token():
        raise ValueError("--push: not logged in to the Hugging Face Hub (run `hf auth login` or set HF_TOKEN); "
                         "the export itself needs no login")


def push(folder: Path, repo_id: str, private: bool) -> str:
    """Create (or reuse) the model repository and upload the folder; a failure is one line that keeps the export."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message="flowbp export")
    except Exception as exc:  # network, authentication, permissions: huggingface_hub raises many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"--push: upload to {repo_id} failed ({type(exc).__name__}: {first}); the export is complete in "
            f"{folder}: retry with `hf upload {repo_id} {folder}`"
        ) from None
    return str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")


# ------------------------------------------------------------------------------------------- the command
def run(args: argparse.Namespace) -> int:
    config, run_dir, summary = _read_run(args.run_dir)
    kind, weights = _weights(run_dir)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out: {out} exists and is not empty (export into a new folder)")
    if args.format == "comfyui":
        from flowbp.lora_formats import comfyui_layouts

        if kind != "lora":
            raise ValueError("--format comfyui: only LoRA runs have a ComfyUI LoRA file (this run fine-tuned fully)")
        if config.backbone not in comfyui_layouts():
            raise ValueError(f"--format comfyui: no ComfyUI LoRA layout for backbone {config.backbone!r} "
                             f"(available: {', '.join(comfyui_layouts())})")
    if args.push:
        check_push(args.push)
    name = args.name or out.name

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files: list[str] = []
        if kind == "lora":
            source = weights / "pytorch_lora_weights.safetensors" if weights.is_dir() else weights
            shutil.copy2(source, tmp / "pytorch_lora_weights.safetensors")
            files.append("pytorch_lora_weights.safetensors")
            if args.format == "comfyui":
                files.append(_write_comfyui(config, source, tmp, name))
        elif weights.is_dir():
            shutil.copytree(weights, tmp / "transformer")
            files.append("transformer/")
        else:
            shutil.copy2(weights, tmp / weights.name)
            files.append(weights.name)
        for rel in ("config.yaml", "summary.json"):
            shutil.copy2(run_dir / rel, tmp / rel)
            files.append(rel)
        for tag, source_name in (("before", "step-000000.png"), ("after", "final.png")):
            grid = run_dir / "samples" / source_name
            if grid.is_file():
                (tmp / "samples").mkdir(exist_ok=True)
                shutil.copy2(grid, tmp / "samples" / f"{tag}.png")
                files.append(f"samples/{tag}.png")
        card = model_card(config, summary, kind, ["README.md", *files], name, _latest_eval(run_dir))
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out}: README.md (model card), {', '.join(files)}")
    if args.push:
        print(f"uploading {out} to the Hub as {args.push} …", file=sys.stderr, flush=True)
        print(f"pushed: {push(out, args.push, args.private)}")
    return 0


def _write_comfyui(config: Any, source: Path, folder: Path, name: str) -> str:
    from safetensors.torch import load_file, save_file

    from flowbp.lora_formats import to_kohya

    state = load_file(str(source))
    alpha = config.lora_alpha if config.lora_alpha is not None else config.lora_rank
    converted = to_kohya(config.backbone, state, alpha)
    file = COMFYUI_FILE.format(name=re.sub(r"[^\w.-]+", "_", name))
    save_file(converted, str(folder / file), metadata={"format": "pt", "ss_network_dim": str(config.lora_rank),
                                                       "ss_network_alpha": str(alpha)})
    return file


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="package a finished run for the Hugging Face Hub (LoRA, ComfyUI file, config, model card)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished `flowbp train` run directory")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist or be empty)")
    p.add_argument("--format", default="diffusers", choices=["diffusers", "comfyui"],
                   help="diffusers: the LoRA as `load_lora_weights` reads it (always written); comfyui: also the "
                   "kohya key layout ComfyUI loads")
    p.add_argument("--name", help="model name in the card and the ComfyUI file name (default: the --out folder name)")
    p.add_argument("--push", metavar="REPO_ID",
                   help="also upload to this Hub model repository (needs network and `hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --push: create the repository private")
    p.set_defaults(func=run)
