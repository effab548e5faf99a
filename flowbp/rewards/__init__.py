"""Reward registry: ``load_reward(spec)``.

A reward is a callable ``(images B×3×H×W in [0, 1], prompts) -> Tensor[B]``, differentiable
with respect to the images, as an ``nn.Module`` with frozen parameters.

``spec`` is one of

- a name: ``"digit-alignment"``;
- a weighted sum as a string: ``"digit-alignment+0.5*digit-contrast"`` (terms ``[weight*]name``
  joined by ``+`` or ``-``, e.g. ``"a-0.1*b"``; hyphens followed by a letter belong to the name,
  so subtract a whole reward as ``"a-1*b"``);
- a dict ``{name: weight}``.

A single name with weight 1 returns that reward itself; anything else a
:class:`~flowbp.rewards.digits.CombinedReward` whose ``parts()`` exposes each term for logging.

Real reward models (``pickscore``, ``clipscore``, ``hpsv2``, ``imagereward``, ``aesthetic``, ``hpsv3``) load
their weights from ``path=`` / ``paths={name: path}``, ``$FLOWBP_REWARD_DIR/<name>`` or the hub
cache, never downloading unless ``allow_download=True`` (see :mod:`flowbp.rewards.weights`).
Their modules are imported lazily so the digits testbed never pays for transformers' import.

Judges (``unifiedreward``, ``unifiedreward-align``, ``unifiedreward-iq``: :mod:`flowbp.rewards.unifiedreward`)
are evaluation metrics, not rewards: a vision-language model answers a question and the score is parsed from
its text, so there is no gradient. ``load_reward("unifiedreward-align", url="http://HOST:PORT/v1")`` builds
one for scoring; as a training reward (``parse_reward_spec`` without ``allow_judges``) it is an error.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from flowbp.rewards.digits import DIGIT_REWARDS, CombinedReward, combine


def _lazy(module: str, function: str) -> Any:
    def build(**kwargs: Any) -> nn.Module:
        return getattr(importlib.import_module(module), function)(**kwargs)

    build.__name__ = function
    return build


#: Every registered reward name -> constructor(path=None, allow_download=False, dtype=None, **ignored).
REWARDS: dict[str, Any] = {
    **DIGIT_REWARDS,
    "pickscore": _lazy("flowbp.rewards.clip", "load_pickscore"),
    "clipscore": _lazy("flowbp.rewards.clip", "load_clipscore"),
    "hpsv2": _lazy("flowbp.rewards.clip", "load_hpsv2"),
    "aesthetic": _lazy("flowbp.rewards.clip", "load_aesthetic"),
    "imagereward": _lazy("flowbp.rewards.imagereward", "load_imagereward"),
    "hpsv3": _lazy("flowbp.rewards.hpsv3", "load_hpsv3"),
}

#: Evaluation-only metrics built like rewards (name -> constructor); never differentiable, never trained on.
JUDGES: dict[str, Any] = {
    "unifiedreward": _lazy("flowbp.rewards.unifiedreward", "load_unifiedreward"),
    "unifiedreward-align": _lazy("flowbp.rewards.unifiedreward", "load_unifiedreward_align"),
    "unifiedreward-iq": _lazy("flowbp.rewards.unifiedreward", "load_unifiedreward_iq"),
}
#: A judge's weights are shared by its criteria: reward_paths.unifiedreward serves all three names.
JUDGE_FAMILY = {name: "unifiedreward" for name in JUDGES}

# One term: optional sign, optional "weight*", a name. Hyphens inside a name must be followed by a
# letter, so "a-0.5*b" reads as a minus 0.5 b while "digit-alignment" stays one name.
_TERM = re.compile(
    r"\s*([+-]?)\s*(?:((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\*\s*)?"
    r"([A-Za-z](?:\w|-(?=[A-Za-z]))*)\s*"
)


def available_rewards() -> list[str]:
    return sorted(REWARDS)


def available_judges() -> list[str]:
    return sorted(JUDGES)


def parse_reward_spec(spec: str | Mapping[str, float], allow_judges: bool = False) -> dict[str, float]:
    """``"a+0.5*b"`` / ``{"a": 1, "b": 0.5}`` -> ``{"a": 1.0, "b": 0.5}`` (names validated).

    A judge name is accepted only with ``allow_judges`` (evaluation) and only on its own: a judge's score
    may be missing, which a weighted sum cannot represent.
    """
    if isinstance(spec, Mapping):
        weights = {str(k): float(v) for k, v in spec.items()}
    elif isinstance(spec, str):
        weights = {}
        pos = 0
        while pos < len(spec):
            match = _TERM.match(spec, pos)
            # Every term after the first needs an explicit sign: "a 0.5*b" is a typo, not a sum.
            if match is None or match.end() == pos or (pos > 0 and not match.group(1)):
                raise ValueError(f"cannot parse reward spec {spec!r} at {spec[pos:]!r}; use e.g. 'a+0.5*b'")
            sign = -1.0 if match.group(1) == "-" else 1.0
            weight = sign * (float(match.group(2)) if match.group(2) else 1.0)
            weights[match.group(3)] = weights.get(match.group(3), 0.0) + weight
            pos = match.end()
    else:
        raise ValueError(f"reward spec must be a name, a 'a+0.5*b' string or a dict, got {spec!r}")
    if not weights:
        raise ValueError(f"empty reward spec {spec!r}")
    judges = [n for n in weights if n in JUDGES]
    if judges and not allow_judges:
        raise ValueError(
            f"{judges[0]} is an evaluation metric (a vision-language judge: its score is parsed from generated "
            "text, so it has no gradient), not a training reward; score with it via eval_metrics or flowbp eval "
            f"--metrics. Training rewards: {', '.join(available_rewards())}"
        )
    if judges and (len(weights) > 1 or weights[judges[0]] != 1.0):
        raise ValueError(f"{judges[0]} is a judge: it cannot be weighted or summed with other metrics ({spec!r})")
    unknown = [n for n in weights if n not in REWARDS and n not in JUDGES]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; known rewards: {', '.join(available_rewards())}")
    return weights


def load_reward(
    spec: str | Mapping[str, float],
    path: str | Path | None = None,
    paths: Mapping[str, str | Path] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the reward described by ``spec``.

    ``paths`` maps reward names to their weight locations (the config's ``reward_paths``); ``path``
    is the location of a single reward (or of every reward without an entry in ``paths``). Other
    ``kwargs`` (``allow_download``, ``dtype``) go to each constructor.
    """
    weights = parse_reward_spec(spec, allow_judges=True)
    paths = dict(paths or {})
    unknown = sorted(set(paths) - set(REWARDS) - set(JUDGES))
    if unknown:
        raise ValueError(f"reward_paths: unknown reward(s) {unknown}; known rewards: {', '.join(available_rewards())}")

    def build(name: str) -> nn.Module:
        location = paths.get(name, paths.get(JUDGE_FAMILY.get(name, ""), path))
        constructor = JUDGES[name] if name in JUDGES else REWARDS[name]
        return constructor(**({"path": location} if location is not None else {}), **kwargs)

    if len(weights) == 1 and next(iter(weights.values())) == 1.0:
        return build(next(iter(weights)))
    return combine({name: build(name) for name in weights}, weights)


__all__ = [
    "JUDGES", "REWARDS", "CombinedReward", "available_judges", "available_rewards", "combine", "load_reward",
    "parse_reward_spec",
]
