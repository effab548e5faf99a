"""Score images with the official HPSv3 package (PyPI hpsv3 1.0.0) — run in its own environment.

    PYTHONPATH=/work/venv-hpsv3 python tests/hpsv3_official.py TINY_DIR OUT.json IMG1.png PROMPT1 [IMG2.png PROMPT2 …]

``/work/venv-hpsv3`` holds hpsv3 1.0.0 with the transformers it pins (4.45.2; tokenizers 0.20.3,
huggingface_hub 0.26.5, trl 0.11.4, peft 0.13.2, omegaconf, fire, pandas), installed with ``pip install --target``
and run on the main environment's torch. torchvision (only used by hpsv3 for videos) and ``datasets``
(imported by its trainer module, unused for scoring) are replaced by empty stand-ins, because no
torchvision build matches this torch. Everything that scores is the package's own code:
``HPSv3RewardInferencer`` (config parsing, ``create_model_and_processor``, the strict checkpoint load,
``prepare_batch`` with its message, ``process_vision_info`` resize and the 4.45 processor) and
``Qwen2VLRewardModelBT.forward``. Writes ``{"mu": [...], "sigma": [...], "input_ids": [...], "pixel_values_sum": x}``.
"""

from __future__ import annotations

import enum
import importlib.machinery
import json
import sys
import tempfile
import types
from pathlib import Path


def install_stubs() -> None:
    tv = types.ModuleType("torchvision")
    tv.__path__ = []
    io = types.ModuleType("torchvision.io")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.__path__ = []
    functional = types.ModuleType("torchvision.transforms.functional")

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    transforms.InterpolationMode = InterpolationMode
    transforms.functional = functional
    tv.io, tv.transforms, tv.__version__ = io, transforms, "0.0.0"
    ds = types.ModuleType("datasets")
    ds.Dataset = type("Dataset", (), {})
    mods = {"torchvision": tv, "torchvision.io": io, "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional, "datasets": ds}
    for name, mod in mods.items():
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = mod


def main() -> None:
    tiny, out, *pairs = sys.argv[1:]
    install_stubs()
    import hpsv3
    import torch
    import yaml
    from hpsv3 import HPSv3RewardInferencer
    from PIL import Image

    cfg = yaml.safe_load((Path(hpsv3.__file__).parent / "config" / "HPSv3_7B.yaml").read_text())
    # the shipped config, pointed at the tiny base model and run in float32 on the CPU
    cfg.update({"model_name_or_path": str(Path(tiny) / "base"), "bf16": False, "torch_dtype": "float32",
                "disable_flash_attn2": True, "deepspeed": None, "report_to": "none", "gradient_checkpointing": False})
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "HPSv3_tiny.yaml"
        config_path.write_text(yaml.safe_dump(cfg))
        inferencer = HPSv3RewardInferencer(str(config_path), str(Path(tiny) / "HPSv3.safetensors"), device="cpu")
    images = [Image.open(p) for p in pairs[0::2]]
    prompts = list(pairs[1::2])
    batch = inferencer.prepare_batch(images, prompts)
    with torch.no_grad():
        # reward(image_paths, prompts) in 1.0.0 (the argument order changed between versions)
        rewards = inferencer.reward(images, prompts)
    json.dump({"mu": rewards[:, 0].tolist(), "sigma": rewards[:, 1].tolist(),
               "input_ids": batch["input_ids"].tolist(), "pixel_values_sum": float(batch["pixel_values"].sum()),
               "image_grid_thw": batch["image_grid_thw"].tolist()}, open(out, "w"))


if __name__ == "__main__":
    main()
