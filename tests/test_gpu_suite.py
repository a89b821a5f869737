"""The GPU suite's tiny run (`benchmarks/gpu_suite.py --tiny --device cpu`), so that the one command a lent GPU machine
gets cannot rot: every part runs, writes its section and the summary with issue 17's keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
PARTS = ["throughput", "nbce", "projected", "knn", "losses"]
MODES = ["fp32_eager", "bf16_eager", "bf16_compile_static", "bf16_compile_varying", "bf16_compile_buckets"]
# issue 17, "Done when" 3
SUMMARY_KEYS = [
    "bert_buckets_vs_fixed",
    "bert_bf16_compile_vs_fp32",
    "bert_mfu_compile_fixed",
    "gpt2_buckets_vs_fixed",
    "gpt2_mfu_compile_fixed",
    "nbce_step_ratio_n48",
    "projected_step_ratio_vs_adamw",
    "knn_identical_1m",
    "knn_seconds_1m",
    "tvd_peak_mem_ratio_vs_ce",
]

pytestmark = pytest.mark.slow


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    return subprocess.run(
        [sys.executable, str(SUITE), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = _run("--tiny", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, json.loads((out / "gpu_suite_tiny.json").read_text())


def test_tiny_suite_runs_every_part_and_writes_the_summary_keys(tiny) -> None:
    out, data = tiny
    summary = data["summary"]
    assert list(data)[:2] == ["summary", "protocol"] and data["protocol"]["selection_split"].startswith("none:")
    assert summary["ran"] == PARTS and summary["skipped"] == {} and summary["failed"] == []
    assert all(key in summary for key in SUMMARY_KEYS), sorted(set(SUMMARY_KEYS) - set(summary))
    assert set(summary["targets"]) == {"bert_buckets_vs_fixed", "bert_bf16_compile_vs_fp32", "bert_mfu_compile_fixed",
                                       "gpt2_mfu_compile_fixed", "nbce_step_ratio_n48"}  # fmt: skip
    assert all(isinstance(t["met"], bool) for t in summary["targets"].values())
    assert all(data["parts"][part]["seconds"] > 0 for part in PARTS)
    assert (out / "throughput_tiny.json").is_file()


def test_tiny_throughput_part_measures_every_mode_through_the_shipped_configs(tiny) -> None:
    out, data = tiny
    part = data["parts"]["throughput"]
    standalone = json.loads((out / "throughput_tiny.json").read_text())
    assert "protocol" in standalone and standalone["summary"]["bert_buckets_vs_fixed"] > 0
    for kind in ("bert", "gpt2"):
        assert list(part[kind]) == MODES[:3] + MODES[4:] + MODES[3:4]  # the free-length mode runs last
        for mode, run in part[kind].items():
            assert run["steps"] == 12 and run["tokens_per_s"] > 0 and run["epoch"]["seconds"] > 0
            compiled = "compile" in mode
            assert run["accelerate_config"] == ({"fp32_eager": None, "bf16_eager": "bf16"}.get(mode, "bf16_compile"))
            assert (run["graphs"] > 0) == compiled and (run["compile_seconds"] > 0) == compiled
            assert (run["peak_bytes"] is not None) == (not compiled)  # CPU: memory from tensors in eager modes only
    varying = part["bert"]["bf16_compile_varying"]
    assert varying["recompile_limit"] == 4 and varying["recompile_limit_hit"]
    assert varying["compile_steps"] == 4 and varying["steady_after_limit_tokens_per_s"] > 0
    assert part["bert"]["bf16_compile_static"]["compile_steps"] == 1
    assert part["epochs"]["bert"]["examples"] == 5749 and part["epochs"]["gpt2"]["examples"] == 2096


def test_tiny_nbce_tokens_are_identical(tiny) -> None:
    nbce = tiny[1]["parts"]["nbce"]
    assert nbce["identity_one_context_beta0"] and nbce["tokens_identical"]
    assert list(nbce["settings"]) == ["4", "16", "48"] and nbce["settings"]["48"]["rows"] == 49
    assert all(s["plain_seconds_per_token"] > 0 and s["ratio"] > 0 for s in nbce["settings"].values())


def test_tiny_projected_part_compares_with_adamw(tiny) -> None:
    projected = tiny[1]["parts"]["projected"]
    assert list(projected["optimizers"]) == ["adamw", "projected_random", "projected_svd"]
    assert projected["gradient_freeing"].startswith("absent")
    for name, run in projected["optimizers"].items():
        assert run["state_bytes"] > 0 and run["peak_step_bytes"] > 0 and run["mean_step_seconds"] > 0, name
    assert projected["optimizers"]["projected_random"]["state_bytes_ratio_vs_adamw"] < 1


def test_tiny_knn_and_losses_agree_with_their_references(tiny) -> None:
    parts = tiny[1]["parts"]
    assert parts["knn"]["identical"] and parts["knn"]["rows_differing"] == 0 and parts["knn"]["points"] == 2000
    for runs in parts["losses"]["cosent"].values():
        for name in ("sentence_transformers", "pairwise_matrix"):
            assert runs[name]["loss_relative_difference"] < 1e-4 and runs[name]["grad_max_difference_relative"] < 1e-3
            assert runs[name]["peak_bytes"] > 0
    tvd = parts["losses"]["tvd"]
    assert tvd["gamma0_vs_cross_entropy_relative_difference"] < 1e-4
    assert tvd["tvd_loss"]["peak_bytes"] < tvd["cross_entropy"]["peak_bytes"]
    hidden = parts["losses"]["tvd_hidden"]
    assert hidden["linear_tvd_loss"]["loss_relative_difference"] < 1e-3  # bf16 logits on the full-logits side
    assert hidden["linear_tvd_loss"]["grad_max_difference_relative"] < 2e-2
    assert hidden["linear_tvd_loss"]["peak_bytes"] < hidden["full_logits_tvd_loss"]["peak_bytes"]
    assert hidden["trl"] and hidden["trl_fused_nll"]["peak_bytes"] > 0  # TRL is in the dev install


def test_table_renders_every_section(tiny) -> None:
    out, _ = tiny
    proc = _run("--table", str(out / "gpu_suite_tiny.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for heading in ("### Throughput", "### NBCE", "### ProjectedAdamW", "### Exact kNN", "### Losses"):
        assert heading in proc.stdout
