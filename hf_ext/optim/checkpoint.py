"""Sharded checkpoints of a model and its optimizer through `torch.distributed.checkpoint` (DCP).

Each process writes and reads only its shards; the files reshard, so a checkpoint written by ``n`` processes loads
into ``m`` (or into one process without a process group). `ProjectedAdamW`'s state keeps single-process global
shapes (sharded states as DTensors), which is what lets DCP reshard it; `StepInBackward` checkpoints as the optimizer
it wraps.

Example:

```python
>>> import tempfile, torch
>>> from hf_ext.optim import ProjectedAdamW, load_sharded_checkpoint, save_sharded_checkpoint
>>> model = torch.nn.Linear(8, 16)
>>> opt = ProjectedAdamW(model.named_parameters(), rank=2)
>>> model(torch.randn(4, 8)).sum().backward(); opt.step()
>>> fresh = torch.nn.Linear(8, 16)
>>> fresh_opt = ProjectedAdamW(fresh.named_parameters(), rank=2)
>>> with tempfile.TemporaryDirectory() as path:
...     save_sharded_checkpoint(path, model, opt)
...     load_sharded_checkpoint(path, fresh, fresh_opt)
>>> torch.equal(fresh.weight, model.weight) and torch.equal(fresh_opt.state[fresh.weight]["basis"],
...                                                         opt.state[model.weight]["basis"])
True

```
"""

from __future__ import annotations

import os

import torch
from torch import nn


def save_sharded_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the model's and the optimizer's state to the folder ``path`` (every process calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path))


def load_sharded_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read ``path`` (from `save_sharded_checkpoint`, any world size) into the model and optimizer, in place.

    The optimizer may be fresh: DCP first makes its state's layout with one zero-gradient, zero-rate step.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # templates with this process's shards
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
