"""Measured bytes of training a small Llama (`measure_training_memory`), to check `estimate_training_memory` against
(one process or a rank). Untied embeddings here; tests/optim/test_measure.py covers tied ones."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ext.optim import create_projected_optimizer, measure_training_memory

SMALL_LLAMA = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False}  # fmt: skip
RANK = 8
METHODS = ("adamw", "lora", "projected", "projected_freeing")


def small_llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA))


def measure(method: str, shard: Any = None) -> dict[str, int]:
    """Train ``small_llama`` two steps with ``method``; ``shard(model)`` applies `fully_shard` (None: one process)."""
    model = small_llama()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear"))
    if shard is not None:
        model = shard(model)

    def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        if method in ("adamw", "lora"):
            return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        return create_projected_optimizer(model, rank=RANK, lr=1e-3, step_in_backward=method.endswith("freeing"))

    ids = torch.randint(0, SMALL_LLAMA["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    return measure_training_memory(model, make_optimizer, {"input_ids": ids, "labels": ids}).as_dict()
