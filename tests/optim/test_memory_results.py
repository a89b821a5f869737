"""`estimate_training_memory`, as the code stands, against the bytes SmolLM2-135M was measured to hold in
benchmarks/results/memory_model.json (one process and each of 2 FSDP2 ranks): within 5% for every method it models.
GaLore and APOLLO (benchmark-only packages) are measured there rather than in the suite."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_ext import smollm2_path
from hf_ext.optim import estimate_training_memory
from hf_ext.optim.memory import METHODS

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "memory_model.json"
PARTS = ("weights", "gradients", "optimizer_state")


def test_the_estimate_is_within_5_percent_of_smollm2s_measured_bytes() -> None:
    data = json.loads(RESULTS.read_text())
    rank, world_size = data["protocol"]["rank"], data["protocol"]["world_size"]
    with torch.device("meta"):  # shapes only
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_path()), dtype=torch.float32)
    assert set(data["one_process"]) == set(METHODS)
    assert len(data["fsdp2"]) == world_size
    settings = [({}, data["one_process"])]
    settings += [({"world_size": world_size, "sharding": "fsdp2", "process_index": i}, rows)
                 for i, rows in enumerate(data["fsdp2"])]  # fmt: skip
    for kwargs, rows in settings:
        for method, row in rows.items():
            estimated = estimate_training_memory(model, method, rank=rank, **kwargs).as_dict()
            for part in PARTS:
                measured = row["measured"][part]
                assert abs(estimated[part] - measured) <= 0.05 * measured, (kwargs, method, part, measured, estimated)
