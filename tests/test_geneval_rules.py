"""GenEval's scoring rules on hand-built detections with verdicts worked out by hand from the official code.

Each of the six tasks (single object, two objects, counting, colours, position, colour attribution)
has a passing case and its edge cases: a detection exactly at the threshold, an excluded object
present, a count off by one in both directions, a position inside the margin, wrong colours.
"""

from __future__ import annotations

import json

import pytest

from flowbp.geneval import load_metadata, object_names
from flowbp.geneval.rules import (
    Detection,
    compute_iou,
    evaluate,
    relative_position,
    result_record,
    select_detections,
    summarize,
)


def det(x1: float, y1: float, x2: float, y2: float, score: float = 0.95) -> Detection:
    return Detection((x1, y1, x2, y2), score)


def verdict(metadata, per_class, colours=None):
    """The official evaluate_image minus the detector: select per class, then evaluate."""
    objects = select_detections(per_class, metadata["tag"])
    return evaluate(None, objects, metadata, colours)


def colour_by_box(table):
    """A stand-in colour classifier: the colour assigned to each box (records its calls)."""
    calls = []

    def classify(image, detections, classname):
        calls.append((classname, len(detections)))
        return [table[d.box] for d in detections]

    classify.calls = calls
    return classify


# ------------------------------------------------------------------------------------ the metadata


def test_shipped_metadata_is_the_official_553_prompts():
    records = load_metadata()
    assert len(records) == 553
    tags = {}
    for r in records:
        tags[r["tag"]] = tags.get(r["tag"], 0) + 1
    assert tags == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                    "color_attr": 100}
    assert records[0] == {"tag": "single_object", "include": [{"class": "bench", "count": 1}],
                          "prompt": "a photo of a bench"}
    # counting prompts exclude n + 1 of the same class
    for r in records:
        if r["tag"] == "counting":
            (inc,), (exc,) = r["include"], r["exclude"]
            assert exc == {"class": inc["class"], "count": inc["count"] + 1}
    names = object_names()
    assert len(names) == 80 and names[0] == "person" and "computer mouse" in names and "tv remote" in names


# ------------------------------------------------------------------------------------ single object

SINGLE = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}


def test_single_object():
    assert verdict(SINGLE, {"bench": [det(0, 0, 10, 10, 0.31)]}) == (True, "")
    # the threshold is strict: 0.3 itself is not a detection
    assert verdict(SINGLE, {"bench": [det(0, 0, 10, 10, 0.3)]}) == (False, "expected bench>=1, found 0")
    assert verdict(SINGLE, {"chair": [det(0, 0, 10, 10)]}) == (False, "expected bench>=1, found 0")
    # extra benches and other objects are fine for single_object (no exclude clause)
    assert verdict(SINGLE, {"bench": [det(0, 0, 10, 10), det(20, 20, 30, 30)], "cat": [det(0, 0, 5, 5)]})[0]


# ------------------------------------------------------------------------------------ two objects

TWO = {"tag": "two_object", "include": [{"class": "toilet", "count": 1}, {"class": "computer mouse", "count": 1}],
       "prompt": "a photo of a toilet and a computer mouse"}


def test_two_objects():
    both = {"toilet": [det(0, 0, 50, 50)], "computer mouse": [det(60, 60, 70, 70, 0.4)]}
    assert verdict(TWO, both) == (True, "")
    ok, reason = verdict(TWO, {"toilet": [det(0, 0, 50, 50)]})
    assert not ok and reason == "expected computer mouse>=1, found 0"
    ok, reason = verdict(TWO, {})
    assert reason == "expected toilet>=1, found 0\nexpected computer mouse>=1, found 0"


# ------------------------------------------------------------------------------------ counting

THREE = {"tag": "counting", "include": [{"class": "orange", "count": 3}],
         "exclude": [{"class": "orange", "count": 4}], "prompt": "a photo of three oranges"}


def oranges(n, score=0.95):
    return {"orange": [det(10 * i, 0, 10 * i + 8, 8, score) for i in range(n)]}


def test_counting_exact_and_off_by_one():
    assert verdict(THREE, oranges(3)) == (True, "")
    assert verdict(THREE, oranges(2)) == (False, "expected orange>=3, found 2")
    # one too many: the include clause holds, the exclude clause (count n + 1) fails
    assert verdict(THREE, oranges(4)) == (False, "expected orange<4, found 4")


