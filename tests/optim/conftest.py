"""tests/optim's shared data: the BBC LM examples and the one two-process FSDP2 run (see `_fsdp2_runs`)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from hf_ext.assets import load_bbc_news
from hf_ext.testing import run_distributed

from ._fsdp2_runs import run_all


@pytest.fixture(scope="session")
def fsdp2_runs(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> list[dict]:
    """Each rank's results of `run_all` (two gloo processes, `fully_shard` on a 1-D CPU mesh)."""
    return run_distributed(run_all, world_size=2, args=(str(tmp_path_factory.mktemp("dcp")), str(tiny_llama_dir)))


@pytest.fixture(scope="session")
def lm_data(tiny_llama_dir: Path) -> datasets.Dataset:
    """Real BBC article openings of varying lengths (padding inside batches), SmolLM2 tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    data = load_bbc_news().shuffle(seed=2).select(range(32))
    return data.map(
        lambda b: tokenizer([t[: 40 + 9 * (i % 7)] for i, t in enumerate(b["text"])]), batched=True
    ).select_columns(["input_ids", "attention_mask"])
