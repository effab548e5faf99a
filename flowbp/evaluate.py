"""Evaluation on a fixed prompt × seed set: the reward per sample and the backbone's held-out metrics.

The same noise is used before and after training, so differences are paired and their confidence
intervals are tight.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowbp.stats import group_means, mean_ci, paired_difference
from flowbp.trajectory import rollout

#: Held-out metrics per backbone: "module:function" with (images, prompts) -> (metrics, per-sample values).
#: Training never sees them.
HELDOUT_METRICS: dict[str, str] = {"digits": "flowbp.evaluate:digits_heldout"}


def digits_heldout(images: torch.Tensor, prompts: Sequence[str]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Independent-classifier accuracy, Fréchet distance to real digits, diversity; per-sample correctness."""
    from flowbp.backbones.digits import prompt_labels
    from flowbp.testbed.heldout_metrics import evaluate_images, heldout_logits

    correct = heldout_logits(images).argmax(1).cpu() == prompt_labels(prompts).cpu()
    return evaluate_images(images, prompts), {"heldout_correct": correct.double()}


@dataclass
class EvalResult:
    prompts: list[str]
    rewards: torch.Tensor  # (n,) the training reward per sample
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    per_sample: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. heldout correctness
    images: torch.Tensor | None = None

    def summary(self) -> dict[str, float]:
        out = {"reward": float(self.rewards.mean())}
        out.update({f"reward/{k}": float(v.mean()) for k, v in self.reward_parts.items()})
        out.update(self.metrics)
        return out


def _load(path: str) -> Callable:
    import importlib

    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@torch.no_grad()
def evaluate(
    backbone,
    reward: torch.nn.Module | None,
    prompts: Sequence[str],
    samples_per_prompt: int,
    num_steps: int,
    guidance_scale: float | None,
    seed: int,
    chunk: int = 128,
    heldout: bool = True,
) -> EvalResult:
    """Sample ``samples_per_prompt`` images per prompt from fixed seeds and score them.

    ``reward=None`` skips scoring (rewards are then empty) and ``heldout=False`` the held-out metrics:
    a sample grid needs neither.
    """
    all_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    gen = torch.Generator().manual_seed(seed)
    sigmas = backbone.sigmas(num_steps)
    images, rewards, parts = [], [], {}
    for start in range(0, len(all_prompts), chunk):
        batch = all_prompts[start : start + chunk]
        cond = backbone.encode_prompts(batch)
        noise = backbone.initial_noise(len(batch), gen)
        traj = rollout(backbone.velocity_fn(cond, guidance_scale), noise, sigmas)
        img = backbone.decode(traj.sample).float()
        images.append(img.cpu())
        if reward is None:
            continue
        rewards.append(reward(img, batch).float().cpu())
        if hasattr(reward, "parts"):
            for k, v in reward.parts(img, batch).items():
                parts.setdefault(k, []).append(v.float().cpu())
    result = EvalResult(
        prompts=all_prompts,
        rewards=torch.cat(rewards) if rewards else torch.empty(0),
        reward_parts={k: torch.cat(v) for k, v in parts.items()},
        images=torch.cat(images),
    )
    if heldout and backbone.name in HELDOUT_METRICS:
        result.metrics, result.per_sample = _load(HELDOUT_METRICS[backbone.name])(result.images, all_prompts)
    return result


# =====================================================================================================
# `flowbp eval`: per-image scores of a model or a folder of images, summaries with CIs, paired comparisons
# =====================================================================================================
#
# One image is identified by (prompt index, seed). In model mode the noise of image (i, s) is drawn from
# its own generator seeded with s, so an image depends only on its prompt, its seed and the model: never
# on the batch it was sampled in. That is what makes two runs pairable image by image.
#
# Images are quantised to 8 bits *before* scoring (they are scored exactly as saved to PNG), so scoring
# the saved PNGs again (folder mode) reproduces every score, and real evaluations, which receive uint8
# images, are what is measured.

