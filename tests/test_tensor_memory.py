"""TensorBytes counts operator outputs from creation until freed, against byte counts worked out by hand."""

from __future__ import annotations

import pytest
import torch

from hf_ext.tensor_memory import TensorBytes


def test_peak_and_live_follow_creation_and_freeing() -> None:
    x = torch.ones(1024)  # float32: 4,096 bytes, made before the block
    with TensorBytes() as probe:
        y = x * 2  # +4,096, kept
        z = (y + 1).sum()  # +4,096 temporary, +4 for z, then the temporary is freed
    assert probe.peak == 4096 + 4096 + 4
    assert probe.live == 4096 + 4
    del y, z
    assert probe.live == 0


def test_in_place_resize_and_other_devices() -> None:
    out = torch.empty(0)
    with TensorBytes() as probe:
        buffer = torch.zeros(10, dtype=torch.float64)  # 80 bytes
        torch.add(buffer, 1.0, out=out)  # `out` (float32, made before the block) resized to 40 bytes: counted
    assert probe.peak == 80 + 40
    with TensorBytes("meta") as meta:
        torch.ones(1000)  # a CPU tensor is not counted when counting "meta"
    assert meta.peak == 0


def test_views_and_in_place_updates_of_earlier_tensors_are_not_new_memory() -> None:
    weight = torch.ones(256, 256)  # 262,144 bytes, made before the block (a model's weight)
    with TensorBytes() as probe:
        weight.t()  # a view: no new storage
        weight.mul_(0.5)  # an in-place update (an optimizer step): returns the same storage
        weight.view(-1)[:10].add_(1.0)
        kept = weight[:2].clone()  # 2,048 bytes, new
    assert probe.peak == 2048
    assert probe.live == 2048
    del kept


def test_a_storage_resized_outside_any_operator_counts_at_its_new_size() -> None:
    with TensorBytes() as probe:
        buffer = torch.empty(1024)  # 4,096 bytes
        buffer.untyped_storage().resize_(0)  # as FSDP2 frees an unsharded parameter: no operator runs
        small = torch.zeros(1)  # the next operator: 4 bytes
        assert probe.live == 4
        buffer.untyped_storage().resize_(4096)  # re-allocated, then filled by an operator
        buffer.fill_(1.0)
    assert probe.live == 4096 + 4 and probe.peak == 4096 + 4
    del buffer, small


def _sharded_bytes(rank: int, world_size: int) -> int:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    weight = distribute_tensor(torch.ones(100, 10), mesh, [Shard(0)])  # 4,000 bytes, 2,000 on each rank
    with TensorBytes() as probe:
        doubled = weight * 2  # this rank's new shard: 2,000 bytes
        weight.mul_(3)  # in place: nothing new
    del doubled
    return probe.peak


def test_a_dtensor_counts_as_this_ranks_shard() -> None:
    from hf_ext.testing import run_distributed

    assert run_distributed(_sharded_bytes, world_size=2) == [2000, 2000]


def test_bad_device_type_is_refused() -> None:
    with pytest.raises(ValueError, match="`device_type` must be a device type string"):
        TensorBytes(torch.device("cpu"))  # type: ignore[arg-type]
