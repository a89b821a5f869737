"""Measure what `estimate_training_memory` predicts: the bytes of weights, gradients and optimizer state one process
holds while it trains (one process, or one rank of `fully_shard`).

Counted from tensors, never from the resident set:

- **weights**: the storages behind the model's parameters (FSDP2: this rank's padded shards);
- **gradients**: the most gradient bytes alive at once. A post-accumulate-grad hook registered on every trainable
  parameter *before* the optimizer is built (so before a gradient-freeing hook frees the gradient) counts the
  ``.grad`` storages after each gradient lands, and once more after backward. A weight shared by several modules
  (tied embeddings) also holds a partial gradient inside the autograd engine from the backward of its first
  module until the last part arrives; it is counted at its ``.grad`` size over that span. Under `fully_shard`
  that partial gradient is unsharded, one of FSDP2's transient unsharded buffers, which are not counted (as
  `estimate_training_memory` excludes them): the shard appears in ``.grad`` after the unit's reduce-scatter;
- **optimizer state**: this process's part of every distinct tensor reachable from ``optimizer.state`` (objects
  kept there included, such as GaLore's projector).

Example:

```python
>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from hf_ext.optim import create_projected_optimizer, estimate_training_memory, measure_training_memory
>>> config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
...                      num_key_value_heads=2, vocab_size=1000)
>>> model = LlamaForCausalLM(config)
>>> ids = torch.randint(0, 1000, (2, 16))
>>> measured = measure_training_memory(
...     model, lambda m: create_projected_optimizer(m, rank=8, lr=1e-3), {"input_ids": ids, "labels": ids})
>>> estimated = estimate_training_memory(model, "projected", rank=8)
>>> abs(measured.optimizer_state - estimated.optimizer_state) <= 0.05 * measured.optimizer_state
True

```
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..tensor_memory import reachable_tensors
from .freeing import is_freed
from .memory import TrainingMemory

__all__ = ["measure_training_memory"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    storages: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None or is_freed(tensor):
            continue
        storage = _local(tensor).untyped_storage()
        storages[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(storages.values())


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """This process's bytes of every distinct tensor reachable from the state: values, nested containers, and the
    attributes of objects kept there (GaLore's and APOLLO's projector objects hold their projection matrix)."""
    sizes: dict[int, int] = {}
    for tensor in reachable_tensors(list(optimizer.state.values())):
        part = _local(tensor)
        sizes[id(part.untyped_storage()) if part.data_ptr() == 0 else part.data_ptr()] = (
            part.numel() * part.element_size()
        )
    return sum(sizes.values())


def measure_training_memory(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    batch: Mapping[str, Any],
    *,
    steps: int = 2,
) -> TrainingMemory:
    """Train ``model`` for ``steps`` steps on ``batch`` and return the bytes it held (see the module docstring).

    Args:
        model (`torch.nn.Module`): the model, already wrapped as it trains (peft, `fully_shard`); its forward on
            ``batch`` must return an output with a ``loss``.
        make_optimizer (`Callable[[nn.Module], torch.optim.Optimizer]`): builds the optimizer from the model. It is
            called after the measuring hooks are registered, so that they see each gradient before a
            gradient-freeing optimizer (`StepInBackward`) frees it.
        batch (`Mapping[str, Any]`): the model's keyword inputs, labels included.
        steps (`int`, *optional*, defaults to `2`): optimizer steps (the state exists from the first).

    Returns:
        `TrainingMemory`: measured ``weights``, ``gradients`` (peak) and ``optimizer_state`` bytes.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(make_optimizer):
        raise ValueError(f"`make_optimizer` must be a callable taking the model, got {make_optimizer!r}.")
    if not isinstance(batch, Mapping):
        raise ValueError(f"`batch` must be a mapping of the model's keyword inputs, got {type(batch).__name__}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an int >= 1, got {steps!r}.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("`model` has no trainable parameters.")
    uses: dict[int, int] = defaultdict(int)
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] += 1
    # a shared weight not sharded; under FSDP2 its partial gradient is an unsharded buffer (see the module docstring)
    shared = {id(p): p for p in params if uses[id(p)] > 1 and not hasattr(p, "to_local")}
    pending: dict[int, int] = {}  # shared weights whose partial gradient sits in the autograd engine
    peak = {"gradients": 0}

    def count() -> None:
        live = _storage_bytes(p.grad for p in params) + sum(pending.values())
        peak["gradients"] = max(peak["gradients"], live)

    def landed(param: torch.Tensor) -> None:
        pending.pop(id(param), None)
        count()

    def first_part(module: nn.Module, *_: Any) -> None:
        for param in module.parameters(recurse=False):
            if id(param) in shared and param.grad is None:
                pending.setdefault(id(param), _local(param).numel() * param.element_size())
        count()

    handles = [param.register_post_accumulate_grad_hook(landed) for param in params]
    for module in model.modules():
        if any(id(p) in shared for p in module.parameters(recurse=False)):
            handles.append(module.register_full_backward_pre_hook(first_part))
    try:
        optimizer = make_optimizer(model)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = model(**batch).loss
            with warnings.catch_warnings():  # an embedding's hook fires on its output gradient, as it should here
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                loss.backward()
            count()
            optimizer.step()
        return TrainingMemory(_storage_bytes(model.parameters()), peak["gradients"], _state_bytes(optimizer))
    finally:
        for handle in handles:
            handle.remove()
