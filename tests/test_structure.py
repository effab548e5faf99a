"""The code's layout: no import cycle through training, config and evaluation; test hooks in one module."""

from __future__ import annotations

import ast
from pathlib import Path

import flowbp

ROOT = Path(flowbp.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """Every module named by an import in ``tree`` (``from flowbp import train`` names flowbp and flowbp.train)."""
    deps: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                deps.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    pkg = name.split(".") if is_package else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in child.names)
            todo.append(child)
    return deps


def import_graph() -> dict[str, set[str]]:
    """flowbp module -> the flowbp modules it imports, at module level or inside functions (lazy imports
    count: a lazy import still ties the two modules together); ``if TYPE_CHECKING:`` blocks do not count."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def test_import_graph_sees_lazy_imports() -> None:
    """The graph is not vacuous: it sees train's module-level and config's function-level imports."""
    graph = import_graph()
    assert "flowbp.config" in graph["flowbp.train"]
    assert "flowbp.evaluate" in graph["flowbp.config"]  # lazy (inside validate_against_components)
    assert "flowbp.training.weights" in graph["flowbp.evaluate"]  # lazy (inside periodic_eval)


def test_no_import_cycle_through_train_config_evaluate() -> None:
    graph = import_graph()
    training = [m for m in graph if m.startswith("flowbp.training")]
    assert len(training) > 5
    for module in ("flowbp.train", "flowbp.config", "flowbp.evaluate", *training):
        loop = reachable(graph, module)
        assert module not in loop, f"{module} imports itself back through {sorted(loop)}"


def test_test_hooks_read_only_in_the_hook_module() -> None:
    """FLOWBP_TEST_* variables are read by flowbp/_testing_hooks.py and nowhere else in the library."""
    readers = sorted(
        str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py") if "FLOWBP_TEST_" in p.read_text()
    )
    assert readers == ["flowbp/_testing_hooks.py"]