def test_counting_uses_the_counting_threshold():
    # 0.9 for the counting tag: three confident-enough oranges for any other tag count as none here
    assert verdict(THREE, oranges(3, 0.85)) == (False, "expected orange>=3, found 0")
    # a fourth, unconfident orange does not trip the exclude clause
    per_class = {"orange": oranges(3)["orange"] + [det(100, 0, 108, 8, 0.89)]}
    assert verdict(THREE, per_class) == (True, "")


def test_excluded_object_present_in_another_class():
    meta = {"tag": "single_object", "include": [{"class": "cat", "count": 1}],
            "exclude": [{"class": "dog", "count": 1}], "prompt": "a cat, no dog"}
    assert verdict(meta, {"cat": [det(0, 0, 9, 9)]}) == (True, "")
    dog = det(20, 0, 29, 9, 0.5)
    assert verdict(meta, {"cat": [det(0, 0, 9, 9)], "dog": [dog]}) == (False, "expected dog<1, found 1")
    # below the threshold the excluded object is not detected
    assert verdict(meta, {"cat": [det(0, 0, 9, 9)], "dog": [det(20, 0, 29, 9, 0.2)]}) == (True, "")


def test_max_objects_and_disabled_nms():
    # 20 identical boxes: NMS is disabled (max_overlap 1.0), so overlap removes nothing; at most 16 are kept
    per_class = {"orange": [det(0, 0, 10, 10, 0.91 + 0.004 * i) for i in range(20)]}
    kept = select_detections(per_class, "counting")["orange"]
    assert len(kept) == 16
    assert [d.score for d in kept] == sorted((d.score for d in per_class["orange"]), reverse=True)[:16]
    # with NMS on (not GenEval's setting) the duplicates would collapse to one
    assert len(select_detections(per_class, "counting", nms_threshold=0.5)["orange"]) == 1


def test_iou_uses_the_plus_one_pixel_convention():
    # [0, 9] and [5, 14] inclusive: 10×10 boxes, 5×5 overlap -> 25 / (100 + 100 - 25)
    assert compute_iou((0, 0, 9, 9), (5, 5, 14, 14)) == pytest.approx(25 / 175)
    assert compute_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0


# ------------------------------------------------------------------------------------ colours

BLACK_TABLE = {"tag": "colors", "include": [{"class": "dining table", "count": 1, "color": "black"}],
               "prompt": "a photo of a black dining table"}


def test_colours():
    box = det(0, 0, 50, 30)
    clf = colour_by_box({box.box: "black"})
    assert verdict(BLACK_TABLE, {"dining table": [box]}, clf) == (True, "")
    assert clf.calls == [("dining table", 1)]
    clf = colour_by_box({box.box: "brown"})
    assert verdict(BLACK_TABLE, {"dining table": [box]}, clf) == (
        False, "expected black dining table>=1, found 0 black; and 1 brown")


def test_colour_is_checked_on_the_most_confident_objects_only():
    # two tables: the confident one is brown, the other black -> only the top-`count` (1) is classified
    brown, black = det(0, 0, 50, 30, 0.9), det(60, 0, 110, 30, 0.5)
    clf = colour_by_box({brown.box: "brown", black.box: "black"})
    ok, _ = verdict(BLACK_TABLE, {"dining table": [black, brown]}, clf)
    assert not ok and clf.calls == [("dining table", 1)]
    # no table: the colour classifier is never asked
    clf = colour_by_box({})
    assert verdict(BLACK_TABLE, {}, clf) == (False, "expected dining table>=1, found 0") and clf.calls == []


# ------------------------------------------------------------------------------------ position

TIE_ABOVE_SINK = {"tag": "position", "include": [{"class": "sink", "count": 1},
                                                   {"class": "tie", "count": 1, "position": ["above", 0]}],
                  "prompt": "a photo of a tie above a sink"}


