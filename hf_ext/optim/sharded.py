"""Projections of FSDP2-sharded weights: `ProjectedAdamW` on `fully_shard`'s dim-0 DTensor shards, without gathering.

`torch.distributed.fsdp.fully_shard` keeps each weight ``W`` (``rows x cols``) as a DTensor sharded on its rows
(``Shard(0)``, `torch.chunk` sizes: rank ``i`` holds rows ``[i * ceil(rows / n), ...)``), and after the
reduce-scatter each rank holds the same rows ``G_i`` of the averaged gradient. The projection keeps the work local:

- basis on the columns (``rows > cols``, "right", ``P``: ``cols x r``, replicated): ``G P`` has rows ``G_i P``,
  computed locally; the moments (``rows x r``) are sharded like the weight, the update ``N_i Pᵀ`` is local.
  No communication.
- basis on the rows (``rows <= cols``, "left", ``P``: ``rows x r``, each rank holding its rows ``P_i``):
  ``Pᵀ G = sum_i P_iᵀ G_i`` is all-reduced (``r x cols``), the moments (``r x cols``) are replicated, and the
  update ``P_i N`` is local.

Every rank draws the full random basis from ``(seed, index, period)`` and keeps its rows, so the state is the one a
single process would hold, split the same way as the weight. Bases and moments keep their global shapes as
DTensors (sharded ones) or plain tensors (replicated ones), so `torch.distributed.checkpoint` reshards them.

Example:

```python
>>> import torch
>>> from hf_ext.optim.sharded import row_range
>>> [row_range(5, world_size=2, rank=r) for r in range(2)]  # torch.chunk's split, as fully_shard uses
[(0, 3), (3, 5)]

```
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = Replicate = Shard = distribute_tensor = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class RowShard:
    """Where this process's rows of a dim-0-sharded weight sit: ``[start, stop)`` of ``shape[0]`` global rows."""

    shape: tuple[int, ...]
    start: int
    stop: int
    mesh: object  # torch.distributed.device_mesh.DeviceMesh
    group: object  # its process group

    @property
    def world_size(self) -> int:
        return self.mesh.size()


