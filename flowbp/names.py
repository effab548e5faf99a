"""Registered method, reward and backbone names, read from the registries' source without importing them.

The registries import torch (and their entries import diffusers or transformers), which takes seconds;
a typo in ``--set method=...`` must be reported in milliseconds, before any model is loaded. Each
registry stays the one place where a name is defined; this module reads, with :mod:`ast`:

- methods: the ``@register("name", ...)`` decorators in ``flowbp/methods/*.py``;
- rewards: the string keys of the ``REWARDS`` dict literal in ``flowbp/rewards/__init__.py``,
  ``**TABLE`` entries expanded from the module that defines ``TABLE``;
- backbones: the string keys of ``BACKBONES`` in ``flowbp/backbones/__init__.py``.

The checks here are necessary conditions only (a name that no registry defines is certainly a typo);
everything else is validated by the registries themselves. ``tests/test_names.py`` checks that each
set equals the live registry.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent

#: A reward name inside a spec such as "a+0.5*b-1e-3*c" (not the exponent of a number).
_REWARD_NAME = re.compile(r"(?<![\w.])[A-Za-z](?:\w|-(?=[A-Za-z]))*")


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _dict_tables(module: ast.Module) -> dict[str, ast.Dict]:
    """Module-level ``NAME = {...}`` / ``NAME: T = {...}`` dict literals, by name."""
    tables: dict[str, ast.Dict] = {}
    for node in module.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    tables[target.id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Dict) and isinstance(node.target, ast.Name):
            tables[node.target.id] = node.value
    return tables


def _imported_from(module: ast.Module, name: str) -> Path | None:
    """The flowbp source file a module-level ``from flowbp.x import name`` reads ``name`` from."""
    for node in module.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flowbp."):
            if any(alias.name == name and alias.asname is None for alias in node.names):
                relative = Path(*node.module.split(".")[1:])
                for candidate in (PACKAGE / relative.with_suffix(".py"), PACKAGE / relative / "__init__.py"):
                    if candidate.is_file():
                        return candidate
    return None


def _keys(table: ast.Dict, module: ast.Module) -> set[str]:
    keys: set[str] = set()
    for key, value in zip(table.keys, table.values, strict=True):
        if key is None:  # **OTHER: expand the table it names
            if isinstance(value, ast.Name):
                source = _imported_from(module, value.id)
                other = _tree(source) if source else module
                inner = _dict_tables(other).get(value.id)
                if inner is not None:
                    keys |= _keys(inner, other)
        elif isinstance(key, ast.Constant) and isinstance(key.value, str):
            keys.add(key.value)
    return keys


@functools.cache
def method_names() -> frozenset[str]:
    names: set[str] = set()
    for path in sorted((PACKAGE / "methods").glob("*.py")):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                for deco in node.decorator_list:
                    if (
                        isinstance(deco, ast.Call)
                        and isinstance(deco.func, ast.Name)
                        and deco.func.id == "register"
                        and deco.args
                        and isinstance(deco.args[0], ast.Constant)
                        and isinstance(deco.args[0].value, str)
                    ):
                        names.add(deco.args[0].value)
    return frozenset(names)


@functools.cache
def reward_names() -> frozenset[str]:
    module = _tree(PACKAGE / "rewards" / "__init__.py")
    table = _dict_tables(module).get("REWARDS")
    return frozenset(_keys(table, module)) if table is not None else frozenset()


@functools.cache
def judge_names() -> frozenset[str]:
    """Evaluation-only metrics (vision-language judges): named in a training reward, they get their own error."""
    module = _tree(PACKAGE / "rewards" / "__init__.py")
    table = _dict_tables(module).get("JUDGES")
    return frozenset(_keys(table, module)) if table is not None else frozenset()


@functools.cache
def backbone_names() -> frozenset[str]:
    module = _tree(PACKAGE / "backbones" / "__init__.py")
    table = _dict_tables(module).get("BACKBONES")
    return frozenset(_keys(table, module)) if table is not None else frozenset()


def reward_spec_names(spec: str | Mapping[str, Any]) -> list[str]:
    """The reward names a spec mentions (``"a+0.5*b"`` or ``{a: 1, b: 0.5}``), in order."""
    if isinstance(spec, Mapping):
        return [str(k) for k in spec]
    return _REWARD_NAME.findall(spec) if isinstance(spec, str) else []


def check_names(method: str, reward: str | Mapping[str, Any], backbone: str) -> None:
    """Raise the registries' own one-line error for a method, reward or backbone name nobody registered."""
    methods, rewards, backbones = method_names(), reward_names(), backbone_names()
    if methods and method not in methods:
        raise ValueError(f"method: unknown method {method!r}; known methods: {', '.join(sorted(methods))}")
    judges = judge_names()
    unknown = [n for n in reward_spec_names(reward) if n not in rewards and n not in judges]
    if rewards and unknown:
        raise ValueError(f"reward: unknown reward(s) {unknown}; known rewards: {', '.join(sorted(rewards))}")
    if backbones and backbone not in backbones:
        raise ValueError(f"backbone: unknown backbone {backbone!r}; known: {', '.join(sorted(backbones))}")
