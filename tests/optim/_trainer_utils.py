"""The tiny Llama + Trainer helpers that tests/optim's Trainer tests share (the data is conftest's ``lm_data``)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)


def _model(tiny_llama_dir: Path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir)


def _args(tmp: Path, **kwargs) -> TrainingArguments:
    defaults = {"output_dir": str(tmp), "per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_steps": 6,
                "save_strategy": "no", "report_to": "none", "use_cpu": True, "seed": 0, "data_seed": 0,
                "disable_tqdm": True, "dataloader_num_workers": 0, "lr_scheduler_type": "constant"}  # fmt: skip
    return TrainingArguments(**{**defaults, **kwargs})


def _trainer(model, args, data, tiny_llama_dir, **kwargs) -> Trainer:
    collator = DataCollatorForLanguageModeling(AutoTokenizer.from_pretrained(tiny_llama_dir), mlm=False)
    return Trainer(model=model, args=args, train_dataset=data, data_collator=collator, **kwargs)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_close(a: dict, b: dict, atol: float) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)
