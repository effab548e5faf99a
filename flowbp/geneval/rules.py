"""GenEval's scoring rules, written from djghosh13/geneval ``evaluation/evaluate_images.py`` (@af4902f).

Everything here is pure: detections in, verdicts out. The detector and the colour classifier are
passed in (:mod:`flowbp.geneval.detectors`, :mod:`flowbp.geneval.colour`), so the rules can be tested
on hand-built detections. Names, thresholds, reason strings and the order of the checks are the
official ones:

- per class keep detections with score **>** ``THRESHOLD`` (0.3; ``COUNTING_THRESHOLD`` 0.9 for the
  ``counting`` tag), sorted by score, at most ``MAX_OBJECTS`` (16), then greedy NMS with
  ``NMS_THRESHOLD`` (``max_overlap``) 1.0, i.e. disabled; IoU with the +1 pixel convention;
- ``include`` clauses (AND): at least ``count`` objects of the class; the colour of the ``count``
  most confident ones by CLIP (at least ``count`` of them the asked colour); position of every one
  of them against every object matched by the target clause (box centres, margin
  ``POSITION_THRESHOLD`` 0.1 of the summed box sizes);
- ``exclude`` clauses (OR): fail when ``count`` or more objects of the class are found;
- summary (``evaluation/summary_scores.py``): per-tag accuracy over images, overall = the mean of
  the per-tag accuracies (tags in first-appearance order), also % correct images and % prompts with
  at least one correct image.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0
POSITION_THRESHOLD = 0.1
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Detection:
    """One detected instance: box ``(x1, y1, x2, y2)`` in pixels, confidence, optional H×W boolean mask."""

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None

    def row(self) -> list[float]:
        """The official ``bbox`` row ``[x1, y1, x2, y2, score]`` (what ``details`` records)."""
        return [float(v) for v in self.box] + [float(self.score)]


#: (image, the found detections of one class, class name) -> one colour name per detection
ColourClassifier = Callable[[Any, Sequence[Detection], str], list[str]]


def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with the official +1 pixel convention (inclusive integer boxes)."""

    def area(b: Sequence[float]) -> float:
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0


def select_detections(
    per_class: Mapping[str, Sequence[Detection]],
    tag: str,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
) -> dict[str, list[Detection]]:
    """The official per-class filtering of ``evaluate_image``: threshold, sort, top-k, NMS; empty classes dropped."""
    confidence = threshold if tag != "counting" else counting_threshold
    detected: dict[str, list[Detection]] = {}
    for name, dets in per_class.items():
        # np.argsort(scores)[::-1] as the official code (descending; ties in reversed argsort order)
        order = np.argsort(np.array([d.score for d in dets], dtype=np.float64))[::-1].tolist() if dets else []
        order = [i for i in order if dets[i].score > confidence][:max_objects]
        kept: list[Detection] = []
        while order:
            best = order.pop(0)
            kept.append(dets[best])
            order = [i for i in order if nms_threshold == 1 or compute_iou(dets[best].box, dets[i].box) < nms_threshold]
        if kept:
            detected[name] = kept
    return detected


def relative_position(
    obj_a: Detection, obj_b: Detection, position_threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """Position of A relative to B from box centres, ignoring offsets within the margin (image y points down)."""
    boxes = np.array([obj_a.box, obj_b.box], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - position_threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate(
    image: Any,
    objects: Mapping[str, Sequence[Detection]],
    metadata: Mapping[str, Any],
    classify_colours: ColourClassifier | None = None,
    position_threshold: float = POSITION_THRESHOLD,
) -> tuple[bool, str]:
    """``(correct, reason)`` of one image: the official ``evaluate``, clause by clause.

    ``objects`` are the selected detections per class, most confident first. ``classify_colours`` is
    only called for clauses with a colour (it may be None for prompts without one).
    """
    correct = True
    reason: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        classname = req["class"]
        matched = True
        found = list(objects.get(classname, []))[: req["count"]]
        if len(found) < req["count"]:
            correct = matched = False
            reason.append(f"expected {classname}>={req['count']}, found {len(found)}")
        else:
            if "color" in req:
                if classify_colours is None:
                    raise ValueError(f"GenEval: clause {req} needs a colour classifier")
                colors = classify_colours(image, found, classname)
                if colors.count(req["color"]) < req["count"]:
                    correct = matched = False
                    reason.append(
                        f"expected {req['color']} {classname}>={req['count']}, found "
                        + f"{colors.count(req['color'])} {req['color']}; and "
                        + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    )
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                if matched_groups[target_group] is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found:
                        for target in matched_groups[target_group] or []:
                            true_rels = relative_position(obj, target, position_threshold)
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reason.append(
                                    f"expected {classname} {expected_rel} target, found "
                                    + f"{' and '.join(true_rels)} target"
                                )
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        classname = req["class"]
        if len(objects.get(classname, [])) >= req["count"]:
            correct = False
            reason.append(f"expected {classname}<{req['count']}, found {len(objects[classname])}")
    return correct, "\n".join(reason)


def result_record(
    filename: str, metadata: Mapping[str, Any], correct: bool, reason: str, objects: Mapping[str, Sequence[Detection]]
) -> dict[str, Any]:
    """One line of the official ``results.jsonl`` (``summary_scores.py`` reads these files)."""
    return {
        "filename": filename,
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(dict(metadata)),
        "details": json.dumps({k: [d.row() for d in v] for k, v in objects.items()}),
    }


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``summary_scores.py``: per-tag accuracy (first-appearance order) and their mean, the overall score."""
    if not records:
        raise ValueError("GenEval summary: no results")
    tags: dict[str, list[bool]] = {}
    prompts: dict[str, list[bool]] = {}
    for r in records:
        tags.setdefault(r["tag"], []).append(bool(r["correct"]))
        prompts.setdefault(r["metadata"], []).append(bool(r["correct"]))
    per_tag = {
        tag: {"accuracy": float(np.mean(v)), "correct": int(sum(v)), "images": len(v)} for tag, v in tags.items()
    }
    return {
        "overall": float(np.mean([t["accuracy"] for t in per_tag.values()])),
        "tasks": per_tag,
        "images": len(records),
        "prompts": len(prompts),
        "correct_images": float(np.mean([bool(r["correct"]) for r in records])),
        "correct_prompts": float(np.mean([any(v) for v in prompts.values()])),
    }
