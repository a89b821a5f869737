"""Every docstring example in hf_ext runs, so no example the API reference renders can rot.

The docs site renders every public docstring, examples included; this file runs them as doctests, one test per
module of ``hf_ext`` (every ``.py`` file under it, ``losses/`` and the ``custom_generate`` folder included; a file
outside any package, such as the `evaluate` metric script, is loaded from its path). Each module's examples run with
``ELLIPSIS | NORMALIZE_WHITESPACE``, in a temporary working directory, offline (``HF_HUB_OFFLINE=1``), each
docstring in a fresh copy of its module's globals, as ``python -m doctest`` and ``pytest --doctest-modules`` do. The
Hugging Face dialect fences examples in a ```` ```python ```` block: a blank line must separate the last output from
the closing fence, or the fence would be read as expected output (`test_closing_fences_are_not_expected_output`
says so by name).

A module whose examples load an embedded model or data set (`ASSET_LOADERS`) is marked ``slow``.

Skips: a line carrying ``# doctest: +SKIP`` must say why it is not run. The rule: consecutive skipped examples form
a run (an example spans its ``>>>`` line and its ``...`` lines), and the run needs a reason: text matching `REASON`
(``skip``, ``skips``, ``skipped`` or ``not run``, then at least one more word) either in a comment on one of the
run's lines (the directive aside) or in the docstring's prose (not example code) on the 3 lines above the run's
first line. E.g. the sentence before a fence, ``The call is skipped here (it spawns processes).``, or the line
``>>> trainer.train()  # skipped: minutes of CPU  # doctest: +SKIP``.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import os
import pkgutil
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the Hub (conftest.py sets it too)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import huggingface_hub.constants
import pytest

import hf_ext

PACKAGE_ROOT = Path(hf_ext.__file__).resolve().parent
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
ASSET_LOADERS = re.compile(
    r"\b(?:minilm_path|smollm2_path|load_stsb|load_bbc_news|bbc_news_train_test_split|bbc_lm_data|"
    r"bbc_classification_data)\("
)
SKIP_DIRECTIVE = re.compile(r"#\s*doctest:[^\n]*\+SKIP")
REASON = re.compile(r"\b(?:skip|skips|skipped|not run)\b\W+\w+", re.IGNORECASE)
PROMPT = re.compile(r"^\s*(?:>>>|\.\.\.)(?:\s|$)")
REASON_WINDOW = 3  # docstring lines above a skipped run that may hold its reason


@dataclass(frozen=True)
class Source:
    name: str  # the module name, or the file's path relative to the package for a file outside any package
    path: Path
    importable: bool


def _is_package(folder: Path) -> bool:
    return (folder / "__init__.py").is_file()


def sources() -> list[Source]:
    """Every ``.py`` file under hf_ext: a module name where every folder above it is a package, else its path."""
    found = []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        relative = path.relative_to(PACKAGE_ROOT.parent)
        folders = [PACKAGE_ROOT.parent.joinpath(*relative.parts[:i]) for i in range(1, len(relative.parts))]
        if all(_is_package(folder) for folder in folders):
            name = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
            found.append(Source(name, path, importable=True))
        else:
            found.append(Source(str(path.relative_to(PACKAGE_ROOT)), path, importable=False))
    return found


def load(source: Source) -> ModuleType:
    if source.importable:
        return importlib.import_module(source.name)
    spec = importlib.util.spec_from_file_location(f"_hf_ext_doctest_{source.path.stem}", source.path)
    assert spec is not None and spec.loader is not None, source.path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def docstrings(path: Path) -> list[tuple[str, int]]:
    """``(docstring, line of its first line)`` for the module and every class and function in the file, read
    without importing it (nested definitions included: a superset of what `doctest.DocTestFinder` runs)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            value = body[0].value.value
            if isinstance(value, str):
                found.append((value, body[0].lineno))
    return found


def example_sources(docstring: str) -> list[str]:
    """The source lines of the examples in ``docstring`` that doctest would run (not the +SKIP ones)."""
    examples = doctest.DocTestParser().get_examples(docstring)
    return [e.source for e in examples if not e.options.get(doctest.SKIP, False)]


