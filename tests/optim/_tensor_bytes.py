"""Bytes of optimizer state and gradients as this rank holds them (the peak of a block is `hf_ext.tensor_memory`'s
`TensorBytes`)."""

from __future__ import annotations

from typing import Any

from hf_ext.optim.freeing import is_freed


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the tensors' local parts (DTensors: this rank's shard); None and freed gradients count 0."""
    total = 0
    for tensor in tensors:
        if tensor is None or is_freed(tensor):
            continue
        part = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += part.numel() * part.element_size()
    return total
