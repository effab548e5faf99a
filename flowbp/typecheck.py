"""Typed, validated construction of dataclasses from user input (YAML, ``--set``, keyword overrides)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

# A decimal number as YAML 1.2 and JSON read it. PyYAML follows YAML 1.1, where an exponent needs a dot
# ("1.0e-4"), so ``learning_rate: 1e-4`` and ``--set learning_rate=1e-4`` arrive as the string "1e-4".
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check one override against its declared type; accept ints for floats and lists for tuples.

    A float field also accepts a string written as a decimal number (``"1e-4"``): YAML 1.1 leaves
    exponents without a dot unparsed, and users write learning rates that way.
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(name, value, option)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        inner = typing.get_args(annotation)
        elem = inner[0] if inner else Any
        return tuple(coerce(f"{name}[]", v, elem) for v in value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        (elem,) = typing.get_args(annotation) or (Any,)
        return [coerce(f"{name}[]", v, elem) for v in value]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{name}: expected a mapping of key: value, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            return float(value)
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{name}: expected a string, got {value!r}")
    if typing.get_origin(annotation) is typing.Literal:
        allowed = typing.get_args(annotation)
        if value in allowed:
            return value
        raise ValueError(f"{name}: got {value!r}; allowed: {', '.join(map(str, allowed))}")
    return value


def build_dataclass(cls: type, values: Mapping[str, Any], context: str, what: str = "key") -> Any:
    """``cls(**values)`` after checking every key exists and every value has the declared type.

    Errors name the key, the bad value and what is allowed. A ``check()`` method on ``cls`` runs last.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ValueError(f"{context}: unknown {what} {unknown[0]!r}; allowed: {', '.join(sorted(fields)) or '(none)'}")
    checked = {k: coerce(f"{context}.{k}", v, hints[k]) for k, v in values.items()}
    obj = cls(**checked)
    check = getattr(obj, "check", None)
    if check is not None:
        check()
    return obj
