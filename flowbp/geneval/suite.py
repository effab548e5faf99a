"""``flowbp eval --suite geneval``: the pieces the eval command calls (kept here so eval.py stays small).

The run directory gets, besides the usual ``scores.jsonl`` (metric ``geneval``: 1 for a correct
image, 0 otherwise; its mean over prompts is "% correct images") and ``summary.json`` (key
``geneval``: per-task accuracies and the overall score), two official-format files:

- ``geneval_results.jsonl``: one record per image exactly as GenEval's ``evaluate_images.py``
  writes them (``filename``, ``tag``, ``prompt``, ``correct``, ``reason``, ``metadata``, ``details``),
  so GenEval's own ``evaluation/summary_scores.py geneval_results.jsonl`` reads it;
- ``geneval.json``: the summary of :func:`flowbp.geneval.rules.summarize`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS_FILE = "geneval_results.jsonl"
SUMMARY_FILE = "geneval.json"
METRIC = "geneval"
IMAGES_PER_PROMPT = 4  # the official protocol (GenEval README; diffusers_generate.py --n_samples)


def read_metadata(path: str | None) -> list[dict[str, Any]]:
    """The shipped 553 prompts, or a GenEval metadata ``.jsonl`` given as ``--prompts`` (one-line errors)."""
    from flowbp.geneval.prompts import load_metadata

    if path is None:
        return load_metadata()
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--prompts: GenEval metadata file not found: {file}")
    try:
        records = load_metadata(file)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"--prompts: {exc}") from None
    for n, r in enumerate(records, 1):
        if not isinstance(r.get("prompt"), str) or not isinstance(r.get("tag"), str) or "include" not in r:
            raise ValueError(f"--prompts: {file} record {n}: need tag, prompt and include (GenEval metadata)")
    if not records:
        raise ValueError(f"--prompts: {file} holds no GenEval metadata records")
    return records


def is_official_layout(root: Path) -> bool:
    """GenEval's generation layout: ``<root>/00000/metadata.jsonl`` + ``samples/0000.png`` …"""
    return root.is_dir() and any(
        d.is_dir() and d.name.isdigit() and (d / "metadata.jsonl").is_file() for d in root.iterdir()
    )


def read_official_folder(root: Path, metadata: Sequence[Mapping[str, Any]]):
    """An :class:`~flowbp.evaluate.ImageSet` of an official-layout folder: folder N = prompt N, image k = seed k.

    Each folder's ``metadata.jsonl`` must equal record N of the metadata in use (else the folder was
    generated from other prompts, and its verdicts would be meaningless).
    """
    from flowbp.evaluate import ImageSet, load_image

    entries = []
    for folder in sorted(d for d in root.iterdir() if d.is_dir() and d.name.isdigit()):
        index = int(folder.name)
        meta_file = folder / "metadata.jsonl"
        if not meta_file.is_file():
            continue
        if index >= len(metadata):
            raise ValueError(f"--images: {folder.name}: prompt index {index}, but there are {len(metadata)} prompts")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"--images: {meta_file} is not one JSON record") from None
        if meta != dict(metadata[index]):
            raise ValueError(f"--images: {meta_file} ({meta.get('prompt')!r}) is not GenEval prompt {index} "
                             f"({metadata[index]['prompt']!r})")
        samples = folder / "samples"
        for image in sorted(samples.iterdir()) if samples.is_dir() else []:
            if image.is_file() and re.fullmatch(r"\d+\.png", image.name):
                entries.append((index, int(image.stem), image))
    if not entries:
        raise ValueError(f"--images: {root} holds no <N>/samples/<k>.png images (GenEval's layout)")
    images = []
    for _, _, path in entries:
        try:
            images.append(load_image(path))
        except OSError:
            raise ValueError(f"--images: cannot read {path} as an image") from None
    return ImageSet([m["prompt"] for m in metadata], [(i, s) for i, s, _ in entries], images,
                    [p for _, _, p in entries])


def score(image_set, metadata: Sequence[Mapping[str, Any]], scorer, progress: bool
          ) -> tuple[list[float], dict[str, Any], dict[str, str]]:
    """Per-image 1/0 scores, the GenEval summary, and the files to add to the run directory."""
    from flowbp.evaluate import image_name
    from flowbp.geneval.rules import summarize

    filenames = [f"images/{image_name(i, s)}" for i, s in image_set.keys]
    records = scorer.score(image_set.images, [metadata[i] for i, _ in image_set.keys], filenames, progress)
    summary = summarize(records)
    files = {
        RESULTS_FILE: "".join(json.dumps(r) + "\n" for r in records),
        SUMMARY_FILE: json.dumps(summary, indent=2) + "\n",
    }
    return [1.0 if r["correct"] else 0.0 for r in records], summary, files


def print_summary(summary: Mapping[str, Any]) -> None:
    """As GenEval's ``summary_scores.py`` prints it."""
    print(f"GenEval: {summary['images']} images of {summary['prompts']} prompts; "
          f"% correct images {summary['correct_images']:.2%}; % correct prompts {summary['correct_prompts']:.2%}")
    for tag, t in summary["tasks"].items():
        print(f"  {tag:<16} = {t['accuracy']:.2%} ({t['correct']} / {t['images']})")
    print(f"  Overall score (avg. over tasks): {summary['overall']:.5f}")
