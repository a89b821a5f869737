"""Run a function in several CPU processes joined by a `torch.distributed` (gloo) group.

The harness hf_ext's tests use to compare a multi-process run with the single-process result (DDP
equivalence of losses, optimizers and generation) without a GPU.

Example:

The spawned processes import ``fn`` from its module, so define it in a file of yours (say ``checks.py``), not at a
prompt: a function typed into a doctest or a notebook cannot be pickled for them. The call is skipped here for that
reason; tests/test_distributed.py makes such calls.

```python
>>> import torch
>>> import torch.distributed as dist
>>> from hf_ext.testing import run_distributed
>>> def rank_sum(rank, world_size, base):  # in checks.py
...     t = torch.tensor([float(base + rank)])
...     dist.all_reduce(t)
...     return t.item()
>>> run_distributed(rank_sum, world_size=2, args=(10,))  # skipped here: spawns processes  # doctest: +SKIP
[21.0, 21.0]

```
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist

__all__ = ["DistributedTestError", "run_distributed"]


class DistributedTestError(RuntimeError):
    """A rank raised; the message holds every failing rank's traceback."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: Sequence, queue: Any) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
        }
    )
    try:
        import torch

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle bytes, not torch's shared-memory tensor handles: those die with this process.
        queue.put((rank, pickle.dumps(result), None))
    except BaseException:
        queue.put((rank, None, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any], world_size: int = 2, args: Sequence[Any] = (), timeout: float = 300.0
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes sharing a gloo process group.

    Args:
        fn (`Callable`): a module-level (picklable) function; its return value must be picklable (move
            tensors to CPU, or return plain numbers/lists).
        world_size (`int`, *optional*, defaults to `2`): number of processes, >= 1.
        args (`Sequence`, *optional*): extra positional arguments, picklable.
        timeout (`float`, *optional*, defaults to `300.0`): seconds to wait for every rank.

    Returns:
        `list`: each rank's return value, indexed by rank.

    Raises:
        `DistributedTestError`: when any rank raised (its traceback is in the message) or did not finish.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"`world_size` must be an int >= 1, got {world_size!r}.")
    if not callable(fn):
        raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    processes = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, tuple(args), queue), daemon=False)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if queue.empty():
            if time.monotonic() > deadline or not any(p.is_alive() for p in processes):
                break
            time.sleep(0.05)
            continue
        rank, result, error = queue.get()
        if error is None:
            results[rank] = pickle.loads(result)
        else:
            errors[rank] = error
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
    missing = [rank for rank in range(world_size) if rank not in results and rank not in errors]
    if errors or missing:
        report = "\n".join(f"--- rank {rank} ---\n{tb}" for rank, tb in sorted(errors.items()))
        if missing:
            codes = {rank: processes[rank].exitcode for rank in missing}
            report += (
                f"\nranks {missing} returned nothing (exit codes {codes}: crashed before running `fn`, e.g. "
                f"`fn` is not importable from a module, or exceeded timeout={timeout}s); see their stderr above"
            )
        raise DistributedTestError(report)
    return [results[rank] for rank in range(world_size)]
