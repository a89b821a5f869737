"""Peak bytes of the tensors operators allocate inside a block, counted from tensors (as benchmarks/_common.py's
`PeakMemory` does on CPU): every output storage is counted while alive, so a freed gradient stops counting."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hf_ext.optim.freeing import is_freed


class TensorBytes(TorchDispatchMode):
    """``peak``: the most bytes alive at once among the storages made inside the block (CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def _release(self, key: int, _ref: weakref.ref) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            key, nbytes = id(storage), storage.nbytes()
            known = self._sizes.get(key)
            if known is None:
                if nbytes == 0:
                    continue
                self._refs[key] = weakref.ref(storage, lambda ref, key=key: self._release(key, ref))
                self._sizes[key] = nbytes
                self.live += nbytes
            elif nbytes != known:
                self._sizes[key] = nbytes
                self.live += nbytes - known
            self.peak = max(self.peak, self.live)
        return out


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the tensors' local parts (DTensors: this rank's shard); None and freed gradients count 0."""
    total = 0
    for tensor in tensors:
        if tensor is None or is_freed(tensor):
            continue
        part = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += part.numel() * part.element_size()
    return total
