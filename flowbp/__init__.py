"""flowbp: reward backpropagation for flow matching — one surrogate engine, every method as a plan.

The public names below are imported on first use (PEP 562), so that ``python -m flowbp --help`` and
config errors do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it
_EXPORTS = {
    "Plan": "flowbp.plan",
    "Segment": "flowbp.plan",
    "SurrogateOutput": "flowbp.engine",
    "Trajectory": "flowbp.trajectory",
    "available_methods": "flowbp.methods",
    "make_plan": "flowbp.methods",
    "reward_loss": "flowbp.losses",
    "rollout": "flowbp.trajectory",
    "surrogate": "flowbp.engine",
}

if TYPE_CHECKING:
    from flowbp.engine import SurrogateOutput, surrogate
    from flowbp.losses import reward_loss
    from flowbp.methods import available_methods, make_plan
    from flowbp.plan import Plan, Segment
    from flowbp.trajectory import Trajectory, rollout

__all__ = [
    "Plan",
    "Segment",
    "SurrogateOutput",
    "Trajectory",
    "available_methods",
    "make_plan",
    "reward_loss",
    "rollout",
    "surrogate",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'flowbp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
