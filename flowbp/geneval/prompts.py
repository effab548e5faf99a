"""The 553 official GenEval prompts and their metadata, shipped as a package asset.

``flowbp/assets/geneval/evaluation_metadata.jsonl`` and ``object_names.txt`` are verbatim copies of
djghosh13/geneval @af4902f (``prompts/evaluation_metadata.jsonl``, ``evaluation/object_names.txt``;
MIT licence, ``flowbp/assets/geneval/LICENSE``). Each line: ``{"tag", "prompt", "include": [{"class",
"count", "color"?, "position": [relation, clause index]?}], "exclude": [{"class", "count"}]?}``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "geneval"
METADATA_FILE = ASSETS / "evaluation_metadata.jsonl"
OBJECT_NAMES_FILE = ASSETS / "object_names.txt"


@cache
def object_names() -> tuple[str, ...]:
    """GenEval's 80 class names, in the COCO (mmdet) class order its detector outputs."""
    return tuple(line.strip() for line in OBJECT_NAMES_FILE.read_text().splitlines() if line.strip())


def load_metadata(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The prompts' metadata records (the shipped 553 by default); every class is checked against the 80 names."""
    file = Path(path) if path is not None else METADATA_FILE
    names = set(object_names())
    records = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"GenEval metadata {file}:{number}: not JSON ({exc.msg})") from None
        for clause in record.get("include", []) + record.get("exclude", []):
            if clause.get("class") not in names:
                raise ValueError(f"GenEval metadata {file}:{number}: unknown class {clause.get('class')!r}")
        records.append(record)
    return records


def prompts(records: list[dict[str, Any]] | None = None) -> list[str]:
    return [r["prompt"] for r in (records if records is not None else load_metadata())]
