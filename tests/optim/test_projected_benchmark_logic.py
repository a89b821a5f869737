"""The learning-rate logic of benchmarks/projected_optimizer.py, on made-up validation losses: every sweep starts
at its rate and both ladder neighbours, grows past a best end, and only an inside best is chosen; the test figures
and paired differences come from the chosen rate's seeds alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import projected_optimizer as bench

CONFIG = {"steps": 150, "batch_size": 4, "block_size": 64, "eval_blocks": 64, "rank": 64, "update_interval": 10}


def _run(method: str, lr: float, loss: float, seed: int = 0) -> tuple[str, dict]:
    return bench._key(method, lr, seed), {"method": method, "lr": lr, "seed": seed, "validation_loss": loss}


def test_a_sweep_starts_at_three_rates_and_grows_past_a_best_end() -> None:
    runs: dict = {}
    assert bench.next_rate(runs, "adamw") == 5e-5  # the start, then its neighbours
    runs.update([_run("adamw", 5e-5, 3.0)])
    assert bench.next_rate(runs, "adamw") == 2e-5
    runs.update([_run("adamw", 2e-5, 3.1)])
    assert bench.next_rate(runs, "adamw") == 1e-4
    runs.update([_run("adamw", 1e-4, 2.9)])  # best at the top: one rate higher
    assert bench.chosen_rate(runs, "adamw") is None
    assert bench.next_rate(runs, "adamw") == 2e-4
    runs.update([_run("adamw", 2e-4, 2.95)])  # now inside
    assert bench.next_rate(runs, "adamw") is None
    assert bench.chosen_rate(runs, "adamw") == 1e-4
    runs.update([_run("adamw", 1e-4, 2.0, seed=1)])  # another seed's validation loss does not vote
    assert bench.chosen_rate(runs, "adamw") == 1e-4


def test_a_best_at_the_bottom_grows_downwards_and_the_ladder_end_stops() -> None:
    runs = dict([_run("lora", 2e-4, 2.0), _run("lora", 5e-4, 2.5), _run("lora", 1e-3, 3.0)])
    assert bench.next_rate(runs, "lora") == 1e-4
    runs = dict([_run("adamw", lr, float(i)) for i, lr in enumerate(bench.LADDER)])  # best at the ladder's bottom
    with pytest.raises(SystemExit, match="end of the ladder"):
        bench.next_rate(runs, "adamw")


def test_summary_reports_the_chosen_rates_test_seeds_and_pairs_them() -> None:
    runs = dict([_run(m, lr, loss) for m in ("lora", "projected") for lr, loss in
                 ((2e-4, 3.2), (5e-4, 3.0), (1e-3, 3.1))])  # fmt: skip
    test = {bench._key("projected", 1e-3, 0): {"test_loss": 1.0}}  # not the chosen rate: never reported
    for seed, (lora, projected) in enumerate(((3.50, 3.40), (3.52, 3.45), (3.48, 3.47))):
        test[bench._key("lora", 5e-4, seed)] = {"test_loss": lora}
        test[bench._key("projected", 5e-4, seed)] = {"test_loss": projected}
    s = bench.summarize({"config": CONFIG, "runs": runs, "test": test})
    assert s["chosen_lr_projected"] == 5e-4 and s["steps"] == 150
    assert s["eval_loss_projected"] == pytest.approx((3.40 + 3.45 + 3.47) / 3)
    assert s["eval_loss_lora_n"] == 3 and s["eval_loss_lora_std"] == pytest.approx(0.02)
    assert s["eval_loss_projected_minus_lora_paired"] == pytest.approx((-0.10 - 0.07 - 0.01) / 3)
    assert s["eval_loss_projected_minus_lora_paired_lower_on"] == 3
    assert s["target_eval_loss_projected_le_lora_paired"] is True
