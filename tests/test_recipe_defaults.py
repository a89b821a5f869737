"""The CoSENT recipe's defaults are the ones STS-B dev chose in the committed benchmark
(benchmarks/results/cosent_sts.json), never a test-split figure and never a number typed by hand."""

from __future__ import annotations

import ast
import inspect
import json
import math
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


def _cosent_benchmark():
    """benchmarks/cosent_sts.py as a module (its run keys and chosen settings; nothing is run)."""
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))  # for its `_common` import
    spec = importlib.util.spec_from_file_location("cosent_sts_bench", ROOT / "benchmarks" / "cosent_sts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scored_under(curve: list[dict], fraction: float) -> list[dict]:
    """The points of a recorded dev curve that a run evaluating every ``fraction`` of its steps scores: every
    ``ceil(fraction * steps)`` steps and the last step (the Trainer's schedule), each required to be recorded."""
    steps = curve[-1]["step"]
    every = math.ceil(fraction * steps)
    wanted = sorted({*range(every, steps + 1, every), steps})
    by_step = {point["step"]: point for point in curve}
    missing = [s for s in wanted if s not in by_step]
    assert not missing, f"the recorded curve lacks steps {missing}: the schedule is not a subset of the sweep's"
    return [by_step[s] for s in wanted]


def _best_index(points: list[dict]) -> int:
    """The kept checkpoint: the first best (the Trainer keeps a strict improvement)."""
    values = [p["dev_spearman"] for p in points]
    return values.index(max(values))


def test_every_choice_and_reported_checkpoint_of_the_sweep_holds_under_the_recipes_evaluation_schedule() -> None:
    """The sweep ran with dev scored every tenth; the recipe now scores every `EVAL_FRACTION`, a subset of the
    recorded points. Choosing from that subset alone, every sweep must choose the same value and every run whose test
    figure is reported must keep the same checkpoint. (A re-run under the new schedule is not bit-identical: each
    evaluation draws once from torch's RNG, which shifts the dropout masks; that is seed-like noise, not selection.)"""
    data, bench = _results(), _cosent_benchmark()
    fraction = _recipe_constant("EVAL_FRACTION")
    runs = data["runs"]

    def reread(run: dict) -> float:
        return max(p["dev_spearman"] for p in _scored_under(run["dev_curve"], fraction))

    by_score = {(r["model_type"], r["loss"], r["dev_spearman"]): r for r in runs.values()}
    chosen = data["chosen"]
    sweeps = list(chosen["bi_cosent"]["steps"])
    sweeps += [chosen[name] for name in ("cross_cosent_scale", "cross_cosent", "cross_st_bce", "cross_st_mse",
                                         "bi_st_cosine")]  # fmt: skip
    for sweep in sweeps:
        base = sweep["base"]
        scores = {value: reread(by_score[(base["model_type"], base["loss"], score)])
                  for value, score in sweep["sweep"].items()}  # fmt: skip
        assert float(max(scores, key=scores.get)) == float(sweep["value"]), (sweep["param"], base, scores)
    reported = 0
    for model_type, loss in bench.NAMES:
        spec = bench.chosen_spec(data, model_type, loss)
        for seed in bench.SEEDS:
            run = runs[bench.run_key({**spec, "seed": seed})]
            points = _scored_under(run["dev_curve"], fraction)
            kept = points[_best_index(points)]["step"]
            assert run["checkpoint"] == f"best on dev (checkpoint-{kept})", bench.run_key({**spec, "seed": seed})
            reported += 1
    assert reported == len(bench.NAMES) * len(bench.SEEDS)
