"""The README and docs/ stay true: CI runs the README's test command verbatim, every Python example runs,
the README stays short, and every relative link points to a file (and heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Pages the README must link (the docs index links every page).
DOCS = ["index", "methods", "training", "backbones", "rewards-and-evaluation", "scale-out", "reliability",
        "results", "design"]


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def _examples(text: str) -> list[str]:
    return re.findall(r"<!-- example -->\s*```python\n(.*?)\n```", text, re.S)


def test_ci_runs_the_readme_test_command() -> None:
    block = re.search(r"<!-- test-command -->\s*```bash\n(.*?)\n```", _readme(), re.S)
    assert block, "README must mark its test command with <!-- test-command -->"
    command = block.group(1).strip().splitlines()[-1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci


def test_readme_python_example_runs() -> None:
    blocks = _examples(_readme())
    assert blocks, "README must mark its Python example with <!-- example -->"
    namespace: dict = {}
    exec(compile(blocks[0], "README example", "exec"), namespace)
    assert namespace["loss"].item() >= 0.0


@pytest.mark.parametrize("page", [p for p in PAGES if p.parent.name == "docs"], ids=lambda p: p.name)
def test_docs_python_examples_run(page: Path) -> None:
    for k, block in enumerate(_examples(page.read_text())):
        exec(compile(block, f"{page.name} example {k}", "exec"), {})


def test_methods_page_has_a_checked_example() -> None:
    assert _examples((ROOT / "docs" / "methods.md").read_text())


def test_readme_is_short_and_links_the_docs() -> None:
    text = _readme()
    assert len(text.splitlines()) <= README_MAX_LINES
    for name in DOCS:
        assert f"(docs/{name}.md" in text, name
    index = (ROOT / "docs" / "index.md").read_text()
    for page in PAGES[1:]:
        if page.name != "index.md":
            assert f"({page.name})" in index, f"docs/index.md does not link {page.name}"


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_github_anchor() -> None:
    assert github_anchor("The embedded default: the digits testbed") == "the-embedded-default-the-digits-testbed"
    assert github_anchor("Evaluation: `flowbp eval`") == "evaluation-flowbp-eval"


def relative_links(text: str) -> list[str]:
    """Targets of Markdown links ``[text](target)`` that are not URLs or mail addresses (code spans skipped)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_relative_links_finds_links() -> None:
    links = relative_links("see [a](docs/a.md#x), [b](https://x.org), `[c](d.md)` and [e](#top)")
    assert links == ["docs/a.md#x", "#top"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_exists(page: Path) -> None:
    for target in relative_links(page.read_text()):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to {target}: no such file"
        assert ROOT in file.parents or file == ROOT, f"{page.name}: link {target} leaves the repository"
        if anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", file.read_text(), flags=re.S), re.M)
            assert anchor in {github_anchor(h) for h in headings}, f"{page.name}: link {target}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_internal_work_items(page: Path) -> None:
    """Pages speak to users: no references to internal work items or to a design file that does not ship."""
    text = page.read_text()
    assert not re.search(r"\bissue \d+\w*", text, re.I), page.name
    assert "DESIGN.md" not in text, page.name


def _between(text: str, name: str) -> list[str]:
    match = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"missing <!-- {name}:begin/end --> markers"
    return [line for line in match.group(1).splitlines() if line.startswith("| ")]


def test_readme_fit_summary_agrees_with_the_generated_table() -> None:
    """The README's FlowBP-Lagrange rows are the docs table's cells (both written by fit_table.py --write)."""
    summary = _between(_readme(), "fit-summary")[1:]  # after the header row
    table = _between((ROOT / "docs" / "memory.md").read_text(), "fit-table")
    assert summary, "the README's fit summary is empty: run python benchmarks/fit_table.py --write"
    sections = {"lora": [], "full": []}
    current = None
    text = (ROOT / "docs" / "memory.md").read_text().split("<!-- fit-table:begin -->")[1]
    for line in text.splitlines():
        if line.startswith("### "):
            current = "lora" if "LoRA" in line else "full" if "Full" in line else None
        elif line.startswith("| ") and current and "-flowbp-lagrange |" in line:
            sections[current].append(line)
    assert table
    for row in summary:
        cells = [c.strip() for c in row.strip("|").split("|")]
        preset, finetune, rest = cells[0], cells[1], cells[2:]
        docs_row = [r for r in sections[finetune] if r.startswith(f"| {preset} |")]
        assert len(docs_row) == 1, f"{preset} ({finetune}) is not in docs/memory.md's table"
        assert [c.strip() for c in docs_row[0].strip("|").split("|")][1:] == rest
