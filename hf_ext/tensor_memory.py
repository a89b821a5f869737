"""Peak memory counted from tensors: the bytes of the storages operators create inside a block, while alive.

On CPU there is no allocator statistic like CUDA's ``max_memory_allocated``, and a resident-set delta can read 0
when the allocator reuses freed pages. `TensorBytes` is a `TorchDispatchMode`: every operator's output storages
(forward and backward alike) are counted from their creation until they are freed, so a gradient freed during
backward stops counting at once. Storages that exist before the block (weights, inputs) are not counted, not even
when an operator returns them (a view, an in-place update such as an optimizer's) unless it grows them (an ``out=``
buffer resized: the growth counts). A storage resized outside any operator (FSDP2 frees its unsharded parameters
with ``untyped_storage().resize_(0)``) counts at its size as of the next operator. A DTensor counts as its local
shard. The probe costs Python time per operator: never time code inside it.

Example:

```python
>>> import torch
>>> from hf_ext.tensor_memory import TensorBytes
>>> x = torch.ones(1024)  # made before the block: not counted
>>> with TensorBytes() as probe:
...     y = x * 2          # 4 KiB, alive at the end
...     z = (y + 1).sum()  # a 4 KiB temporary, freed after the sum, and the 4-byte z
>>> probe.peak, probe.live
(8196, 4100)

```
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

__all__ = ["TensorBytes", "reachable_tensors"]


class TensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages operators create on ``device_type`` while the mode is active.

    Attributes:
        live (`int`): bytes of those storages alive now.
        peak (`int`): the most bytes alive at once since entry.
    """

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        if not isinstance(device_type, str) or not device_type:
            raise ValueError(f"`device_type` must be a device type string such as 'cpu', got {device_type!r}.")
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._base: dict[int, int] = {}  # bytes a storage had before the block (grown in place since)
        self._refs: dict[int, weakref.ref] = {}

    def _release(self, key: int, _ref: weakref.ref) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._base.pop(key, None)
        self._refs.pop(key, None)

    def _reread(self) -> None:
        """Re-read the size of every tracked storage: one resized outside any operator (FSDP2 frees and re-allocates
        its unsharded parameters with ``untyped_storage().resize_``, which no dispatch mode sees) counts as it is
        now."""
        live = 0
        for key, ref in self._refs.items():
            storage = ref()
            size = 0 if storage is None else max(storage.nbytes() - self._base[key], 0)
            self._sizes[key] = size
            live += size
        self.live = live

    def _storages(self, tree: Any) -> Iterator[torch.UntypedStorage]:
        """The storages behind the tensors in ``tree`` on this device; a tensor subclass that wraps others (a
        DTensor) stands for its inner tensors (this rank's shard)."""
        stack = [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]
        while stack:
            tensor = stack.pop()
            if is_traceable_wrapper_subclass(tensor):
                names, _ = tensor.__tensor_flatten__()
                inner = (getattr(tensor, name) for name in names)
                stack.extend(t for t in inner if isinstance(t, torch.Tensor))
            elif tensor.device.type == self.device_type:
                yield tensor.untyped_storage()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        # storages the operator was handed: an output that is one of them (a view, an in-place or out= result)
        # is new memory only where it is tracked already or has grown
        before = {id(s): s.nbytes() for s in self._storages((args, kwargs)) if id(s) not in self._sizes}
        out = func(*args, **kwargs)
        self._reread()
        for storage in self._storages(out):
            key, nbytes = id(storage), storage.nbytes()
            base = before.get(key, 0)
            if key in self._sizes or nbytes <= base:  # tracked (its size just re-read), or no new bytes
                continue
            self._refs[key] = weakref.ref(storage, lambda ref, key=key: self._release(key, ref))
            self._base[key] = base
            self._sizes[key] = nbytes - base
            self.live += nbytes - base
        self.peak = max(self.peak, self.live)
        return out


def reachable_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``obj``: through mappings, lists, tuples and sets, and the attributes of other
    objects (a transformers KV cache and its layers, GaLore's projector objects), never into an `nn.Module`; each
    container is walked once. Several tensors may share one storage: the caller keys what it counts.

    Example:

    ```python
    >>> import torch
    >>> from hf_ext.tensor_memory import reachable_tensors
    >>> x = torch.zeros(3)
    >>> len(list(reachable_tensors({"a": [x, (x, 1)], "b": None})))
    2

    ```
    """
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield item
        elif id(item) in seen or isinstance(item, (str, bytes, int, float, bool, type(None))):
            continue
        else:
            seen.add(id(item))
            if isinstance(item, Mapping):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple, set)):
                stack.extend(item)
            elif hasattr(item, "__dict__") and not isinstance(item, torch.nn.Module):
                stack.extend(vars(item).values())
