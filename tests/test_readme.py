"""The README fits on one screen and every figure in it is the committed JSON's, rounded as printed.

Each figure the README (and the docs landing page, which repeats the results table) prints is listed below with
the results file and key it comes from. The test fails when a listed figure is missing from the page, when the
JSON's value no longer rounds to it, and when the page prints a decimal figure that is not listed: a figure
cannot be added, or drift from its JSON, without this file saying where it comes from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
LANDING = ROOT / "docs" / "index.md"
MAX_README_LINES = 150
GIB = 2**30


def fixed(digits: int, sign: bool = False) -> Callable[[float], str]:
    return lambda value: f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def scientific(value: float) -> str:
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


@dataclass(frozen=True)
class Figure:
    text: str  # as printed
    file: str  # under benchmarks/results/
    key: str  # dotted path into the JSON
    render: Callable[[Any], str]
    pages: tuple[Path, ...] = (README,)


def _both(*args: Any) -> Figure:
    return Figure(*args, pages=(README, LANDING))


LLAMA_70B_FSDP2 = "llama3.Llama-3-70B.fsdp2"
TVD_JSON = "tvd_calibration.json"
# Test ECE per method at label noise 0 / 0.2 / 0.4 (summary key noiseNN), and DFT's paired gain over cross-entropy.
TVD_ECE = {
    "dft": (("00", "0.10"), ("02", "0.13"), ("04", "0.20")),
    "tvd": (("00", "0.17"), ("02", "0.29"), ("04", "0.21")),
    "ce": (("00", "0.18"), ("02", "0.30"), ("04", "0.45")),
}
DFT_ECE_GAIN = (("00", "0.08"), ("02", "0.17"), ("04", "0.25"))
FIGURES = [
    # The main job's line (README only).
    Figure("0.8486", "quickstart.json", "summary.test_spearman_after", fixed(4)),
    Figure("+0.0283", "quickstart.json", "summary.test_gain", fixed(4, sign=True)),
    Figure("393 s", "quickstart.json", "summary.job_seconds", lambda v: f"{v:.0f} s"),
    Figure("82 s", "quickstart.json", "summary.install_seconds", lambda v: f"{v:.0f} s"),
    Figure("475 s", "quickstart.json", "summary.install_and_job_seconds", lambda v: f"{v:.0f} s"),
    # The README's "TVD, DFT or cross-entropy?" (README only).
    *[Figure(t, TVD_JSON, f"summary.noise{n}_dft_minus_ce_ece", lambda v: f"{-v:.2f}") for n, t in DFT_ECE_GAIN],
    Figure("0.5 points", TVD_JSON, "summary.noise04_dft_minus_ce_accuracy", lambda v: f"{-v * 100:.1f} points"),
    Figure("0.0125", TVD_JSON, "summary.noise00_tvd_gamma", lambda v: f"{v:g}"),
    Figure("0.0125", TVD_JSON, "summary.noise02_tvd_gamma", lambda v: f"{v:g}"),
    # Results at a glance (README and the docs landing page).
    _both("0.8203", "quickstart.json", "summary.test_spearman_before", fixed(4)),
    _both("0.8472", "cosent_sts.json", "summary.bi_hf_ext_spearman", fixed(4)),
    _both("0.8171", "cosent_sts.json", "summary.ce_cosent_default_spearman", fixed(4)),
    _both("0.8131", "cosent_sts.json", "summary.ce_bce_spearman", fixed(4)),
    _both("+0.0040", "cosent_sts.json", "summary.ce_cosent_minus_bce_paired", fixed(4, sign=True)),
    _both("0.0133", "cosent_sts.json", "summary.ce_cosent_minus_bce_paired_detail.std", fixed(4)),
    _both("0.8582", "cosent_sts.json", "summary.bi_st_cosine_spearman", fixed(4)),
    *[_both(t, TVD_JSON, f"summary.noise{n}_{m}_ece", fixed(2)) for m, ts in TVD_ECE.items() for n, t in ts],
    _both("338 MiB", "tvd_memory.json", "summary.linear_tvd_peak_mib", lambda v: f"{v:,.0f} MiB"),
    _both("4,350 MiB", "tvd_memory.json", "summary.trl_nll_peak_mib", lambda v: f"{v:,.0f} MiB"),
    _both("0.70", "nbce_longcontext.json", "summary.n48_nbce_acc", fixed(2)),
    _both("0.73", "nbce_longcontext.json", "summary.n48_oracle_acc", fixed(2)),
    _both("0.31", "nbce_longcontext.json", "summary.n48_truncation_acc", fixed(2)),
    _both("1.07x", "nbce_longcontext.json", "summary.step_ratio_n48", lambda v: f"{v:.2f}x"),
    _both("0.092x", "nbce_longcontext.json", "summary.cache_ttft_ratio_n48", lambda v: f"{v:.3f}x"),
    _both("0.82", "nbce_longcontext.json", "summary.longdoc_nbce_acc", fixed(2)),
    _both("0.70", "nbce_longcontext.json", "summary.longdoc_truncation_acc", fixed(2)),
    _both("0.02", "nbce_longcontext.json", "summary.multiquery_nbce_acc", fixed(2)),
    _both("0.13", "nbce_longcontext.json", "summary.multiquery_truncation_acc", fixed(2)),
    _both("21.9 GiB", "memory_model.json", f"{LLAMA_70B_FSDP2}.projected_freeing.total", gib),
    _both("65.7 GiB", "memory_model.json", f"{LLAMA_70B_FSDP2}.adamw.total", gib),
    _both("35.3 GiB", "memory_model.json", f"{LLAMA_70B_FSDP2}.galore.total", gib),
    _both("18.0 GiB", "memory_model.json", f"{LLAMA_70B_FSDP2}.lora.total", gib),
    _both("6.9e-7", "memory_model.json", "summary.max_rel_error_one_process", scientific),
    _both("1.79x", "throughput_cpu.json", "summary.bert_bucketed_vs_static", lambda v: f"{v:.2f}x"),
    _both("0.94", "cur_recall.json", "summary.adacur_top10_overlap_10pct", fixed(2)),
    _both("0.57", "cur_recall.json", "summary.adacur_top10_overlap_1pct", fixed(2)),
    _both("0.89", "cur_recall.json", "summary.anncur_top10_overlap_10pct", fixed(2)),
    _both("0.48", "cur_recall.json", "summary.anncur_top10_overlap_1pct", fixed(2)),
    _both("0.60", "cur_recall.json", "summary.biencoder_top10_overlap_10pct", fixed(2)),
    _both("0.39", "cur_recall.json", "summary.biencoder_top10_overlap_1pct", fixed(2)),
    _both("0.710", "geometry.json", "summary.csls_recall1", fixed(3)),
    _both("0.688", "geometry.json", "summary.cosine_recall1", fixed(3)),
    _both("1.90x", "geometry.json", "summary.kocc_speedup_vs_faiss_50k", lambda v: f"{v:.2f}x"),
    _both("3.0 points", "geometry.json", "summary.csls_corpus_recall1_gain_points", lambda v: f"{-v:.1f} points"),
]
# Decimals a page may print that are not measurements (none today); each needs its reason.
NOT_FIGURES: dict[str, str] = {}
# A decimal, alone or as a ratio ("1.79x"): the trailing x is not part of the number, any other letter is.
DECIMAL = re.compile(r"(?<![\w.])[+-]?\d+\.\d+(?:e-?\d+)?(?=x\b|[^\w.]|$)")


def lookup(file: str, key: str) -> Any:
    value: Any = json.loads((RESULTS / file).read_text())
    for part in _split_key(key):
        value = value[part]
    return value


def _split_key(key: str) -> list[str]:
    """Dotted keys; a dot between two digits belongs to the name (``noise04_tvd0.5_ece``)."""
    return re.split(r"(?<!\d)\.|\.(?!\d)", key)


def prose(page: Path) -> str:
    """The page without fenced code blocks and inline code (commands and versions are not figures)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def test_readme_fits_on_one_screen() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"


