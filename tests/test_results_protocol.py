"""Every committed results file carries the benchmark protocol (benchmarks/_common.py): the machine it ran on, the
selection split (never the test split), the chosen values and the seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
PRE_PROTOCOL = RESULTS / "pre_protocol"
MACHINE_KEYS = {"cpu_model", "cpu_has_amx", "cpu_has_avx512_bf16", "threads", "device", "device_name", "torch",
                "transformers", "sentence_transformers"}  # fmt: skip
FILES = sorted(RESULTS.glob("*.json"))


def test_there_are_results_files() -> None:
    assert FILES, f"no results files under {RESULTS}"


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_results_file_carries_the_protocol(path: Path) -> None:
    data = json.loads(path.read_text())
    assert list(data)[:2] == ["summary", "protocol"], f"{path.name} must open with summary, then protocol"
    block = data["protocol"]
    missing = MACHINE_KEYS - set(block.get("machine", {}))
    assert not missing, f"{path.name}: protocol.machine lacks {sorted(missing)}"
    assert isinstance(block["machine"]["cpu_has_amx"], bool) and isinstance(block["machine"]["threads"], int)
    selection, test = block.get("selection_split"), block.get("test_split")
    assert isinstance(selection, str) and selection.strip(), f"{path.name}: protocol.selection_split is empty"
    assert isinstance(test, str) and test.strip(), f"{path.name}: protocol.test_split is empty"
    assert selection.strip().lower() not in ("test", test.strip().lower()), f"{path.name}: chosen on the test split"
    assert isinstance(block.get("chosen"), dict), f"{path.name}: protocol.chosen must be a mapping"
    seeds = block.get("seeds")
    assert isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds), f"{path.name}: seeds"


def test_pre_protocol_results_are_each_accounted_for() -> None:
    """Results measured before the protocol (their settings were chosen on the reported data) live apart, each
    named in pre_protocol/README.md with the issue that re-runs it."""
    if not PRE_PROTOCOL.is_dir():
        return
    listed = (PRE_PROTOCOL / "README.md").read_text()
    for path in sorted(PRE_PROTOCOL.glob("*.json")):
        assert f"`{path.name}`" in listed, f"{path.name} is not accounted for in pre_protocol/README.md"


def _interior(sweep: dict[str, float], chosen: float) -> bool:
    rates = sorted(float(rate) for rate in sweep)
    return rates[0] < chosen < rates[-1]


@pytest.mark.xfail(
    strict=True,
    reason="issue 16: every run is made, but under FSDP2 on 2 processes each rank's optimizer state is 0.209x "
    "AdamW's (107 of 513 MiB), past the issue's 0.2 (one process: 0.146x)",
)
def test_projected_optimizer_results_hold_what_issue_16_asks() -> None:
    """benchmarks/results/projected_optimizer.json: >= 150 steps, every chosen rate inside its validation sweep,
    3 test seeds per method, the paired difference against LoRA, the memory, state, step-time and FSDP2 figures."""
    summary = json.loads((RESULTS / "projected_optimizer.json").read_text())["summary"]
    assert summary["steps"] >= 150
    for method in ("adamw", "lora", "galore", "apollo", "projected", "projected_svd"):
        chosen = summary[f"chosen_lr_{method}"]
        assert _interior(summary[f"validation_sweep_{method}"], chosen), f"{method}: {chosen} at its sweep's end"
        assert summary[f"eval_loss_{method}_n"] >= 3 and summary[f"eval_loss_{method}_std"] is not None, method
    assert summary["eval_loss_projected_minus_lora_paired_n"] >= 3
    for method in ("adamw", "lora", "galore", "galore_layerwise", "apollo", "projected", "projected_freeing"):
        assert summary[f"peak_train_mib_{method}"] > 0, method
    assert 0 < summary["state_bytes_ratio_vs_adamw"] <= 0.2
    assert summary["peak_train_mib_projected_freeing"] <= summary["peak_train_mib_lora"]
    assert summary["step_time_ratio_vs_adamw"] > 0
    for rank in (0, 1):
        assert summary[f"fsdp2_state_bytes_ratio_vs_adamw_rank{rank}"] <= 0.2
        assert summary[f"fsdp2_peak_train_mib_projected_freeing_rank{rank}"] > 0
