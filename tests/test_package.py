from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import hf_ext

ROOT = Path(__file__).resolve().parents[1]


def test_all_lists_exactly_the_public_names_and_each_resolves() -> None:
    assert len(hf_ext.__all__) == len(set(hf_ext.__all__))
    for name in hf_ext.__all__:
        assert hasattr(hf_ext, name), name
    public = {n for n in vars(hf_ext) if not n.startswith("_") and not isinstance(getattr(hf_ext, n), type(hf_ext))}
    assert public <= set(hf_ext.__all__) | {"annotations"}


def test_version_matches_the_installed_distribution() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", hf_ext.__version__)
    assert importlib.metadata.version("hf-ext") == hf_ext.__version__


def test_readme_opens_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```", 2)[1]
    commands = [line for line in first_block.splitlines()[1:] if line.strip()]
    assert commands == ["make quickstart", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^quickstart:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