def row_range(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` that `torch.chunk` (and so ``Shard(0)`` / `fully_shard`) gives ``rank``."""
    chunk = -(-rows // world_size)  # ceil
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def is_dtensor(tensor: object) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """The local part of a DTensor (a view: in-place changes reach the DTensor), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def row_shard(param: Tensor, name: str) -> RowShard | None:
    """The `RowShard` of a dim-0-sharded DTensor parameter; None for a plain or fully replicated one.

    Raises:
        `ValueError`: for placements the projection cannot use (another sharded dim, a multi-dimensional mesh,
            partial values), naming the weight and what to do.
    """
    if not is_dtensor(param):
        return None
    placements = tuple(param.placements)
    if param.device_mesh.ndim == 1 and all(isinstance(p, Replicate) for p in placements):
        return None
    if param.device_mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(
            f"ProjectedAdamW cannot step `{name}`: it is a DTensor placed as {placements} on a "
            f"{param.device_mesh.ndim}-D mesh, but the projection supports only dim-0 sharding on a 1-D mesh "
            "(`fully_shard`'s default, Shard(0)) or replication. Shard it with `fully_shard(module, mesh=...)` on a "
            "1-D mesh (no `shard_placement_fn`), or put it in a parameter group without `rank` (exact AdamW)."
        )
    mesh = param.device_mesh
    start, stop = row_range(param.shape[0], mesh.size(), mesh.get_local_rank())
    if local(param).shape[0] != stop - start:  # pragma: no cover - a sharding other than torch.chunk's
        raise ValueError(
            f"`{name}` holds {local(param).shape[0]} rows on this rank, but torch.chunk gives rows {start}:{stop}."
        )
    return RowShard(tuple(param.shape), start, stop, mesh, mesh.get_group())


def as_row_sharded(local_rows: Tensor, shard: RowShard, cols: int) -> Tensor:
    """A ``(shard.shape[0], cols)`` DTensor sharded like the weight, from this rank's rows (no communication)."""
    shape = torch.Size((shard.shape[0], cols))
    return DTensor.from_local(local_rows, shard.mesh, (Shard(0),), run_check=False, shape=shape, stride=(cols, 1))


def rows_of(full: Tensor, shard: RowShard) -> Tensor:
    """This rank's rows of a full (replicated) tensor, as a contiguous copy."""
    return full[shard.start : shard.stop].contiguous()


def all_reduce_(tensor: Tensor, shard: RowShard) -> Tensor:
    """Sum ``tensor`` over the weight's shards, in place (a rank-``r``-sized tensor in every use)."""
    dist.all_reduce(tensor, group=shard.group)
    return tensor


def project_rows(grad: Tensor, basis: Tensor, side: str, shard: RowShard | None) -> Tensor:
    """``Pᵀ G`` (left) or ``G P`` (right) of this rank's rows ``grad`` with this rank's ``basis``.

    Left (the basis acts on the sharded rows): the local ``P_iᵀ G_i`` is all-reduced into the full
    ``(rank, cols)`` product. Right: the local ``(rows_i, rank)`` rows of ``G P``, no communication.
    """
    if side == "right":
        return grad @ basis
    reduced = basis.T @ grad
    return reduced if shard is None else all_reduce_(reduced, shard)


def transition(new: Tensor, old: Tensor, side: str, shard: RowShard | None) -> Tensor:
    """``T = P_newᵀ P_old`` (``rank x rank``), summed over the row shards when the bases are sharded (left side)."""
    product = new.T @ old
    return product if shard is None or side == "right" else all_reduce_(product, shard)


def broadcast_basis(basis: Tensor, shard: RowShard) -> Tensor:
    """The first rank's basis on every rank (so a basis computed from the gathered gradient agrees bitwise)."""
    basis = basis.contiguous()
    dist.broadcast(basis, src=dist.get_global_rank(shard.group, 0), group=shard.group)
    return basis


def place_loaded_state(
    value: Tensor,
    param: Tensor,
    name: str,
    key: str,
    shape: tuple[int, ...],
    sharded: bool,
    shard: RowShard | None,
) -> Tensor:
    """A loaded state tensor checked against its global ``shape`` and placed as `ProjectedAdamW` keeps it.

    ``sharded``: whether the state is sharded like its (row-sharded) weight; ``shard``: the projected weight's
    `RowShard` (None for a plain weight or an AdamW one).
    """
    if tuple(value.shape) != tuple(shape):
        here = f" ({tuple(local(param).shape)} rows of it on this rank)" if is_dtensor(param) else ""
        raise ValueError(
            f"The optimizer state `{key}` of `{name}` has shape {tuple(value.shape)}, but this optimizer keeps it "
            f"as {tuple(shape)} for a weight of shape {tuple(param.shape)}{here}: the state was saved with another "
            "sharding (per-rank pieces from another world size) or another rank/model. Save and load through "
            "`torch.distributed.checkpoint` with `get_optimizer_state_dict` / `set_optimizer_state_dict`, which "
            "reshards, or load a full state (`StateDictOptions(full_state_dict=True)`), or load with the world size "
            "and settings it was saved with."
        )
    device = local(param).device
    if is_dtensor(value):
        if not (is_dtensor(param) and value.device_mesh == param.device_mesh):
            raise ValueError(
                f"The optimizer state `{key}` of `{name}` is a DTensor on another device mesh than its weight: load "
                "it with `set_optimizer_state_dict` (torch.distributed.checkpoint), which reshards."
            )
        return value.to(device=device, copy=True)
    value = value.to(device=device, copy=True)
    if not sharded or not is_dtensor(param):
        return value
    if shard is not None:  # a projected row-sharded state: keep this rank's rows
        return as_row_sharded(rows_of(value, shard), shard, value.shape[1])
    # an AdamW moment of a DTensor weight: placed like the weight (this rank's part, no communication)
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
