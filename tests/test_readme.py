"""The README stays true: CI runs its test command verbatim, and its Python example runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command() -> None:
    block = re.search(r"<!-- test-command -->\s*```bash\n(.*?)\n```", _readme(), re.S)
    assert block, "README must mark its test command with <!-- test-command -->"
    command = block.group(1).strip().splitlines()[-1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci


def test_readme_python_example_runs() -> None:
    block = re.search(r"<!-- example -->\s*```python\n(.*?)\n```", _readme(), re.S)
    assert block, "README must mark its Python example with <!-- example -->"
    namespace: dict = {}
    exec(compile(block.group(1), "README example", "exec"), namespace)
    assert namespace["loss"].item() >= 0.0
