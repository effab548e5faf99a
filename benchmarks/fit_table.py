"""What fits where: the planner's recipe for every backbone × method × GPU size × process count.

    nice -n 10 python benchmarks/fit_table.py            # print the tables
    nice -n 10 python benchmarks/fit_table.py --write    # and write them into docs/memory.md and README.md

``--write`` replaces what lies between the ``<!-- fit-table:begin/end -->`` markers of docs/memory.md
(every preset) and between the ``<!-- fit-summary:begin/end -->`` markers of README.md (FlowBP-Lagrange
per backbone: the same cells; tests/test_readme.py checks that the two agree).

For each shipped real-backbone preset (512 px, bf16, the paper's global batch of the preset) and for
LoRA (rank of the preset) and full fine-tuning, it runs the planner of ``flowbp train --dry-run
--gpu-memory GIB --processes P`` for 24, 48 and 80 GiB and 1 and 8 processes, and prints the fastest
fitting recipe in short form (or "does not fit" with the smallest need), then checks the goals of the
memory issue. One meta-device profile per backbone × fine-tuning mode is shared by the nine methods
(a profile depends on the method only through its plan's counts, swapped in here), so the whole table
builds in a few minutes on a CPU.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

# Run from a checkout without installing: the repository root holds the flowbp package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowbp.config import load_config
from flowbp.dryrun import GiB, plan_cost
from flowbp.planner import Profile, Recipe, memory, profile_config, search

PREFIXES = {"sd35": "SD3.5-M", "flux1": "FLUX.1-dev", "flux2-klein": "FLUX.2-Klein"}
METHODS = ["refl", "draft-k", "draft-lv", "drtune", "alignprop", "leapalign",
           "flowbp-sparse", "flowbp-bridge", "flowbp-lagrange"]
SIZES = (24, 48, 80)
PROCESSES = (1, 8)


def short(r: Recipe, finetune: str) -> str:
    parts = [f"{r.micro_batch}×{r.accumulation}"]
    parts += ["ckpt"] * r.gradient_checkpointing + ["vae-ckpt"] * r.vae_gradient_checkpointing
    parts += [r.base_quantization] * (r.base_quantization != "none")
    parts += ["adamw8bit"] * (r.optimizer == "adamw8bit") + ["fsdp2"] * r.fsdp2
    return " ".join(parts)


def profiles(prefix: str, finetune: str, cache: dict) -> dict[str, Profile]:
    """The preset's profile for each method (one measurement per backbone × fine-tuning mode)."""
    out = {}
    for method in METHODS:
        cfg = load_config(f"{prefix}-{method}", {"finetune": finetune})
        key = (cfg.backbone, finetune, cfg.batch_size, cfg.detach_negative, cfg.reward)
        if key not in cache:
            print(f"measuring {prefix} {finetune} on the meta device …", file=sys.stderr, flush=True)
            cache[key] = profile_config(cfg)
        forwards, inputs, ckpt = plan_cost(method, cfg.method_args, cfg.num_inference_steps)
        out[method] = dataclasses.replace(
            cache[key], method=method, grad_forwards=forwards, reward_inputs=inputs, checkpointed_plan=ckpt,
            rollout_steps=cfg.num_inference_steps,
        )
    return out


def cell(p: Profile, gib: int, processes: int) -> str:
    plan = search(p, gib * GiB, processes)
    if plan.best is None:
        return f"does not fit (≥ {memory(p, plan.smallest).peak / GiB:.0f} GiB)"
    return short(plan.best, p.finetune)


def goal(p: Profile, gib: int, processes: int, text: str) -> str:
    plan = search(p, gib * GiB, processes)
    if plan.best is None:
        need = memory(p, plan.smallest).peak / GiB
        return f"| {text} | no: the smallest recipe needs {need:.1f} GiB ({short(plan.smallest, p.finetune)}) |"
    peak = memory(p, plan.best).peak / GiB
    return f"| {text} | yes: {short(plan.best, p.finetune)}, estimated {peak:.1f} GiB |"


def render(all_profiles: dict[tuple[str, str], dict[str, Profile]]) -> tuple[str, str]:
    """(the full tables with the goals, the README's FlowBP-Lagrange summary) as Markdown."""
    header = " | ".join(f"{g} GiB × {p}" for p in PROCESSES for g in SIZES)
    rule = "|---|---:|" + "---|" * (len(SIZES) * len(PROCESSES))
    full: list[str] = []
    summary = [f"| preset | fine-tuning | global batch | {header} |", rule.replace("|---|", "|---|---|", 1)]
    for finetune in ("lora", "full"):
        title = "LoRA (the presets' rank)" if finetune == "lora" else "Full fine-tuning"
        full += [f"### {title}", "", f"| preset | global batch | {header} |", rule]
        for prefix in PREFIXES:
            for method, p in all_profiles[(prefix, finetune)].items():
                cells = " | ".join(cell(p, g, n) for n in PROCESSES for g in SIZES)
                full.append(f"| {prefix}-{method} | {p.global_batch} | {cells} |")
                if method == "flowbp-lagrange":
                    summary.append(f"| {prefix}-{method} | {finetune} | {p.global_batch} | {cells} |")
        full.append("")
    lag = {k: v["flowbp-lagrange"] for k, v in all_profiles.items()}
    full += ["### The goals (FlowBP-Lagrange, 512 px, the paper's global batch)", "",
             "| goal | met by the estimate? |", "|---|---|",
             goal(lag[("sd35", "lora")], 16, 1, "SD3.5-M LoRA on one 16 GiB GPU")]
    for prefix in ("flux1", "flux2-klein"):
        full.append(goal(lag[(prefix, "lora")], 24, 1, f"{PREFIXES[prefix]} LoRA on one 24 GiB GPU"))
        full.append(goal(lag[(prefix, "lora")], 24, 8, f"{PREFIXES[prefix]} LoRA on 8 × 24 GiB"))
    full.append(goal(lag[("sd35", "full")], 48, 8, "SD3.5-M full fine-tuning on 8 × 48 GiB"))
    return "\n".join(full) + "\n", "\n".join(summary) + "\n"


def replace_between(path: Path, name: str, text: str) -> None:
    """Replace the lines between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in ``path`` (atomically)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text()
    if old.count(begin) != 1 or old.count(end) != 1:
        raise SystemExit(f"{path}: needs exactly one {begin} and one {end} line")
    head, rest = old.split(begin)
    _, tail = rest.split(end)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(f"{head}{begin}\n{text}{end}{tail}")
    tmp.replace(path)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write into docs/memory.md and README.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache: dict = {}
    all_profiles = {(prefix, ft): profiles(prefix, ft, cache) for prefix in PREFIXES for ft in ("lora", "full")}
    full, summary = render(all_profiles)
    print(full)
    if args.write:
        root = Path(__file__).resolve().parent.parent
        replace_between(root / "docs" / "memory.md", "fit-table", full)
        replace_between(root / "README.md", "fit-summary", summary)
        print("written: docs/memory.md, README.md", file=sys.stderr)


if __name__ == "__main__":
    main()