@pytest.mark.parametrize("figure", FIGURES, ids=[f"{f.file}:{f.key}" for f in FIGURES])
def test_figure_is_the_jsons(figure: Figure) -> None:
    printed = figure.render(lookup(figure.file, figure.key))
    assert printed == figure.text, f"{figure.file} {figure.key} now prints {printed!r}, the pages say {figure.text!r}"
    for page in figure.pages:
        assert figure.text in prose(page), f"{page.name} no longer prints {figure.text!r} ({figure.key})"


@pytest.mark.parametrize("page", [README, LANDING], ids=["README.md", "docs/index.md"])
def test_every_decimal_on_the_page_is_a_listed_figure(page: Path) -> None:
    listed = {m.group().lstrip("+") for f in FIGURES if page in f.pages for m in DECIMAL.finditer(f.text)}
    numbers = {m.group().lstrip("+") for m in DECIMAL.finditer(prose(page))}
    covered = numbers & (listed | set(NOT_FIGURES))
    assert numbers == covered, f"{page.name} prints figures no JSON key backs: {sorted(numbers - covered)}"


def test_the_figure_check_catches_a_drifted_figure(tmp_path: Path) -> None:
    """A page whose figure differs from the JSON's fails, and an unlisted figure is found."""
    figure = next(f for f in FIGURES if f.text == "0.8472")
    wrong = Figure("0.8500", figure.file, figure.key, figure.render)
    with pytest.raises(AssertionError, match="now prints"):
        test_figure_is_the_jsons(wrong)
    page = tmp_path / "page.md"
    page.write_text("A new claim: 0.9999 recall, 2.50x faster, `pip install x==1.2.3`.\n\n```bash\nv 2.5\n```\n")
    assert {m.group() for m in DECIMAL.finditer(prose(page))} == {"0.9999", "2.50"}
