"""The CoSENT recipe's defaults are the ones STS-B dev chose in the committed benchmark
(benchmarks/results/cosent_sts.json), never a test-split figure and never a number typed by hand."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

from hf_ext import CrossEncoderCoSENTLoss

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cosent_sts.json"
RECIPE = ROOT / "recipes" / "train_cosent.py"


def _recipe_constant(name: str) -> object:
    """A module-level constant of the recipe, read from its source (no import of the training stack)."""
    for node in ast.parse(RECIPE.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{RECIPE.name} defines no {name}")


def _results() -> dict:
    return json.loads(RESULTS.read_text())


def test_bi_encoder_defaults_are_the_best_dev_run_of_the_committed_sweep() -> None:
    data = _results()
    defaults = _recipe_constant("BI_DEFAULTS")
    chosen = data["protocol"]["chosen"].get("bi_cosent")
    if chosen is not None:  # the finished sweep's choice
        assert defaults == {"batch_size": chosen["batch_size"], "learning_rate": chosen["learning_rate"]}
        return
    key = ("bi", "cosent", data["protocol"]["sweep_seed"])
    sweep = [r for r in data["runs"].values() if (r["model_type"], r["loss"], r["seed"]) == key]
    assert sweep, "no bi-encoder sweep runs in cosent_sts.json"
    best = max(sweep, key=lambda r: r["dev_spearman"])
    assert defaults == {"batch_size": best["batch_size"], "learning_rate": best["learning_rate"]}


def test_the_bi_encoder_coordinate_search_never_lowers_devs_best() -> None:
    """Each step's sweep holds the point it starts from, so its score never falls, and the choice is the best
    point the search visited (a batch sweep that skipped the current batch once chose dev 0.8763 over 0.8896)."""
    chosen = _results()["chosen"].get("bi_cosent")  # the full record, with its steps (protocol.chosen is a digest)
    assert chosen is not None, "the bi-encoder sweep has not run"
    scores = [step["score"] for step in chosen["steps"]]
    assert scores == sorted(scores), f"a coordinate step lowered dev's best: {scores}"
    visited = max(max(step["sweep"].values()) for step in chosen["steps"])
    assert chosen["dev_spearman"] == visited


def test_cross_encoder_defaults_are_the_dev_choice() -> None:
    chosen = _results()["protocol"]["chosen"]
    assert "cross_cosent_scale" in chosen and "cross_cosent" in chosen, "the cross-encoder sweep has not run"
    default = inspect.signature(CrossEncoderCoSENTLoss).parameters["scale"].default
    assert default == chosen["cross_cosent_scale"]["value"]
    defaults = _recipe_constant("CROSS_DEFAULTS")
    assert defaults["scale"] == chosen["cross_cosent_scale"]["value"]
    assert defaults["learning_rate"] == chosen["cross_cosent"]["value"]
    sweep_batch = {r["batch_size"] for r in _results()["runs"].values() if r["model_type"] == "cross"}
    assert sweep_batch == {defaults["batch_size"]}
