"""The selection logic and text metrics of benchmarks/tvd_generation.py, on made-up dev scores: every sweep grows
past a best open end (never past a closed one), the grid's best is chosen, and the test seeds alone make the
figures; distinct-2 and repetition against counts worked out by hand."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import tvd_generation as bench


def test_distinct_2_and_repetition_by_hand() -> None:
    titles = ["Stocks rise again", "stocks rise", "Win win win"]
    # bigrams: (stocks rise) (rise again) | (stocks rise) | (win win) (win win): 3 distinct of 5
    assert bench.distinct_2(titles) == pytest.approx(3 / 5)
    # repeated-word shares: 0, 0, 2/3
    assert bench.repetition(titles) == pytest.approx((0 + 0 + 2 / 3) / 3)
    assert bench.distinct_2(["one"]) == 0.0 and bench.repetition([""]) == 0.0


@pytest.mark.parametrize(
    ("values", "best", "axis", "want"),
    [
        ([2e-5, 5e-5, 1e-4], 1e-4, "lr", 2e-4),
        ([2e-5, 5e-5, 1e-4], 2e-5, "lr", 1e-5),
        ([2e-5, 5e-5, 1e-4], 5e-5, "lr", None),
        ([0.1, 0.5, 0.9], 0.9, "share", 0.95),
        ([0.1, 0.5, 0.9], 0.1, "share", 0.05),
        ([0.0, 0.5], 0.0, "share", None),  # gamma 0 is cross-entropy: a closed end
        ([0.5, 1.0], 1.0, "share", None),
        ([0.0, 0.1, 0.2], 0.0, "floor", None),  # no weight below 0
        ([0.0, 0.1, 0.2], 0.2, "floor", 0.3),
        ([0.3], 0.3, "floor", None),  # a single value is not a sweep
    ],
)
def test_an_open_end_is_extended_and_a_closed_one_is_not(values, best, axis, want) -> None:
    assert bench.extension(values, best, axis) == (None if want is None else pytest.approx(want))


def test_select_grows_each_sweep_to_an_inside_best(monkeypatch) -> None:
    """Dev ROUGE-L peaks at lr 4e-4 for every method (two doublings past the sweep), and for TVD at gamma 0.95,
    floor 0.3 (one step past each grid end)."""
    calls = []

    def fake_run(data, out, method, setting, seed, split, inputs, args):
        assert split == "dev" and seed == 0
        calls.append((method, setting["lr"], setting["gamma"], setting["min_weight"]))
        lr_score = -abs(setting["lr"] - 4e-4) * 1e3
        tvd_score = -abs(setting["gamma"] - 0.95) - abs(setting["min_weight"] - 0.3) if method == "tvd" else 0.0
        return {"rougeL": 1.0 + lr_score + tvd_score}

    monkeypatch.setattr(bench, "run", fake_run)
    args = SimpleNamespace(lrs=[2e-5, 5e-5, 1e-4], gammas=[0.1, 0.5, 0.9], floors=[0.0, 0.1, 0.2])
    data: dict = {}
    chosen = bench.select(data, Path("unused.json"), {}, args)
    for method in ("ce", "dft", "dft_floor"):
        assert chosen[method]["lr"] == pytest.approx(4e-4)
        assert not data["selection"][f"{method}_lr"]["at_edge"]
    assert chosen["ce"]["gamma"] == 0.0 and chosen["dft"] == {"lr": pytest.approx(4e-4), "gamma": 1.0,
                                                              "min_weight": 0.0}  # fmt: skip
    assert chosen["tvd"]["gamma"] == pytest.approx(0.95) and chosen["tvd"]["min_weight"] == pytest.approx(0.3)
    assert not data["selection"]["tvd_gamma"]["at_edge"] and not data["selection"]["tvd_floor"]["at_edge"]
    assert ("tvd", pytest.approx(4e-4), pytest.approx(0.975), pytest.approx(0.3)) in calls  # grown once more


def test_the_summary_takes_test_seeds_only_and_pairs_them() -> None:
    def metrics(rouge: float) -> dict:
        return {"ppl": 10.0, "ece": 0.1, "rougeL": rouge, "distinct2": 0.9, "repetition": 0.05}

    means = (("ce", 0.30), ("tvd", 0.32), ("dft", 0.28), ("dft_floor", 0.29))
    runs = {f"test/{m}/s{seed}": {"method": m, "seed": seed, "split": "test", "metrics": metrics(r + 0.01 * seed)}
            for m, r in means for seed in range(3)}  # fmt: skip
    runs["dev/tvd/x"] = {"method": "tvd", "seed": 0, "split": "dev", "metrics": metrics(0.99)}  # never in the figures
    chosen = {m: {"lr": 5e-5, "gamma": g, "min_weight": b}
              for m, g, b in (("ce", 0, 0), ("tvd", 0.5, 0.2), ("dft", 1, 0), ("dft_floor", 1, 0.1))}  # fmt: skip
    s = bench.summarize({"runs": runs, "chosen": chosen})
    assert s["tvd_rougeL"] == pytest.approx(0.33) and s["tvd_seeds"] == 3
    assert s["tvd_minus_ce_rougeL"] == pytest.approx(0.02) and s["tvd_minus_ce_rougeL_agree"] == 3
    assert s["tvd_gamma"] == 0.5 and s["tvd_min_weight"] == 0.2
    assert "tvd" in bench.table({"runs": runs, "chosen": chosen, "summary": s})
