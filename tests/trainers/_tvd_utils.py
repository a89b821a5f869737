"""Helpers the TVDTrainer tests share: the config, real BBC text for a causal LM, and an exact weight comparison."""

from __future__ import annotations

from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer

from hf_ext.assets import load_bbc_news
from hf_ext.trainers import TVDConfig


def tvd_args(tmp: Path, **kwargs) -> TVDConfig:
    """A CPU `TVDConfig` (seeded, no saving, no workers); ``kwargs`` override any field."""
    defaults = {"output_dir": str(tmp), "per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_steps": 20,
                "logging_steps": 5, "save_strategy": "no", "report_to": "none", "use_cpu": True, "seed": 0,
                "data_seed": 0, "disable_tqdm": True, "dataloader_num_workers": 0, "tvd_gamma": 0.0,
                "tvd_min_weight": 0.0}  # fmt: skip
    return TVDConfig(**{**defaults, **kwargs})


def bbc_text(tokenizer_dir: Path, n: int) -> datasets.Dataset:
    """``n`` real BBC article openings of varying lengths (so batches have padding), tokenised for a causal LM."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = load_bbc_news().shuffle(seed=1).select(range(n))
    return data.map(
        lambda b: tokenizer([t[: 40 + 7 * (i % 9)] for i, t in enumerate(b["text"])]), batched=True
    ).select_columns(["input_ids", "attention_mask"])


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)