def unexplained_skips(docstring: str) -> list[int]:
    """The 0-based docstring lines that start a run of skipped examples with no reason (see this file's docstring)."""
    lines = docstring.splitlines()
    runs: list[list[doctest.Example]] = []
    end = -1  # the docstring line after the previous skipped example
    for example in doctest.DocTestParser().get_examples(docstring):
        if not example.options.get(doctest.SKIP, False):
            end = -1
            continue
        if example.lineno == end and runs:
            runs[-1].append(example)
        else:
            runs.append([example])
        end = example.lineno + example.source.count("\n") + example.want.count("\n")
    bad = []
    for run in runs:
        code = [SKIP_DIRECTIVE.split(line)[0] for example in run for line in example.source.splitlines()]
        comments = [line.split("#", 1)[1] for line in code if "#" in line]
        first = run[0].lineno
        above = [line for line in lines[max(0, first - REASON_WINDOW) : first] if not PROMPT.match(line)]
        if not any(REASON.search(text) for text in [*comments, *above]):
            bad.append(first)
    return bad


SOURCES = sources()


def _marks(source: Source) -> list[pytest.MarkDecorator]:
    runs = [line for text, _ in docstrings(source.path) for line in example_sources(text)]
    return [pytest.mark.slow] if any(ASSET_LOADERS.search(line) for line in runs) else []


def test_every_module_is_collected() -> None:
    """The file list agrees with `pkgutil.walk_packages` (nothing importable is missed) and holds the Hub folder."""
    walked = {"hf_ext"} | {info.name for info in pkgutil.walk_packages(hf_ext.__path__, "hf_ext.")}
    assert {s.name for s in SOURCES if s.importable} == walked
    names = {s.name for s in SOURCES}
    assert "hf_ext.generation.nbce_hub.custom_generate.generate" in names
    assert "metrics/expected_calibration_error/expected_calibration_error.py" in names
    assert any(name.startswith("hf_ext.losses.") for name in names)


@pytest.mark.parametrize("source", [pytest.param(s, marks=_marks(s), id=s.name) for s in SOURCES])
def test_docstring_examples_run(source: Source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what the hub reads, set at its import
    monkeypatch.chdir(tmp_path)
    module = load(source)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, module.__name__)
    written = sum(len(doctest.DocTestParser().get_examples(text)) for text, _ in docstrings(source.path))
    assert sum(len(test.examples) for test in tests) == written, (
        f"{source.name}: some docstring examples are where doctest does not look (a nested function?)"
    )
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, f"{source.name}: {runner.failures} of {runner.tries} examples failed\n" + "".join(
        report
    )


@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_closing_fences_are_not_expected_output(source: Source) -> None:
    """A closing ```` ``` ```` right under an example is read as its expected output: a blank line must come first."""
    bad = []
    for text, line in docstrings(source.path):
        for example in doctest.DocTestParser().get_examples(text):
            if any(want.strip().startswith("```") for want in example.want.splitlines()):
                bad.append(f"{source.path}:{line + example.lineno}: {example.source.strip()}")
    assert not bad, "put a blank line between these examples and the closing fence:\n" + "\n".join(bad)


@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_every_skip_has_a_reason(source: Source) -> None:
    bad = [
        f"{source.path}:{line + offset}: {text.splitlines()[offset].strip()}"
        for text, line in docstrings(source.path)
        for offset in unexplained_skips(text)
    ]
    assert not bad, "say why each of these examples is not run (see this file's docstring):\n" + "\n".join(bad)


def test_skip_reason_rule() -> None:
    """A reason above a run covers the run; a comment covers its own run; another run's comment covers nothing."""
    docstring = """Example:

    The training call is skipped (minutes on CPU).

    ```python
    >>> trainer.train()  # doctest: +SKIP
    >>> trainer.save()  # doctest: +SKIP
    >>> x = 1
    >>> gpu_only()  # skipped: needs a GPU  # doctest: +SKIP
    >>> y = 2
    >>> out = call(x,
    ...            y)  # doctest: +SKIP

    ```
    """
    lines = docstring.splitlines()
    assert [lines[i].strip() for i in unexplained_skips(docstring)] == [">>> out = call(x,"]
    assert example_sources(docstring) == ["x = 1\n", "y = 2\n"]
