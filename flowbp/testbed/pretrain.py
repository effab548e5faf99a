"""Pretraining of the digits testbed: the flow model, the reward classifier, the held-out judge.

Everything is seeded and runs on two CPU cores in a few minutes; the shipped assets in
``flowbp/assets/`` were produced by ``flowbp pretrain digits --out flowbp/assets`` (the command
records its own timings and quality numbers in each JSON config under ``"training"``).

Three models, three seeds, two disjoint data splits (see :mod:`flowbp.testbed.data`):

- :func:`pretrain_flow`: the class-conditional SD3-style flow model on ``train`` (seed ``s``).
- :func:`pretrain_reward_classifier`: :class:`~flowbp.rewards.digits.DigitClassifier` on ``reward``
  (seed ``s + 1``).
- :func:`pretrain_heldout_classifier`: :class:`~flowbp.testbed.heldout_metrics.HeldoutDigitClassifier`
  on ``heldout`` (seed ``s + 2``) — the independent judge that no training ever sees.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from flowbp.backbones.digits import NULL_ID, PROMPTS, DigitsBackbone
from flowbp.rewards.digits import REWARD_CLASSIFIER, DigitClassifier
from flowbp.testbed.data import load_digits_split
from flowbp.testbed.heldout_metrics import HELDOUT_CLASSIFIER, HeldoutDigitClassifier, heldout_accuracy

DEFAULT_FLOW_STEPS = 1500


def default_output_dir() -> Path:
    """Where ``flowbp pretrain digits`` writes without ``--out``: a user directory, never site-packages.

    ``$FLOWBP_HOME/digits`` if set, else ``$XDG_CACHE_HOME/flowbp/digits`` (``~/.cache/flowbp/digits``).
    """
    if os.environ.get("FLOWBP_HOME"):
        return Path(os.environ["FLOWBP_HOME"]) / "digits"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flowbp" / "digits"


def _lr_factor(step: int, total: int, warmup: int) -> float:
    # Linear warm-up then cosine decay to 10 %: the usual recipe; short runs need the warm-up
    # (adaLN transformers diverge easily at full learning rate from random init).
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain_flow(
    out_dir: str | Path | None = None,
    seed: int = 0,
    steps: int = DEFAULT_FLOW_STEPS,
    batch_size: int = 128,
    lr: float = 1e-3,
    label_dropout: float = 0.1,
    ema_decay: float = 0.995,
    progress: bool = True,
) -> DigitsBackbone:
    """Train the flow model by conditional flow matching; returns the EMA backbone (and saves it).

    Loss: ‖v_θ(x_σ, σ, c) − (ε − x)‖² with x_σ = (1 − σ)x + σε, σ ~ U(0, 1), x the ``train``
    digits scaled to [-1, 1]. The prompt is replaced by the null prompt with probability
    ``label_dropout`` so that the same network provides the unconditional branch of CFG.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_digits_split("train")
    data = images * 2 - 1  # pixels are latents, in [-1, 1]
    backbone = DigitsBackbone()
    model, text = backbone.transformer, backbone.text_encoder
    model.train()
    text.requires_grad_(True)
    params = [*model.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = min(100, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup))
    ema = copy.deepcopy(nn.ModuleList([model, text])).requires_grad_(False)

    bar = tqdm(range(steps), desc="flow model", disable=not progress)
    for step in bar:
        idx = torch.randint(len(data), (batch_size,), generator=gen)
        x, y = data[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=gen) < label_dropout] = NULL_ID
        noise = torch.randn(x.shape, generator=gen)
        sigma = torch.rand(batch_size, generator=gen)
        x_sigma = (1 - sigma[:, None, None, None]) * x + sigma[:, None, None, None] * noise
        ehs, pooled = text(y)
        pred = backbone.transformer_forward(x_sigma, sigma * 1000, ehs, pooled)
        loss = F.mse_loss(pred, noise - x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # EMA weights sample markedly better than the raw iterate
            decay = min(ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), [*model.parameters(), *text.parameters()], strict=True):
                e.lerp_(p, 1 - decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")

    backbone.transformer, backbone.text_encoder = ema[0].eval(), ema[1]
    backbone.text_encoder.requires_grad_(False)
    backbone.transformer.requires_grad_(True)
    if out_dir is not None:
        backbone.save_pretrained(
            out_dir,
            extra={"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
                   "label_dropout": label_dropout, "ema_decay": ema_decay, "split": "train"},
        )
    return backbone


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shifts of up to 1 px, intensity scaling and pixel noise: makes the classifiers judge
    digits, not the exact rendering of the 1,797 originals (generated samples are slightly off)."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    x = padded[..., dy : dy + 16, dx : dx + 16]
    x = x * (0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=gen))
    x = x + 0.05 * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def _train_classifier(
    model: nn.Module, split: str, seed: int, epochs: int, lr: float, desc: str, progress: bool
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_digits_split(split)  # type: ignore[arg-type]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    batch = 64
    steps = epochs * math.ceil(len(labels) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, steps // 20 + 1))
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        idx = torch.randint(len(labels), (batch,), generator=gen)
        loss = F.cross_entropy(model(_augment(images[idx], gen)), labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval().requires_grad_(False)
    test_x, test_y = load_digits_split("test")
    with torch.no_grad():
        acc = (model(test_x).argmax(-1) == test_y).float().mean().item()
    return {"seed": seed, "split": split, "epochs": epochs, "lr": lr, "test_accuracy": round(acc, 4)}


def _save_classifier(model: nn.Module, out_dir: str | Path, stem: str, kwargs: dict, info: dict) -> None:
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / f"{stem}.safetensors"))
    (directory / f"{stem}.json").write_text(json.dumps({"model": kwargs, "training": info}, indent=2) + "\n")


def pretrain_reward_classifier(
    out_dir: str | Path | None = None, seed: int = 1, epochs: int = 40, progress: bool = True
) -> tuple[DigitClassifier, dict[str, Any]]:
    """Train the reward classifier on the ``reward`` split; returns (model, info) and saves it."""
    torch.manual_seed(seed)
    kwargs = {"width": 16, "feature_dim": 64}
    model = DigitClassifier(**kwargs)
    info = _train_classifier(model, "reward", seed, epochs, 3e-3, "reward classifier", progress)
    if out_dir is not None:
        _save_classifier(model, out_dir, REWARD_CLASSIFIER, kwargs, info)
    return model, info


def pretrain_heldout_classifier(
    out_dir: str | Path | None = None, seed: int = 2, epochs: int = 40, progress: bool = True
) -> tuple[HeldoutDigitClassifier, dict[str, Any]]:
    """Train the independent held-out classifier on the ``heldout`` split (disjoint from ``reward``)."""
    torch.manual_seed(seed)
    kwargs = {"width": 24, "feature_dim": 64, "dropout": 0.3}
    model = HeldoutDigitClassifier(**kwargs)
    info = _train_classifier(model, "heldout", seed, epochs, 2e-3, "held-out classifier", progress)
    if out_dir is not None:
        _save_classifier(model, out_dir, HELDOUT_CLASSIFIER, kwargs, info)
    return model, info


@torch.no_grad()
def base_model_accuracy(
    backbone: DigitsBackbone,
    classifier: nn.Module,
    per_class: int = 50,
    num_steps: int = 25,
    guidance_scale: float | None = None,
    seed: int = 1234,
) -> float:
    """Held-out accuracy of the backbone's samples (``per_class`` per digit, Euler, ``num_steps``)."""
    prompts = [p for p in PROMPTS for _ in range(per_class)]
    images = backbone.sample(prompts, num_steps, guidance_scale, torch.Generator().manual_seed(seed))
    return heldout_accuracy(images, prompts, classifier)


def pretrain_digits(
    out_dir: str | Path | None = None, seed: int = 0, steps: int = DEFAULT_FLOW_STEPS, progress: bool = True
) -> dict[str, Any]:
    """Train all three models into ``out_dir`` (default :func:`default_output_dir`); returns a report.

    The held-out classifier is trained first so the flow model's JSON can record the accuracy of
    its own samples (guidance = the default, 25 Euler steps) as judged by it.
    """
    out = default_output_dir() if out_dir is None else Path(out_dir)
    report: dict[str, Any] = {"out_dir": str(out)}
    t0 = time.perf_counter()
    heldout, report["heldout_classifier"] = pretrain_heldout_classifier(out, seed + 2, progress=progress)
    t1 = time.perf_counter()
    _, report["reward_classifier"] = pretrain_reward_classifier(out, seed + 1, progress=progress)
    t2 = time.perf_counter()
    backbone = pretrain_flow(None, seed, steps, progress=progress)
    t3 = time.perf_counter()
    acc = base_model_accuracy(backbone, heldout)
    timings = {"heldout_classifier_s": round(t1 - t0, 1), "reward_classifier_s": round(t2 - t1, 1),
               "flow_s": round(t3 - t2, 1), "threads": torch.get_num_threads()}
    backbone.save_pretrained(
        out,
        extra={"seed": seed, "steps": steps, "split": "train", "timings": timings,
               "heldout_accuracy_g_default_25_steps": round(acc, 4)},
    )
    report.update(timings=timings, base_heldout_accuracy=acc, total_s=round(time.perf_counter() - t0, 1))
    return report


__all__ = [
    "base_model_accuracy",
    "default_output_dir",
    "pretrain_digits",
    "pretrain_flow",
    "pretrain_heldout_classifier",
    "pretrain_reward_classifier",
]
