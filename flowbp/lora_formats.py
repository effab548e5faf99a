"""LoRA key layouts for other tools: flowbp's diffusers/peft layout -> the kohya (sd-scripts) layout ComfyUI reads.

flowbp saves a LoRA as diffusers does (``transformer.<module>.lora_A.weight`` / ``lora_B``, scaled by
``lora_alpha / r``). The kohya layout names modules after the original (BFL) checkpoints
(``lora_unet_double_blocks_0_img_attn_qkv``), stores ``lora_down`` / ``lora_up`` and a scalar ``alpha``
per module, and fuses some projections that diffusers keeps apart (q, k, v → ``qkv``).

A fused kohya module of n diffusers modules of rank r gets rank n·r: ``lora_down`` stacks the n A
matrices and ``lora_up`` is block-diagonal in the n B matrices, so it changes each part exactly as
before; its ``alpha`` is n·α, keeping the scale α/r. This is the layout diffusers' own kohya readers
(``_convert_kohya_flux_lora_to_diffusers``, ``_convert_kohya_flux2_lora_to_diffusers``) recognise as
"sparse" and split back into the original parts exactly (tests/test_export.py loads it back through them).

Parts of a fused module that the LoRA does not train (e.g. FLUX.1's ``proj_mlp``, off by default) are
written as zeros: they change nothing.

SD3 has no kohya layout in diffusers to check against; ComfyUI reads SD3 LoRAs in the diffusers layout
itself (``transformer.<module>`` keys, comfy/lora.py "regular diffusers sd3 lora format"), so the
``comfyui`` file of an SD3 LoRA keeps the diffusers keys.
"""

from __future__ import annotations

import re

import torch

#: (kohya module suffix, diffusers module suffixes it fuses) per block kind, per backbone.
_FLUX1_DOUBLE = (
    ("img_attn_proj", ("attn.to_out.0",)),
    ("img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("img_mlp_0", ("ff.net.0.proj",)),
    ("img_mlp_2", ("ff.net.2",)),
    ("img_mod_lin", ("norm1.linear",)),
    ("txt_attn_proj", ("attn.to_add_out",)),
    ("txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("txt_mlp_0", ("ff_context.net.0.proj",)),
    ("txt_mlp_2", ("ff_context.net.2",)),
    ("txt_mod_lin", ("norm1_context.linear",)),
)
_FLUX1_SINGLE = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
    ("modulation_lin", ("norm.linear",)),
)
_FLUX2_DOUBLE = (
    ("img_attn_proj", ("attn.to_out.0",)),
    ("img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn_proj", ("attn.to_add_out",)),
    ("txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("img_mlp_0", ("ff.linear_in",)),
    ("img_mlp_2", ("ff.linear_out",)),
    ("txt_mlp_0", ("ff_context.linear_in",)),
    ("txt_mlp_2", ("ff_context.linear_out",)),
)
_FLUX2_SINGLE = (
    ("linear1", ("attn.to_qkv_mlp_proj",)),
    ("linear2", ("attn.to_out",)),
)
KOHYA_LAYOUTS: dict[str, dict[str, tuple]] = {
    "flux1": {"transformer_blocks": _FLUX1_DOUBLE, "single_transformer_blocks": _FLUX1_SINGLE},
    "flux2-klein": {"transformer_blocks": _FLUX2_DOUBLE, "single_transformer_blocks": _FLUX2_SINGLE},
}
_KOHYA_BLOCK = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}
#: FLUX.1's single-block MLP width is 4 × the model width (mlp_ratio): the out size of an untrained proj_mlp.
_FLUX1_MLP_RATIO = 4
_KEY = re.compile(r"transformer\.(.+)\.lora_([AB])\.weight")


def comfyui_layouts() -> list[str]:
    """Backbones with a ComfyUI LoRA layout (sd3: the diffusers keys, which ComfyUI reads as they are)."""
    return sorted([*KOHYA_LAYOUTS, "sd3"])


def _modules(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"A": ..., "B": ...}}`` from diffusers keys; anything else is an error naming the key."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"LoRA key {key!r} is not transformer.<module>.lora_A/B.weight")
        modules.setdefault(match.group(1), {})[match.group(2)] = tensor
    for name, ab in modules.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA module {name!r} lacks its lora_{'B' if 'A' in ab else 'A'} weight")
    return modules


def to_kohya(backbone: str, state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The kohya/ComfyUI layout of a diffusers-layout transformer LoRA with scale ``alpha / r``.

    ``sd3`` keeps the diffusers keys (see the module docstring); a module the layout has no kohya name
    for is an error naming it (nothing is dropped silently).
    """
    if backbone == "sd3":
        return dict(state)
    if backbone not in KOHYA_LAYOUTS:
        raise ValueError(
            f"--format comfyui: no ComfyUI LoRA layout for backbone {backbone!r} (available: "
            f"{', '.join(comfyui_layouts())})"
        )
    modules = _modules(state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    blocks = {
        (kind, int(m.group(1)))
        for name in modules
        for kind in KOHYA_LAYOUTS[backbone]
        if (m := re.match(rf"{kind}\.(\d+)\.", name))
    }
    for kind, index in sorted(blocks):
        for kohya_suffix, parts in KOHYA_LAYOUTS[backbone][kind]:
            names = [f"{kind}.{index}.{p}" for p in parts]
            present = [n for n in names if n in modules]
            if not present:
                continue
            ref = modules[present[0]]
            rank, width = ref["A"].shape
            dtype = ref["A"].dtype
            downs, ups = [], []
            for part, name in zip(parts, names, strict=True):
                if name in modules:
                    a, b = modules[name]["A"], modules[name]["B"]
                    if a.shape[0] != rank:
                        raise ValueError(f"LoRA module {name!r} has rank {a.shape[0]}, {present[0]!r} rank {rank}")
                    used.add(name)
                else:  # untrained part of a fused module: zeros
                    out_size = width * (_FLUX1_MLP_RATIO if part == "proj_mlp" else 1)
                    a, b = torch.zeros(rank, width, dtype=dtype), torch.zeros(out_size, rank, dtype=dtype)
                downs.append(a)
                ups.append(b)
            key = f"lora_unet_{_KOHYA_BLOCK[kind]}_{index}_{kohya_suffix}"
            out[f"{key}.lora_down.weight"] = torch.cat(downs).contiguous()
            out[f"{key}.lora_up.weight"] = torch.block_diag(*ups).contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(alpha) * len(parts), dtype=torch.float32)
    left = sorted(set(modules) - used)
    if left:
        raise ValueError(
            f"--format comfyui: {len(left)} LoRA modules have no kohya name in the {backbone} layout, e.g. "
            f"{left[0]!r} (train with the default lora_targets, or export the diffusers format only)"
        )
    return out
