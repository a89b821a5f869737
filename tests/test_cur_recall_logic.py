"""The dev sweep of benchmarks/cur_recall.py on made-up dev scores: it finds an optimum that lies past the first
grid's rounds, ends bracketed on every axis (or at an axis' closed end), grows the rounds only around the best
cell, and never asks for more rounds than the calls left to re-rank."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cur_recall as bench


class SurfaceEvaluator:
    """Dev top-10 from a smooth made-up surface over (strategy, share, rounds), with the calls each cell asked for."""

    def __init__(self, best_share: float, best_rounds: float, kmeans_bonus: float = 0.05) -> None:
        self.best_share, self.best_rounds, self.kmeans_bonus = best_share, best_rounds, kmeans_bonus
        self.asked: list[tuple] = []

    def cur(self, calls: int, strategy: str, share: float, rounds: int, draw: int) -> dict[str, float] | None:
        rerank_k = calls - bench._n_anchor(share, calls)
        if rerank_k < rounds:
            return None
        self.asked.append((strategy, share, rounds, draw))
        score = (0.9 - (math.log(share) - math.log(self.best_share)) ** 2
                 - 0.1 * (math.log(rounds) - math.log(self.best_rounds)) ** 2
                 + self.kmeans_bonus * (strategy == "kmeans"))  # fmt: skip
        return {"top1": score, "top10": score, "top50": score}


def test_the_sweep_follows_the_rounds_past_the_first_grid_and_ends_bracketed() -> None:
    evaluator = SurfaceEvaluator(best_share=0.25, best_rounds=60)
    pick = bench._sweep(evaluator, 250, bench.ROUNDS)
    assert (pick["strategy"], pick["share"]) == ("kmeans", 0.25)
    assert pick["rounds"] in (40, 80)  # the doubling ladder's nearest values to 60
    assert not pick["rounds_sweep"]["at_edge"] and not pick["share_sweep"]["at_edge"]
    grown = {cell[:3] for cell in evaluator.asked if cell[2] > max(bench.ROUNDS)}
    assert grown and all(share in (0.1, 0.25, 0.5) for _, share, _ in grown)  # only the best cell's neighbours
    assert len(grown) <= 4 * 4  # not the whole 2 x 5 grid again at each new rounds value


def test_the_rounds_stop_at_one_item_a_round() -> None:
    evaluator = SurfaceEvaluator(best_share=0.5, best_rounds=10_000)
    pick = bench._sweep(evaluator, 100, bench.ROUNDS)
    assert pick["share"] == 0.5 and pick["rounds"] == 100 - bench._n_anchor(0.5, 100)  # rerank_k: the closed end
    assert all(rounds <= 100 - bench._n_anchor(share, 100) for _, share, rounds, _ in evaluator.asked)


def test_a_best_share_at_an_end_grows_the_shares_and_anncur_never_grows_rounds() -> None:
    evaluator = SurfaceEvaluator(best_share=0.02, best_rounds=1)
    pick = bench._sweep(evaluator, 500, (1,))
    assert pick["rounds"] == 1 and {cell[2] for cell in evaluator.asked} == {1}
    assert pick["share"] < min(bench.ANCHOR_SHARES) and not pick["share_sweep"]["at_edge"]
