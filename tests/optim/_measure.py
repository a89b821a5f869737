"""Measured bytes of training a small Llama, to check `estimate_training_memory` against (one process or a rank).

Untied embeddings: a tied weight's first partial gradient waits in the autograd engine (not in ``.grad``) until the
embedding's arrives, which a ``.grad``-based count cannot see.

Weights: the storages behind the parameters (FSDP2: its padded shards). Gradients: the most gradient storage alive
at once, seen by a post-accumulate-grad hook registered before the optimizer's (so before a freeing hook frees
it) and after backward. Optimizer state: the bytes of this process's part of every state tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ext.optim import create_projected_optimizer
from hf_ext.optim.freeing import is_freed

SMALL_LLAMA = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False}  # fmt: skip
RANK = 8
METHODS = ("adamw", "lora", "projected", "projected_freeing")


def small_llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA))


def _storage_bytes(tensors) -> int:
    storages = {}
    for tensor in tensors:
        if tensor is None or is_freed(tensor):
            continue
        part = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = part.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                part = value.to_local() if hasattr(value, "to_local") else value
                total += part.numel() * part.element_size()
    return total


def measure(method: str, shard: Any = None) -> dict[str, int]:
    """Train ``small_llama`` two steps with ``method``; ``shard(model)`` applies `fully_shard` (None: one process)."""
    model = small_llama()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear"))
    if shard is not None:
        model = shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    peak = {"gradients": 0}

    def watch(_param: torch.Tensor) -> None:
        peak["gradients"] = max(peak["gradients"], _storage_bytes(p.grad for p in params))

    for param in params:  # before the optimizer's own hooks: sees each gradient before it is freed
        param.register_post_accumulate_grad_hook(watch)
    if method in ("adamw", "lora"):
        optimizer = torch.optim.AdamW(params, lr=1e-3)
    else:
        optimizer = create_projected_optimizer(model, rank=RANK, lr=1e-3, step_in_backward=method.endswith("freeing"))
    ids = torch.randint(0, SMALL_LLAMA["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        watch(params[0])
        optimizer.step()
    return {
        "weights": _storage_bytes(model.parameters()),
        "gradients": peak["gradients"],
        "optimizer_state": _state_bytes(optimizer),
    }
