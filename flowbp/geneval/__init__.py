"""GenEval (Ghosh et al., 2023): object-focused text-to-image evaluation, ``flowbp eval --suite geneval``.

- :mod:`flowbp.geneval.prompts`: the 553 official prompts and metadata (package asset);
- :mod:`flowbp.geneval.rules`: the official scoring rules and summary (pure functions);
- :mod:`flowbp.geneval.detectors`: Mask2Former instance detection (transformers, or mmdet when installed);
- :mod:`flowbp.geneval.colour`: CLIP zero-shot colour of masked object crops;
- :mod:`flowbp.geneval.score`: weights lookup and the scorer writing official ``results.jsonl`` records.

Only :mod:`prompts` and :mod:`rules` are imported here; the model parts load lazily.
"""

from flowbp.geneval.prompts import load_metadata, object_names
from flowbp.geneval.rules import Detection, evaluate, relative_position, select_detections, summarize

__all__ = [
    "Detection",
    "evaluate",
    "load_metadata",
    "object_names",
    "relative_position",
    "select_detections",
    "summarize",
]