def test_relative_position_by_hand():
    # centres (5, 5) and (105, 5), sizes 10: revised dx = -(100 - 0.1·20) / 100 = -0.98 -> left of only
    assert relative_position(det(0, 0, 10, 10), det(100, 0, 110, 10)) == {"left of"}
    assert relative_position(det(100, 0, 110, 10), det(0, 0, 10, 10)) == {"right of"}
    # image y points down: smaller y is above
    assert relative_position(det(0, 0, 10, 10), det(0, 100, 10, 110)) == {"above"}
    # diagonal: (±0.69, ±0.69) after the margin -> two relations
    assert relative_position(det(0, 0, 10, 10), det(100, 100, 110, 110)) == {"left of", "above"}


def test_position_margin_edges():
    a = det(0, 0, 100, 100)  # 100-wide boxes: margin 0.1·(100 + 100) = 20
    # offset 15 < margin -> no relation at all
    assert relative_position(a, det(15, 0, 115, 100)) == set()
    # offset 25: revised 5, 5 / 25 = 0.2 <= 0.5 -> still no relation
    assert relative_position(a, det(25, 0, 125, 100)) == set()
    # offset 45: revised 25, 25 / 45 = 0.56 > 0.5 -> left of
    assert relative_position(a, det(45, 0, 145, 100)) == {"left of"}


def test_position():
    sink, tie = det(100, 300, 200, 400), det(130, 0, 170, 100)
    assert verdict(TIE_ABOVE_SINK, {"sink": [sink], "tie": [tie]}) == (True, "")
    below = det(130, 450, 170, 550)
    assert verdict(TIE_ABOVE_SINK, {"sink": [sink], "tie": [below]}) == (
        False, "expected tie above target, found below target")
    # inside the margin: nothing is above anything
    close = det(130, 290, 170, 390)
    assert verdict(TIE_ABOVE_SINK, {"sink": [sink], "tie": [close]}) == (
        False, "expected tie above target, found  target")
    # the target clause failed -> no target to be above
    assert verdict(TIE_ABOVE_SINK, {"tie": [tie]}) == (
        False, "expected sink>=1, found 0\nno target for tie to be above")


# ------------------------------------------------------------------------------------ colour attribution

BOAT_HOTDOG = {"tag": "color_attr", "include": [{"class": "boat", "count": 1, "color": "white"},
                                                 {"class": "hot dog", "count": 1, "color": "orange"}],
               "prompt": "a photo of a white boat and an orange hot dog"}


def test_colour_attribution():
    boat, hotdog = det(0, 0, 100, 50), det(200, 0, 260, 30)
    assert verdict(BOAT_HOTDOG, {"boat": [boat], "hot dog": [hotdog]},
                   colour_by_box({boat.box: "white", hotdog.box: "orange"})) == (True, "")
    # colours swapped between the objects: both clauses fail
    ok, reason = verdict(BOAT_HOTDOG, {"boat": [boat], "hot dog": [hotdog]},
                         colour_by_box({boat.box: "orange", hotdog.box: "white"}))
    assert not ok and reason.splitlines() == [
        "expected white boat>=1, found 0 white; and 1 orange",
        "expected orange hot dog>=1, found 0 orange; and 1 white",
    ]


# ------------------------------------------------------------------------------------ records and summary


def test_records_and_official_summary():
    objects = {"bench": [det(0, 0, 10, 10, 0.5)]}
    rec = result_record("00000/samples/0000.png", SINGLE, True, "", objects)
    assert json.loads(rec["metadata"]) == SINGLE
    assert json.loads(rec["details"]) == {"bench": [[0.0, 0.0, 10.0, 10.0, 0.5]]}
    records = [
        # single_object: 3 of 4 correct; counting: 0 of 2 -> overall (0.75 + 0) / 2, not the image mean 3/6
        *({"tag": "single_object", "metadata": "a", "correct": c} for c in (True, True, True, False)),
        *({"tag": "counting", "metadata": "b", "correct": False} for _ in range(2)),
    ]
    s = summarize(records)
    assert s["overall"] == pytest.approx(0.375)
    assert s["tasks"]["single_object"] == {"accuracy": 0.75, "correct": 3, "images": 4}
    assert list(s["tasks"]) == ["single_object", "counting"]  # first-appearance order, as groupby(sort=False)
    assert s["correct_images"] == pytest.approx(0.5) and s["correct_prompts"] == pytest.approx(0.5)
    assert s["images"] == 6 and s["prompts"] == 2
