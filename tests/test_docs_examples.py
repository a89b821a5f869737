"""Every Python block in the README and the docs site runs, so no example a reader copies can rot.

A page's ```python blocks run in order in one fresh interpreter with one namespace (a later block may use an
earlier block's names, as a reader would), in a temporary working directory, offline. A block that cannot run here
carries `<!-- skip: reason -->` on the line above its fence (blank lines between are allowed); a skip without a
reason is an error. mkdocs renders the comment as nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w+-]*)[^\n]*$")
SKIP = re.compile(r"^\s*<!--\s*skip:(?P<reason>.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    language: str
    source: str
    skip_reason: str | None


def markdown_pages() -> list[Path]:
    """README.md and every page of the docs site (the results folder is a link to benchmark output, not pages)."""
    pages = [ROOT / "README.md"]
    pages += sorted(p for p in (ROOT / "docs").rglob("*.md") if "results" not in p.relative_to(ROOT / "docs").parts)
    return pages


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown page, with the skip reason written above each, if any."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, language = opening["indent"], opening["lang"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{_name(path)}:{i + 1}: a code fence is never closed")
        body = [line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]]
        above = i - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        marker = SKIP.match(lines[above]) if above >= 0 else None
        reason = marker["reason"].strip() if marker else None
        if marker and not reason:
            raise AssertionError(f"{_name(path)}:{i + 1}: `<!-- skip: -->` needs a reason")
        blocks.append(Block(_name(path), i + 1, language, "\n".join(body) + "\n", reason))
        i = end + 1
    return blocks


RUNNER = """
import sys, json, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for block in blocks:
    print(f"--- running {block['page']}:{block['line']}", flush=True)
    exec(compile(block["source"], f"{block['page']}:{block['line']}", "exec"), namespace)
"""


def python_blocks(page: Path) -> list[Block]:
    return [b for b in code_blocks(page) if b.language in ("python", "py")]


PAGES = [p for p in markdown_pages() if python_blocks(p)]


def test_every_page_with_python_is_collected() -> None:
    """The README and the method pages hold examples; a page losing them all should be noticed."""
    names = {str(p.relative_to(ROOT)) for p in PAGES}
    assert "README.md" in names
    methods = {p for p in names if p.startswith("docs/methods/")}
    assert len(methods) == len(list((ROOT / "docs" / "methods").glob("*.md"))), names


def test_skip_markers_are_parsed(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n<!-- skip: needs a GPU -->\n\n```python\nimport torch\n```\n\n```python\nx = 1\n```\n```bash\nls\n```\n"
    )
    blocks = code_blocks(page)
    assert [(b.language, b.skip_reason, b.line) for b in blocks] == [
        ("python", "needs a GPU", 4),
        ("python", None, 8),
        ("bash", None, 11),
    ]
    page.write_text("<!-- skip: -->\n```python\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="needs a reason"):
        code_blocks(page)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    import json

    blocks = [b for b in python_blocks(page) if b.skip_reason is None]
    if not blocks:
        pytest.skip(f"every Python block of {page.name} carries a reasoned skip")
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps([vars(b) for b in blocks]))
    runner = tmp_path / "run_blocks.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    env.pop("PYTHONPATH", None)
    work = tmp_path / "cwd"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, str(runner), str(spec)], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{page.name}: an example failed\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
