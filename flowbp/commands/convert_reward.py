"""``flowbp convert-reward``: convert a reward checkpoint once into a folder ``load_reward`` reads.

- ``hpsv2``: HPS v2.1's open_clip state dict (``HPS_v2.1_compressed.pt``) → a transformers CLIPModel
  folder (config.json, model.safetensors, tokenizer files). Needs a CLIP tokenizer: a folder with
  tokenizer.json / vocab.json + merges.txt, or open_clip's ``bpe_simple_vocab_16e6.txt.gz``
  (``--tokenizer``, else next to ``--src``, else the hub cache of laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
- ``imagereward``: THUDM's ``ImageReward.pt`` (+ ``med_config.json`` beside it) → model.safetensors +
  imagereward_config.json + the BERT tokenizer (``--tokenizer`` folder with vocab.txt, else next to
  ``--src``, else the hub cache of google-bert/bert-base-uncased).

- ``hpsv3``: an HPSv3 ``.pt``/``.pth`` checkpoint (``{"model": state_dict}`` or a plain state dict, as the
  official inferencer accepts) → ``HPSv3.safetensors`` (same key names). The official release is already
  ``HPSv3.safetensors`` and needs no conversion. Put the Qwen2-VL-7B-Instruct config/tokenizer files next
  to it (or in ``base/``) to load it.

All read the pickle with ``torch.load(weights_only=True)``; the output is written to a temporary
folder and renamed, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

CHOICES = ("hpsv2", "imagereward", "hpsv3")


def _tokenizer_folder(arg: str | None, src: Path) -> Path:
    if arg is None:
        return src.parent
    path = Path(arg)
    if not path.exists():
        raise ValueError(f"--tokenizer: not found: {path}")
    return path.parent if path.is_file() else path


def run(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    src, out = Path(args.src), Path(args.out)
    if not src.is_file():
        raise ValueError(f"--src: file not found: {src}")
    if out.exists():
        raise ValueError(f"--out: {out} exists; choose a new folder")
    dtype = {"keep": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    tok_dir = _tokenizer_folder(args.tokenizer, src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if args.reward == "hpsv3":
            from flowbp.rewards.hpsv3 import convert_checkpoint

            convert_checkpoint(src, tmp, dtype)
        elif args.reward == "hpsv2":
            from flowbp.rewards.clip import convert_hpsv2, open_clip_heads
            from flowbp.rewards.tokenizers import LAION_H14, clip_tokenizer

            tokenizer = clip_tokenizer(tok_dir, "hpsv2", LAION_H14)
            model = convert_hpsv2(src, dtype, heads=open_clip_heads(src.parent),
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        else:
            from flowbp.rewards.imagereward import CONFIG_FILE, convert_checkpoint
            from flowbp.rewards.tokenizers import bert_tokenizer

            tokenizer = bert_tokenizer(tok_dir, "imagereward")
            model = convert_checkpoint(src, dtype)
            sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
            save_file(sd, str(tmp / "model.safetensors"))
            (tmp / CONFIG_FILE).write_text(json.dumps(model.config, indent=2))
            tokenizer.save_pretrained(tmp)
        (tmp / "flowbp_reward.json").write_text(json.dumps({"reward": args.reward, "source": src.name}, indent=2))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"wrote {out}: load it with load_reward({args.reward!r}, path={str(out)!r}) or reward_paths.{args.reward}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-reward",
                       help="convert a reward checkpoint (HPSv2.1, ImageReward, HPSv3) to safetensors",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reward", choices=CHOICES)
    p.add_argument("--src", required=True, help="HPS_v2.1_compressed.pt, ImageReward.pt or an HPSv3 .pt/.pth")
    p.add_argument("--out", required=True, help="new output folder")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or file (default: beside --src, then hub cache)")
    p.add_argument("--dtype", default="keep", choices=("keep", "float32", "float16", "bfloat16"),
                   help="weights dtype of the output (default: the checkpoint's)")
    p.set_defaults(func=run)
