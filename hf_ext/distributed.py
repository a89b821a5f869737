"""Gathering tensors across processes with gradients, for losses computed over the global batch.

A loss that ranks every pair of the *global* batch (CoSENT with ``gather_across_devices=True``) needs every
rank's scores, and gradients flowing back to each rank's own embeddings. `all_gather_with_grad` does this for
tensors whose first dimension differs between ranks (the last batch of an epoch), which
`torch.distributed.nn.all_gather` and sentence-transformers' helper do not allow.

Gradient convention (the same as `torch.distributed.nn.all_gather`): every rank computes the same global loss
from the gathered tensor; the backward pass sums, over ranks, the gradient that reaches each slice, and hands
each rank its own slice. After DDP averages parameter gradients over the ``W`` ranks, the update equals the one
of a single process computing the loss on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_with_grad", "get_rank", "get_world_size", "is_distributed"]


def is_distributed() -> bool:
    """True when a `torch.distributed` process group is initialised (with more than one process or not)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank, ``0`` when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The number of processes, ``1`` when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    sizes = torch.tensor([n], dtype=torch.long, device=device)
    gathered = [torch.empty_like(sizes) for _ in range(get_world_size())]
    dist.all_gather(gathered, sizes)
    return [int(s.item()) for s in gathered]


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward: all-reduce (sum) and keep the local slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        sizes = _gather_sizes(tensor.shape[0], tensor.device)
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        buffers = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(buffers, padded.contiguous())
        ctx.sizes = sizes
        ctx.rank = get_rank()
        return torch.cat([buffer[:size] for buffer, size in zip(buffers, sizes, strict=True)], dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dimension 0, in rank order, keeping gradients.

    Ranks may hold different numbers of rows (the trailing dimensions must agree). Without an initialised
    process group the tensor is returned unchanged, so code calling this runs the same on one process.

    Args:
        tensor (`torch.Tensor`): ``(n_local, ...)``, on the device the process group communicates from
            (CPU for gloo, this rank's GPU for nccl).

    Returns:
        `torch.Tensor`: ``(sum of n_local over ranks, ...)``; rows of rank ``r`` start at the sum of the row
        counts of ranks ``< r``.

    Example:

    A pairwise loss over the global batch, as each rank runs it; here in one process without a process group, where
    the gather returns the tensor itself (tests/test_distributed.py runs it across several gloo processes).

    ```python
    >>> import torch
    >>> from hf_ext import all_gather_with_grad, cosent_loss
    >>> scores = torch.tensor([0.9, 0.1, 0.5], requires_grad=True)  # this rank's (n_local,) predicted similarities
    >>> labels = torch.tensor([5.0, 0.0, 3.0])  # and their gold scores
    >>> global_scores = all_gather_with_grad(scores)  # (n_global,): every rank's rows, in rank order
    >>> loss = cosent_loss(global_scores, all_gather_with_grad(labels))  # every pair of the global batch
    >>> loss.backward()  # the gradient reaches this rank's own scores
    >>> scores.grad.shape
    torch.Size([3])

    ```
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"`tensor` must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.dim() == 0:
        raise ValueError("`tensor` must have at least one dimension (rows are gathered along dim 0).")
    if not is_distributed() or get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)