SCORES_FILE = "scores.jsonl"
SUMMARY_FILE = "summary.json"
COMPARISON_FILE = "comparison.json"
IMAGES_DIR = "images"
MANIFEST_FILE = "manifest.jsonl"
#: Image names in a folder without manifest: p<prompt index>_s<seed>.png (e.g. p0003_s1.png).
IMAGE_NAME = re.compile(r"p(\d+)_s(-?\d+)\.(?:png|jpg|jpeg|webp)", re.IGNORECASE)


def image_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:04d}_s{seed}.png"


def _heldout_correct(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    from flowbp.backbones.digits import prompt_labels
    from flowbp.testbed.heldout_metrics import heldout_logits

    return (heldout_logits(images).argmax(1) == prompt_labels(prompts)).double()


def _heldout_logprob(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    from flowbp.backbones.digits import prompt_labels
    from flowbp.testbed.heldout_metrics import heldout_logits

    logp = heldout_logits(images).double().log_softmax(-1)
    return logp.gather(1, prompt_labels(prompts)[:, None]).squeeze(1)


#: Per-image metrics that are not rewards (never trained on): name -> (images, prompts) -> Tensor[B].
EVAL_METRICS: dict[str, Callable[[torch.Tensor, Sequence[str]], torch.Tensor]] = {
    # digits: does the independent held-out classifier see the prompted digit (1/0), and its log-prob
    "heldout-correct": _heldout_correct,
    "heldout-logprob": _heldout_logprob,
}


def available_metrics() -> list[str]:
    from flowbp.rewards import available_judges, available_rewards

    return sorted(set(available_rewards()) | set(available_judges()) | set(EVAL_METRICS))


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    """``"a,b+0.5*c"`` -> ``["a", "b+0.5*c"]``: each a held-out metric or a reward spec; validated."""
    from flowbp.rewards import parse_reward_spec

    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    if not items:
        raise ValueError(f"--metrics: no metric given; known metrics: {', '.join(available_metrics())}")
    for item in items:
        if item in EVAL_METRICS:
            continue
        try:
            parse_reward_spec(item, allow_judges=True)  # judges (unifiedreward-*) are evaluation metrics
        except ValueError as exc:
            # a plain unknown name needs only the list of names; a malformed sum also the parser's reason
            reason = "" if str(exc).startswith("unknown reward") else f" ({exc})"
            raise ValueError(
                f"--metrics: {item!r} is not a metric{reason}; known metrics: {', '.join(available_metrics())}"
            ) from None
    if len(set(items)) != len(items):
        raise ValueError(f"--metrics: a metric is listed twice in {','.join(items)}")
    return items


def load_metric(
    spec: str,
    reward_paths: Mapping[str, str] | None = None,
    device: str | torch.device = "cpu",
    judge_options: Mapping[str, Any] | None = None,
):
    """The scorer of one metric spec: a held-out metric, or the reward ``spec`` (weights from ``reward_paths``).

    ``reward_paths`` maps reward names to weight locations (``path=`` of their constructors).
    ``judge_options`` go to a judge's constructor only (``url``, ``model``, ``timeout``, ...; see
    :mod:`flowbp.rewards.unifiedreward`); building a judge checks its server or folder.
    """
    from flowbp.rewards import JUDGES, load_reward

    if spec in EVAL_METRICS:
        return EVAL_METRICS[spec]
    extra: dict[str, Any] = {}
    if spec in JUDGES:
        extra = {"device": device, **{k: v for k, v in (judge_options or {}).items() if v is not None}}
    reward = load_reward(spec, paths=dict(reward_paths or {}), **extra)
    return reward.to(device).eval().requires_grad_(False)


def read_prompts(path: str | Path, field_name: str = "--prompts") -> list[str]:
    """One prompt per line (blank lines skipped; a trailing newline is fine); ``field_name`` heads every error.

    The one reader of prompt files: ``flowbp eval --prompts`` and training's ``prompts_file`` /
    ``eval_prompts_file``.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{field_name}: prompts file not found: {file}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else exc.strerror or type(exc).__name__
        raise ValueError(f"{field_name}: cannot read {file} as text ({reason}; one prompt per line)") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{field_name}: {file} holds no prompts (one prompt per line)")
    return prompts


@dataclass
class ImageSet:
    """Images to score: (prompt index, seed) per image, the images and, in folder mode, their files."""

    prompts: list[str]  # the prompt set (indexed by prompt_index)
    keys: list[tuple[int, int]]  # (prompt_index, seed) per image
    # 3×H×W uint8 on the CPU: what a PNG holds, and a quarter of the memory of floats (400 images at 1024²)
    images: list[torch.Tensor] = field(default_factory=list)
    sources: list[Path | None] = field(default_factory=list)  # the file each image came from (folder mode)

    def image_prompts(self) -> list[str]:
        return [self.prompts[i] for i, _ in self.keys]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats (any leading shape) -> uint8 k = round(255·x) on the CPU, as a PNG stores them."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> the [0, 1] floats a metric receives (k/255)."""
    return images.float() / 255


def load_image(path: Path) -> torch.Tensor:
    """An image file as a 3×H×W uint8 tensor (RGB)."""
    from PIL import Image

    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def plan_keys(num_prompts: int, images_per_prompt: int, seed: int) -> list[tuple[int, int]]:
    """Image k of every prompt uses seed ``seed + k``: the same seeds for every prompt and every run."""
    return [(i, seed + k) for i in range(num_prompts) for k in range(images_per_prompt)]


@torch.no_grad()
def generate(
    backbone,
    prompts: Sequence[str],
    keys: Sequence[tuple[int, int]],
    num_steps: int,
    guidance_scale: float | None,
    batch_size: int = 16,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Sample one image per (prompt index, seed), each from its own seeded noise; uint8, on the CPU."""
    from tqdm.auto import tqdm

    sigmas = backbone.sigmas(num_steps)
    out: list[torch.Tensor] = []
    bar = tqdm(total=len(keys), desc="sampling", unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        batch_prompts = [prompts[i] for i, _ in chunk]
        noise = torch.cat([backbone.initial_noise(1, torch.Generator().manual_seed(s)) for _, s in chunk])
        traj = rollout(backbone.velocity_fn(backbone.encode_prompts(batch_prompts), guidance_scale), noise, sigmas)
        out.extend(to_uint8(backbone.decode(traj.sample)).unbind(0))
        bar.update(len(chunk))
    bar.close()
    return out


@torch.no_grad()
def score(
    images: Sequence[torch.Tensor],
    prompts: Sequence[str],
    metrics: Mapping[str, Callable],
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = False,
    answers: dict[str, list[str | None]] | None = None,
) -> dict[str, list[float]]:
    """Every metric on every uint8 image (as k/255; batches of one size), as Python floats in image order.

    A judge (a metric with ``last_answers``, e.g. ``unifiedreward-align``) may return NaN: no parsable score
    (:func:`is_missing`). Its raw answer text per image goes to ``answers[name]`` when a dict is passed.
    """
    from tqdm.auto import tqdm

    batches: list[list[int]] = []
    for k, img in enumerate(images):  # consecutive images of one size form a batch
        if batches and len(batches[-1]) < batch_size and images[batches[-1][0]].shape == img.shape:
            batches[-1].append(k)
        else:
            batches.append([k])
    values: dict[str, list[float]] = {name: [0.0] * len(images) for name in metrics}
    bar = tqdm(
        total=len(images) * len(metrics), desc="scoring", unit="score", disable=not progress, dynamic_ncols=True
    )
    for name, fn in metrics.items():
        for idx in batches:
            x = to_float(torch.stack([images[k] for k in idx]).to(device))
            s = fn(x, [prompts[k] for k in idx]).detach().double().cpu().reshape(-1)
            if s.numel() != len(idx):
                raise ValueError(f"metric {name!r} returned {s.numel()} scores for {len(idx)} images")
            for k, v in zip(idx, s.tolist(), strict=True):
                values[name][k] = v
            texts = getattr(fn, "last_answers", None)
            if answers is not None and texts is not None:
                kept = answers.setdefault(name, [None] * len(images))
                for k, text in zip(idx, texts, strict=True):
                    kept[k] = text
            bar.update(len(idx))
    bar.close()
    return values


def is_missing(value: float | None) -> bool:
    """A score that does not exist: ``None`` (``null`` in scores.jsonl) or NaN (a judge without a parsable answer)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def records_of(
    image_set: ImageSet,
    scores: Mapping[str, Sequence[float]],
    answers: Mapping[str, Sequence[str | None]] | None = None,
) -> list[dict[str, Any]]:
    """One JSON record per image: prompt index, prompt, seed, image path (relative to the run), scores.

    A missing score is ``None`` (JSON ``null``, never NaN or a stand-in number); a judge's raw answers go to
    ``"answers": {metric: text}`` so a missing score can be read back.
    """
    records = []
    for k, (i, s) in enumerate(image_set.keys):
        rec: dict[str, Any] = {"prompt_index": i, "prompt": image_set.prompts[i], "seed": s}
        rec["image"] = f"{IMAGES_DIR}/{image_name(i, s)}"
        rec["scores"] = {name: None if is_missing(values[k]) else values[k] for name, values in scores.items()}
        if answers:
            rec["answers"] = {name: texts[k] for name, texts in answers.items()}
        records.append(rec)
    return records


def summarize(records: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per metric: the mean and 95% Student-t CI over *prompts*.

    The images of one prompt are not independent draws of the evaluation (they share the prompt), so the
    scores are first averaged within each prompt (:func:`flowbp.stats.group_means`) and the interval is
    taken over the per-prompt means, with n_prompts − 1 degrees of freedom.

    Missing scores (a judge's unparsable answers) are left out and counted in ``n_missing``; a prompt whose
    images are all missing drops out of the interval. A metric with no score at all has ``mean`` None.
    """
    out = {}
    for name in metrics:
        present = [r for r in records if not is_missing(r["scores"][name])]
        entry: dict[str, Any] = {"mean": None, "ci95_low": None, "ci95_high": None, "half": None,
                                 "std_over_prompts": None, "n_prompts": 0}
        if present:
            per_prompt = group_means([r["scores"][name] for r in present], [r["prompt_index"] for r in present])
            ci = mean_ci(per_prompt)
            entry = {"mean": ci["mean"], "ci95_low": ci["ci95_low"], "ci95_high": ci["ci95_high"],
                     "half": ci["half"], "std_over_prompts": ci["std"], "n_prompts": ci["n"]}
        out[name] = {**entry, "n_images": len(present), "n_missing": len(records) - len(present)}
    return out


def read_scores(run: str | Path, field_name: str = "--compare") -> list[dict[str, Any]]:
    """The records of a finished eval run directory (``scores.jsonl``)."""
    file = Path(run) / SCORES_FILE
    if not Path(run).is_dir():
        raise ValueError(f"{field_name}: not a directory: {run}")
    if not file.is_file():
        raise ValueError(f"{field_name}: {run} is not an eval run (no {SCORES_FILE}; write one with `flowbp eval`)")
    records = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            int(rec["prompt_index"]), int(rec["seed"]), str(rec["prompt"]), dict(rec["scores"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{field_name}: {file} line {n} is not a score record") from None
        records.append(rec)
    if not records:
        raise ValueError(f"{field_name}: {file} holds no scores")
    return records


def pairing_error(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> str | None:
    """Why two runs cannot be paired image by image (None when they can)."""
    ka = {(r["prompt_index"], r["seed"]): r["prompt"] for r in a}
    kb = {(r["prompt_index"], r["seed"]): r["prompt"] for r in b}
    only_a, only_b = sorted(set(ka) - set(kb)), sorted(set(kb) - set(ka))
    if only_a or only_b:
        which, (i, s) = ("A", only_a[0]) if only_a else ("B", only_b[0])
        return (
            f"the runs have different prompts/seeds ({len(ka)} vs {len(kb)} images; prompt {i}, seed {s} is only in "
            f"{which}); compare runs of the same prompts file, --images-per-prompt and --seed"
        )
    for key in ka:
        if ka[key] != kb[key]:
            return f"prompt {key[0]} differs between the runs ({ka[key]!r} vs {kb[key]!r}): not the same prompts file"
    return None


def compare(
    a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], field_name: str = "--compare"
) -> dict[str, dict[str, Any]]:
    """Paired comparison A − B of every metric both runs scored, paired by prompt and seed.

    Per prompt, the differences of its images (matched by seed) are averaged; the 95% Student-t interval
    is over prompts (:func:`flowbp.stats.paired_difference`). ``significant``: the interval excludes 0.
    """
    reason = pairing_error(a, b)
    if reason:
        raise ValueError(f"{field_name}: {reason}")
    common = [m for m in a[0]["scores"] if all(m in r["scores"] for r in b) and all(m in r["scores"] for r in a)]
    if not common:
        raise ValueError(
            f"{field_name}: the runs share no metric (A: {', '.join(a[0]['scores'])}; B: {', '.join(b[0]['scores'])})"
        )
    by_key = {(r["prompt_index"], r["seed"]): r for r in b}
    out = {}
    for m in common:
        # an image missing on either side (a judge without a parsable answer) leaves the pairing
        pairs = [(r, by_key[(r["prompt_index"], r["seed"])]) for r in a]
        pairs = [(x, y) for x, y in pairs if not is_missing(x["scores"][m]) and not is_missing(y["scores"][m])]
        if not pairs:
            out[m] = {"mean_a": None, "mean_b": None, "diff": None, "ci95_low": None, "ci95_high": None,
                      "significant": False, "n_prompts": 0, "n_images": 0, "n_missing": len(a)}
            continue
        groups = [x["prompt_index"] for x, _ in pairs]
        va = group_means([x["scores"][m] for x, _ in pairs], groups)
        vb = group_means([y["scores"][m] for _, y in pairs], groups)
        diff = paired_difference(va, vb)
        out[m] = {
            "mean_a": float(va.mean()),
            "mean_b": float(vb.mean()),
            "diff": diff["mean"],
            "ci95_low": diff["ci95_low"],
            "ci95_high": diff["ci95_high"],
            "significant": diff["significant"],
            "n_prompts": diff["n"],
            "n_images": len(pairs),
            "n_missing": len(a) - len(pairs),
        }
    return out


def read_image_folder(folder: str | Path, prompts: Sequence[str]) -> ImageSet:
    """Images of a folder, each tied to a prompt index and a seed, checked against the prompts file.

    Layout, either

    - ``manifest.jsonl`` in the folder: one ``{"image": "rel/path.png", "prompt_index": i, "seed": s}`` per
      line (``"prompt"`` optional; if given, it must equal line i of the prompts file); or
    - files named ``p<prompt index>_s<seed>.png`` (e.g. ``p0003_s1.png``; .jpg/.webp too), as ``flowbp eval``
      writes them to ``RUN/images``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--images: not a directory: {root}")
    entries: list[tuple[int, int, Path]] = []
    manifest = root / MANIFEST_FILE
    if manifest.is_file():
        for n, line in enumerate(manifest.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                i, s, rel = int(rec["prompt_index"]), int(rec["seed"]), str(rec["image"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f"--images: {manifest} line {n}: need {{\"image\": PATH, \"prompt_index\": INT, \"seed\": INT}}"
                ) from None
            if 0 <= i < len(prompts) and "prompt" in rec and rec["prompt"] != prompts[i]:
                raise ValueError(
                    f"--images: {manifest} line {n}: prompt {rec['prompt']!r} is not line {i} of the prompts file "
                    f"({prompts[i]!r})"
                )
            entries.append((i, s, root / rel))
    else:
        for file in sorted(root.iterdir()):
            match = IMAGE_NAME.fullmatch(file.name)
            if match:
                entries.append((int(match.group(1)), int(match.group(2)), file))
            elif file.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}:
                raise ValueError(
                    f"--images: {file.name} is not named p<prompt index>_s<seed>.png (and there is no {MANIFEST_FILE})"
                )
    if not entries:
        raise ValueError(f"--images: {root} holds no images named p<prompt index>_s<seed>.png and no {MANIFEST_FILE}")
    seen: set[tuple[int, int]] = set()
    for i, s, path in entries:
        if not 0 <= i < len(prompts):
            raise ValueError(
                f"--images: {path.name} has prompt index {i}, but the prompts file has {len(prompts)} prompts "
                f"(0..{len(prompts) - 1}): folder and prompts file do not match"
            )
        if (i, s) in seen:
            raise ValueError(f"--images: prompt {i}, seed {s} appears twice")
        if not path.is_file():
            raise ValueError(f"--images: image not found: {path}")
        seen.add((i, s))
    entries.sort(key=lambda e: (e[0], e[1]))
    images = []
    for _, _, path in entries:
        try:
            images.append(load_image(path))
        except OSError:
            raise ValueError(f"--images: cannot read {path} as an image") from None
    return ImageSet(list(prompts), [(i, s) for i, s, _ in entries], images, [p for _, _, p in entries])


@dataclass
class EvalOutput:
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    comparison: dict[str, Any] | None = None


def write_run(
    out: str | Path,
    image_set: ImageSet,
    metrics: Sequence[str],
    scores: Mapping[str, Sequence[float]],
    info: Mapping[str, Any],
    baseline: tuple[str, Sequence[Mapping[str, Any]]] | None = None,
    overwrite: bool = False,
    embed_images: bool = False,
    sheet_max: int = 64,
    answers: Mapping[str, Sequence[str | None]] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> EvalOutput:
    """Write the whole run atomically: a temporary sibling directory is renamed into place at the end.

    ``RUN/images/p<i>_s<seed>.png``, ``scores.jsonl``, ``summary.json``, ``comparison.json`` (with a
    baseline), ``contact_sheet.png`` and ``report.html``; ``answers`` are judges' raw texts per image (kept in
    scores.jsonl) and ``extra_files`` maps further file names to their text (e.g. a suite's table).
    """
    import os
    import shutil
    import tempfile
    import uuid

    from flowbp.report import contact_sheet, write_report

    out = Path(out)
    records = records_of(image_set, scores, answers)
    summary = {
        **info,
        "n_prompts": len({i for i, _ in image_set.keys}),
        "n_images": len(image_set.keys),
        "ci": "95% Student-t over prompts: each prompt's images are averaged first (they are not independent)",
        "metrics": summarize(records, metrics),
    }
    comparison = None
    if baseline is not None:
        name, base_records = baseline
        comparison = {
            "a": str(out),
            "b": name,
            "pairing": "by prompt and seed; differences averaged within prompt; 95% Student-t over prompts",
            "metrics": compare(records, base_records, "--baseline"),
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    # (mkdir, not mkdtemp: the run directory gets the user's usual permissions, not 0700)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / IMAGES_DIR).mkdir()
        from PIL import Image

        for rec, img in zip(records, image_set.images, strict=True):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp / rec["image"])
        (tmp / SCORES_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        if comparison is not None:
            (tmp / COMPARISON_FILE).write_text(json.dumps(comparison, indent=2) + "\n")
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text)
        contact_sheet(tmp, records, metrics, tmp / "contact_sheet.png", max_images=sheet_max)
        write_report(tmp, summary, records, metrics, comparison, embed_images=embed_images)
        if out.exists():
            if not overwrite:
                raise ValueError(f"--out: {out} exists (pass --overwrite to replace it)")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EvalOutput(records, summary, comparison)


# =====================================================================================================
# Periodic evaluation during training (the same code as `flowbp eval`)
# =====================================================================================================

#: Held-out per-image metrics a backbone's periodic evaluation adds to the training reward by default.
DEFAULT_EVAL_METRICS: dict[str, tuple[str, ...]] = {"digits": ("heldout-correct", "heldout-logprob")}


def eval_metric_specs(config, backbone_name: str) -> list[str]:
    """``eval_metrics`` of the config, or the training reward plus the backbone's held-out metrics."""
    if config.eval_metrics:
        return parse_metrics(list(config.eval_metrics))
    reward = config.reward if isinstance(config.reward, str) else "+".join(f"{w}*{n}" for n, w in config.reward.items())
    return [reward, *DEFAULT_EVAL_METRICS.get(backbone_name, ())]


_SCORERS: dict[tuple[str, str, str], Callable] = {}  # (spec, reward paths, device) -> loaded scorer


def periodic_eval(run, keep: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """Evaluate the EMA weights of a training run on its held-out prompt set; log and write it.

    Every ``eval_every`` steps: ``eval_samples_per_prompt`` images per prompt (seeds ``eval_seed + k``), every
    metric of :func:`eval_metric_specs`, exactly as ``flowbp eval`` does. Writes ``RUN/eval/step-NNNNNN/``
    (a full eval run: scores.jsonl, summary.json, report.html, …; any two can be compared with
    ``flowbp eval --compare``), logs ``eval/<metric>`` (mean) and ``eval/<metric>/ci95_*`` to TensorBoard
    and returns ``{metric: {mean, ci95_low, ci95_high, n_prompts}}`` for history.json. Every process
    samples (a DDP forward may synchronise buffers); only the main process writes. ``keep``, if given,
    receives ``image_set``, ``specs`` and the per-image ``scores`` (the reward-hacking guard pairs them).
    """
    from flowbp.training.weights import ema_weights

    c, backbone = run.config, run.backbone
    # the run's evaluation set: eval_prompts_file, else the backbone's (digits prompts; the 400 HPDv2 test
    # prompts for real backbones), cut to eval_max_prompts
    prompts = list(run.eval_prompts)
    batch_size = c.eval_batch_size
    specs = eval_metric_specs(c, backbone.name)
    device = run.accelerator.device
    scorers = {}
    for spec in specs:
        if spec == c.reward:  # the training reward is already loaded: no second copy of a large model
            scorers[spec] = run.reward
        else:
            paths = c.reward_paths
            key = (spec, json.dumps(paths, sort_keys=True), str(device))
            if key not in _SCORERS:  # large reward models load once per process, not once per evaluation
                _SCORERS[key] = load_metric(spec, paths, device)
            scorers[spec] = _SCORERS[key]
    keys = plan_keys(len(prompts), c.eval_samples_per_prompt, c.eval_seed)
    image_set = ImageSet(list(prompts), keys)
    with ema_weights(run):
        image_set.images = generate(backbone, prompts, keys, c.num_inference_steps, c.guidance_scale, batch_size)
    answers: dict[str, list[str | None]] = {}
    scores = score(image_set.images, image_set.image_prompts(), scorers, batch_size, device, answers=answers)
    records = records_of(image_set, scores, answers)
    summary = summarize(records, specs)
    if keep is not None:
        keep.update(image_set=image_set, specs=specs, scores=scores)
    if run.accelerator.is_main_process:
        info = {"mode": "training", "run": str(run.run_dir), "step": run.step, "backbone": c.backbone,
                "images_per_prompt": c.eval_samples_per_prompt, "seed": c.eval_seed,
                "steps": c.num_inference_steps, "guidance": c.guidance_scale}
        step_dir = run.run_dir / "eval" / f"step-{run.step:06d}"
        write_run(step_dir, image_set, specs, scores, info, overwrite=True, answers=answers)
        if run.writer is not None:
            for name, s in summary.items():
                if s["mean"] is None:  # every score missing (a judge that never answered with a score)
                    continue
                run.writer.add_scalar(f"eval/{name}", s["mean"], run.step)
                if math.isfinite(s["half"]):
                    run.writer.add_scalar(f"eval/{name}/ci95_low", s["ci95_low"], run.step)
                    run.writer.add_scalar(f"eval/{name}/ci95_high", s["ci95_high"], run.step)
    return {
        name: {k: s[k] for k in ("mean", "ci95_low", "ci95_high", "n_prompts")} for name, s in summary.items()
    }
