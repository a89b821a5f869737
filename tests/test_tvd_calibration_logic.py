"""The selection logic of benchmarks/tvd_calibration.py and the grid search it shares (`_common.bracketed_grid`), on
made-up validation scores: the grid grows past a best open end, ties go to the smallest values in the grid and in
its one-dimensional slices alike, the sweep runs leave the test split alone, and the figures come from the test
runs at the chosen settings only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common
import tvd_calibration as bench


def test_the_grid_grows_to_an_inside_best_and_breaks_ties_as_its_slices_do() -> None:
    def score(g: float, b: float) -> float:  # best near gamma 0.95, floor 0.3: past both first grids
        return -((g - 0.95) ** 2) - (b - 0.3) ** 2

    search = _common.bracketed_grid(score, {"gamma": (0.1, 0.5, 0.9), "floor": (0.0, 0.1, 0.2)},
                                    {"gamma": "share", "floor": "floor"})  # fmt: skip
    assert search["best"] == (pytest.approx(0.95), pytest.approx(0.3))
    assert not search["gamma"]["at_edge"] and not search["floor"]["at_edge"]
    flat = _common.bracketed_grid(lambda g, b: 0.5, {"gamma": (0.5, 0.1, 0.9), "floor": (0.2, 0.0)},
                                  {"gamma": "share", "floor": "floor"}, max_extensions=1)  # fmt: skip
    # all tied: the smallest values (the grid grew once below gamma 0.1), and the slices report the same cell
    assert flat["best"] == (0.05, 0.0) and flat["gamma"]["value"] == 0.05 and flat["floor"]["value"] == 0.0


def test_select_chooses_on_validation_accuracy_without_the_test_split(monkeypatch) -> None:
    calls = []

    def fake_train(data, out, split, method, setting, noise, seed, extra):
        calls.append((split, method, dict(setting), seed))
        accuracy = {"ls": lambda s: 0.8 - (s["ls"] - 0.1) ** 2,
                    "tvd": lambda s: 0.8 - (s["gamma"] - 0.5) ** 2 - (s["floor"] - 0.1) ** 2}.get(
            method, lambda s: 0.7)(setting)  # fmt: skip
        return {"validation": {"accuracy": accuracy}, "test": None}

    monkeypatch.setattr(bench, "train", fake_train)
    data: dict = {}
    chosen = bench.select(data, Path("unused.json"), 0.4, [])
    assert chosen == {"ce": {}, "ls": {"ls": 0.1}, "dft": {}, "tvd": {"gamma": 0.5, "floor": 0.1}}
    assert {split for split, *_ in calls} == {"sweep"} and {seed for *_, seed in calls} == {0}
    assert data["chosen"]["noise0.4"] == chosen and not data["selection"]["noise0.4"]["tvd"]["gamma"]["at_edge"]


def test_the_summary_reads_the_test_runs_at_the_chosen_settings_only() -> None:
    def run(split: str, method: str, setting: dict, seed: int, accuracy: float) -> dict:
        metrics = {"accuracy": accuracy, "nll": 1.0 - accuracy, "ece": 0.1}
        return {"split": split, "method": method, "setting": setting, "noise": 0.4, "seed": seed,
                "validation": {"accuracy": 0.5}, "test": metrics if split == "test" else None}  # fmt: skip

    chosen = {"ce": {}, "ls": {"ls": 0.1}, "dft": {}, "tvd": {"gamma": 0.5, "floor": 0.1}}
    runs = {f"{m}{s}": run("test", m, chosen[m], s, 0.8 + 0.01 * s + (0.02 if m == "tvd" else 0))
            for m in chosen for s in range(3)}  # fmt: skip
    runs["other"] = run("test", "tvd", {"gamma": 0.9, "floor": 0.1}, 0, 0.99)  # not the chosen setting
    runs["sweep"] = run("sweep", "tvd", chosen["tvd"], 0, 0.0)
    s = bench.summarize({"runs": runs, "chosen": {"noise0.4": chosen}})
    assert s["noise04_tvd_accuracy"] == pytest.approx(0.83) and s["noise04_tvd_seeds"] == 3
    assert s["noise04_ce_accuracy"] == pytest.approx(0.81)
    assert s["noise04_tvd_minus_ce_accuracy"] == pytest.approx(0.02)
    assert s["noise04_tvd_minus_ce_accuracy_paired"]["agree"] == 3
    assert s["noise04_dft_minus_ce_accuracy"] == pytest.approx(0.0)  # DFT's runs here equal CE's
    assert s["noise04_dft_minus_ce_accuracy_paired"]["agree"] == 0
    assert s["noise04_tvd_gamma"] == 0.5 and s["noise04_tvd_min_weight"] == 0.1 and s["noise04_ls_factor"] == 0.1
    assert "TVD gamma 0.5, floor 0.1" in bench.table({"summary": s})


def test_a_sweep_run_leaves_the_test_split_alone_and_a_test_run_scores_it(monkeypatch, tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import train_tvd

    seen = []

    def fake_main(args, config):
        seen.append((args.evaluate_test, args.validation_share, args.label_noise, config.tvd_gamma, config.seed))
        return {"validation": {"accuracy": 0.5}, "test": {"accuracy": 0.6} if args.evaluate_test else {},
                "train_examples": 10, "validation_examples": 2, "train_seconds": 1.0}  # fmt: skip

    monkeypatch.setattr(train_tvd, "main", fake_main)
    data = {"protocol": {"machine": {}}}
    sweep = bench.train(data, tmp_path / "r.json", "sweep", "tvd", {"gamma": 0.5, "floor": 0.1}, 0.4, 0, [])
    test = bench.train(data, tmp_path / "r.json", "test", "tvd", {"gamma": 0.5, "floor": 0.1}, 0.4, 1, [])
    assert seen == [(False, bench.VALIDATION_SHARE, 0.4, 0.5, 0), (True, bench.VALIDATION_SHARE, 0.4, 0.5, 1)]
    assert sweep["test"] is None and test["test"] == {"accuracy": 0.6}
    bench.train(data, tmp_path / "r.json", "sweep", "tvd", {"gamma": 0.5, "floor": 0.1}, 0.4, 0, [])
    assert len(seen) == 2  # a finished run is reused
